"""One training run, start to finish: data, model, optimizer and schedule, the epoch loop, evaluation,
stop signals, resuming, checkpoints, reports.

train.py calls `train` once per run; it lives here, not in the script, so that launchers that ship the task
function to another machine (Hydra's SLURM launcher pickles it) reach it by reference.

Running sums stay on the device and are read back only for the progress bar and at the end of an epoch,
so a step never waits for the GPU to finish the one before.
"""
import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from experiment.checkpoint import (claim_run_dir, link_checkpoint, load_checkpoint, resume_command, rng_state,
                                   run_dir_of_checkpoint, save_checkpoint, set_rng_state)
from experiment.complexity import count_parameters
from experiment.config import check_train_config
from experiment.data import build_loaders, build_test_loader, load_dataset, report_skipped_images
from experiment.distributed import World, all_gather_object, all_reduce_sum, local_main_first, unwrap, wrap_ddp
from experiment.errors import UserError
from experiment.models import build_model, check_input_fits, model_from_checkpoint
from experiment.tracking import RunTracker, session_group, use_progress_bars, write_json


log = logging.getLogger("train")


def train(cfg, overrides, world, device, run_dir):
    """One training run into `run_dir`: `cfg` is the composed config, `overrides` the command line's
    (needed to resume), `world` the process group (a world of one without torchrun)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume = load_checkpoint(cfg.resume, training=True) if cfg.resume else None
    if resume:
        cfg = resumed_config(cfg, resume["config"], overrides)
        check_train_config(cfg, f" (of the run resumed from {cfg.resume})")
        if resume["epoch"] >= cfg.trainer.epochs:
            raise UserError(f"{cfg.resume} is from a finished run ({resume['epoch']} of {cfg.trainer.epochs} "
                            f"epochs): nothing to resume; its results are in {run_dir_of_checkpoint(cfg.resume)}")
    if world.is_main:
        claim_run_dir(run_dir, resuming=cfg.resume if resume else None)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        log.info("run directory: %s", run_dir)
    tc = cfg.trainer
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once

    # Data and model
    with local_main_first(world):
        data = load_dataset(cfg.dataset)
    report_skipped_images(data)
    num_classes = len(data.classes)
    train_loader, test_loader = build_loaders(data, cfg.dataset, device=device, seed=cfg.seed, rank=world.rank,
                                              world_size=world.size, channels_last=cuda and tc.channels_last)
    # With dataset.val_split the epochs are scored, and best.pt picked, on held-out training images; the test
    # split is then touched once, at the end, so its score was not selected on.
    val_loader = build_test_loader(data, cfg.dataset, device=device, rank=world.rank, world_size=world.size,
                                   channels_last=cuda and tc.channels_last, split="val") if data.has_val else test_loader
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes).to(device)
    if cuda and tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    check_input_fits(model, next(test_loader.epoch(0))[0][:1], cfg.model.name)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, tc.epochs, len(train_loader))
    epoch, step, best_acc1, history, totals, seconds_before = 0, 0, None, [], None, 0.0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        epoch, step, best_acc1, history = resume["epoch"], resume["step"], resume["best_acc1"], resume["history"]
        seconds_before = resume.get("train_seconds", 0.0)
        totals = resumed_totals(resume["train_totals"], world) if step else None
        log.info("resumed from %s at epoch %d, step %d", cfg.resume, epoch + 1, step)
    ddp_model = wrap_ddp(model, world, device, sync_bn=tc.sync_bn)
    fast_model = torch.compile(ddp_model, mode=None if tc.compile_mode == "default" else tc.compile_mode) \
        if tc.compile else ddp_model
    if resume:  # after everything that draws random numbers at start-up, so dropout continues where it stopped
        rngs = resume["rng"]
        set_rng_state(rngs[world.rank] if len(rngs) == world.size else rngs[0])
    else:
        torch.manual_seed(cfg.seed + world.rank)

    tracker = RunTracker(run_dir, enabled=world.is_main)
    bars = use_progress_bars(tc.progress) and world.is_main
    if world.is_main and epoch == 0 and step == 0:
        x, _ = next(train_loader.epoch(0))
        tracker.image_grid("images/augmented_batch", x[:64], cfg.dataset.mean, cfg.dataset.std)
    hparams = {"model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed, "epochs": tc.epochs,
               "batch_size": cfg.dataset.batch_size, "lr": cfg.optimizer.lr,
               "params": count_parameters(model)}
    log.info("%s on %s: %d parameters, %d classes, %d training steps per epoch, %s, %d process(es)",
             cfg.model.name, cfg.dataset.name, hparams["params"], num_classes, len(train_loader), device, world.size)
    if data.has_val:
        log.info("validation split: %d held-out training images pick best.pt; the test split scores it at the end",
                 val_loader.num_samples)

    def checkpoint(epoch, step, totals=None):
        """The state to continue from; on every rank, since it gathers their RNG states and running totals."""
        return {"model": unwrap(ddp_model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": None, "epoch": epoch, "step": step,
                "best_acc1": best_acc1, "history": history, "rng": all_gather_object(rng_state(), world),
                "train_totals": all_gather_object(totals.state_dict(), world) if totals else None,
                "train_seconds": seconds_before + time.perf_counter() - start, "num_classes": num_classes,
                "classes": list(data.classes), "config": OmegaConf.to_container(cfg, resolve=True)}

    # Training
    start = time.perf_counter()
    with StopRequest(world, device, every=tc.log_every) as stop, logging_redirect_tqdm():
        epoch_bar = tqdm(range(epoch, tc.epochs), desc="epochs", initial=epoch, total=tc.epochs, disable=not bars,
                         dynamic_ncols=True)
        for epoch in epoch_bar:
            batch_bar = tqdm(total=len(train_loader), initial=step, desc=f"epoch {epoch + 1}", leave=False,
                             disable=not bars, dynamic_ncols=True)
            try:
                totals, step = train_one_epoch(
                    fast_model, train_loader, optimizer, scheduler, epoch=epoch, device=device, amp=tc.amp,
                    label_smoothing=tc.label_smoothing, start_step=step, totals=totals, stop_requested=stop,
                    progress=batch_bar if bars else None, log_every=tc.log_every)
            except NonFiniteLoss as e:
                last = ckpt_dir / "last.pt"
                good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
                raise UserError(f"{e}; {good}; start a new run with a lower optimizer.lr or with "
                                f"scheduler.warmup_epochs=1") from None
            finally:
                batch_bar.close()
            if step < len(train_loader):  # stopped by a signal: save mid-epoch and tell how to continue
                state = checkpoint(epoch, step, totals)
                if world.is_main:
                    path = save_checkpoint(state, ckpt_dir / "last.pt")
                    log.warning("interrupted (%s) at epoch %d, step %d; saved %s\nresume with: python %s",
                                stop.signal.name, epoch + 1, step, path, resume_command(path))
                sys.exit(stop.exit_code)
            train = reduce_train_totals(totals, device, world)
            epoch_s, img_per_s = totals.seconds, totals.count * world.size / max(totals.seconds, 1e-9)
            totals, step = None, 0
            last_epoch = epoch + 1 == tc.epochs
            val = None
            if (epoch + 1) % tc.eval_every == 0 or last_epoch:
                val = evaluate(fast_model, val_loader, num_classes=num_classes, device=device, world=world,
                               amp=tc.amp)
            record = {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc1": train["acc1"],
                      "lr": optimizer.param_groups[0]["lr"], "epoch_s": epoch_s, "img_per_s": img_per_s}
            if val:
                record.update(val_loss=val["loss"], val_acc1=val["acc1"], val_acc5=val["acc5"])
            history.append(record)
            is_best = val is not None and (best_acc1 is None or val["acc1"] > best_acc1)
            if is_best:
                best_acc1 = val["acc1"]
            tracker.scalars({"train/loss": train["loss"], "train/acc1": train["acc1"], "lr": record["lr"],
                             "perf/img_per_s": img_per_s, "perf/epoch_s": epoch_s,
                             **({"val/loss": val["loss"], "val/acc1": val["acc1"], "val/acc5": val["acc5"]}
                                if val else {})}, epoch + 1)
            log.info(f"epoch {epoch + 1}/{tc.epochs}  train loss {train['loss']:.4f} acc {train['acc1']:.2f}  "
                     + (f"val loss {val['loss']:.4f} acc1 {val['acc1']:.2f} acc5 {val['acc5']:.2f}  " if val else "")
                     + f"{img_per_s:,.0f} img/s  {epoch_s:.1f}s")
            if best_acc1 is not None:
                epoch_bar.set_postfix(best_val_acc1=f"{best_acc1:.2f}")
            save_last = (epoch + 1) % tc.save_every == 0 or last_epoch
            if save_last or is_best:
                state = checkpoint(epoch + 1, 0)
                if world.is_main and save_last:
                    save_checkpoint(state, ckpt_dir / "last.pt")
                if world.is_main and is_best and save_last:  # the same state: a link, not a second write
                    link_checkpoint(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
                elif world.is_main and is_best:
                    save_checkpoint(state, ckpt_dir / "best.pt")
        epoch_bar.close()

    # Report
    train_seconds = seconds_before + time.perf_counter() - start
    if world.is_main:
        test_acc1 = score_on_test(ckpt_dir / "best.pt", data, cfg.dataset, device) if data.has_val else best_acc1
        metrics = {"model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed, "epochs": tc.epochs,
                   "best_acc1": best_acc1, "final_acc1": history[-1].get("val_acc1") if history else None,
                   "test_acc1": test_acc1, "selected_on": "val" if data.has_val else "test",
                   "best_epoch": next((h["epoch"] for h in history if h.get("val_acc1") == best_acc1), None),
                   "train_seconds": train_seconds,
                   "img_per_s": sum(h["img_per_s"] for h in history) / max(len(history), 1), "history": history}
        write_json(run_dir / "metrics.json", metrics)
        tracker.scalars({"test/acc1": test_acc1}, tc.epochs)
        tracker.hparams(hparams, metrics, session_group(OmegaConf.to_container(cfg, resolve=True)), step=tc.epochs)
        log_kernel_skeleton(tracker, unwrap(ddp_model), cfg.model.name)
        log.info("done: best %s top-1 %.2f%% (epoch %s), final %s top-1 %.2f%%, test top-1 of best.pt %.2f%%, "
                 "%.0fs, %.0f img/s\n  run directory: %s\n  checkpoints: %s\n  tensorboard --logdir %s",
                 metrics["selected_on"], best_acc1 or 0.0, metrics["best_epoch"], metrics["selected_on"],
                 metrics["final_acc1"] or 0.0, test_acc1 or 0.0, train_seconds, metrics["img_per_s"], run_dir,
                 ckpt_dir, run_dir.parent)
    tracker.close()


def score_on_test(best_path, data, dataset_cfg, device):
    """Top-1 of the checkpoint picked on the validation split, on the whole test split, the way eval.py scores
    it (rebuilt from the file, float32, one process), so `test_acc1` is what `eval.py ckpt=best.pt` reports."""
    model = model_from_checkpoint(load_checkpoint(best_path), best_path).to(device)
    loader = build_test_loader(data, dataset_cfg, device=device)
    result = evaluate(model, loader, num_classes=len(data.classes), device=device, world=World(), amp=False)
    log.info("best.pt on the test split: top-1 %.2f%%, top-5 %.2f%%, %d images", result["acc1"], result["acc5"],
             result["num_samples"])
    return result["acc1"]


def resumed_totals(saved, world):
    """This rank's running totals of the interrupted epoch; with another number of processes than saved them,
    rank 0 carries their sum (the epoch's loss and accuracy stay right, the data order differs anyway)."""
    if len(saved) == world.size:
        return TrainTotals(**saved[world.rank])
    if not world.is_main:
        return TrainTotals()
    return TrainTotals(**{k: sum(s[k] for s in saved) if k != "seconds" else max(s[k] for s in saved)
                          for k in saved[0]})


def log_kernel_skeleton(tracker, model, name):
    """ACNet's kernel-skeleton picture of the trained model (after fusion) in TensorBoard."""
    from experiment.report import kernel_skeleton, kernel_skeleton_figure
    from nets import fuse_model

    layers = kernel_skeleton(fuse_model(model))
    if layers:  # a network without square KxK convs (K > 1) has no skeleton to draw
        tracker.figure("images/kernel_skeleton", kernel_skeleton_figure({f"{name} (fused)": layers}, layers_per_row=3))


class NonFiniteLoss(Exception):
    """`epoch` and `step` are 0-based like the loop's; the message counts from 1, as the logs do."""

    def __init__(self, epoch, step, steps_per_epoch=None):
        of = f" of {steps_per_epoch}" if steps_per_epoch else ""
        super().__init__(f"the training loss became non-finite (nan or inf) at epoch {epoch + 1}, step {step + 1}{of}")
        self.epoch, self.step = epoch, step


def autocast_context(device, amp):
    """bf16 autocast on CUDA when `amp`; float32 elsewhere."""
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class TrainTotals:
    """Sums over the steps of one epoch so far; saved in an interrupted run's checkpoint."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0

    def state_dict(self):
        return dict(self.__dict__)


def train_one_epoch(model, loader, optimizer, scheduler, *, epoch, device, amp=False, label_smoothing=0.0,
                    start_step=0, totals=None, stop_requested=lambda: False, progress=None, log_every=20):
    """Train for one epoch from `start_step`. Returns (totals, next_step); next_step < len(loader) means the
    epoch stopped early because `stop_requested()` became true after a finished step."""
    model.train()
    totals = totals or TrainTotals()
    # The loss sum continues from `totals` rather than starting at 0 and being added at the end: float
    # addition is not associative (late, tiny losses of a long epoch round differently), and only one running
    # sum makes a run resumed mid-epoch report the very same epoch loss as an uninterrupted one.
    loss_sum = torch.tensor(totals.loss_sum, device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    count, step = 0, start_step
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader.epoch(epoch, start_step), start=start_step):
        with autocast_context(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        count += len(y)
        done = step + 1
        if done % log_every == 0 or done == len(loader):
            _check_finite(first_bad, epoch, len(loader))
            if progress is not None:
                seconds = time.perf_counter() - t0
                seen = totals.count + count
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                     acc=f"{100 * (totals.correct + correct.item()) / seen:.1f}",
                                     img_s=f"{count / max(seconds, 1e-9):.0f}", refresh=False)
                progress.update(done - progress.n)
        if stop_requested():
            step += 1
            break
    else:
        step = len(loader)
    _check_finite(first_bad, epoch, len(loader))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    totals.loss_sum = loss_sum.item()
    totals.correct += int(correct.item())
    totals.count += count
    totals.seconds += time.perf_counter() - t0
    return totals, step


def _check_finite(first_bad, epoch, steps_per_epoch=None):
    bad = int(first_bad.item())
    if bad >= 0:
        raise NonFiniteLoss(epoch, bad, steps_per_epoch)


def reduce_train_totals(totals, device, world):
    """Sum the loss and accuracy counts over all ranks: the epoch's loss and top-1 on the whole data."""
    t = torch.tensor([totals.loss_sum, totals.correct, totals.count], dtype=torch.float64, device=device)
    loss_sum, correct, count = all_reduce_sum(t, world).tolist()
    return {"loss": loss_sum / max(count, 1), "acc1": 100.0 * correct / max(count, 1)}


@torch.no_grad()
def evaluate(model, loader, *, num_classes, device, world, amp=False, return_predictions=False):
    """Loss, top-1, top-5, per-class confusion counts and sample count over the whole test split, each
    sample counted once whatever the number of ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top1 = torch.zeros((), device=device, dtype=torch.int64)
    top5 = torch.zeros((), device=device, dtype=torch.int64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    predictions = []
    k = min(5, num_classes)
    t0 = time.perf_counter()
    for x, y in loader.epoch(0):
        with autocast_context(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        top1 += (topk[:, 0] == y).sum()
        top5 += (topk == y[:, None]).any(1).sum()
        confusion.index_add_(0, y * num_classes + topk[:, 0], torch.ones_like(y))  # bincount would sync on CUDA
        if return_predictions:
            predictions.append(topk[:, 0].cpu())
    stats = torch.cat([loss_sum.view(1), top1.view(1).double(), top5.view(1).double()])
    loss_sum, top1, top5 = all_reduce_sum(stats, world).tolist()
    confusion = all_reduce_sum(confusion, world).view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    result = {"loss": loss_sum / max(n, 1), "acc1": 100.0 * top1 / max(n, 1), "acc5": 100.0 * top5 / max(n, 1),
              "num_samples": n, "seconds": time.perf_counter() - t0, "confusion": confusion}
    if return_predictions:
        result["predictions"] = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)
    return result


class StopRequest:
    """Call it after each step: true once a stop signal arrived (on any rank, under torchrun).

    A second Ctrl-C stops at once. Under torchrun the ranks agree every `every` steps, so they all stop
    after the same step and none is left waiting in a collective."""

    def __init__(self, world, device, every=1):
        self.world, self.device, self.every = world, device, every
        self.signal = None
        self.calls = 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)

    @property
    def exit_code(self):
        return 128 + int(self.signal or signal.SIGTERM)

    def __call__(self):
        if not self.world.distributed:
            return self.signal is not None
        self.calls += 1
        if self.calls % self.every:
            return False
        flag = torch.tensor([float(self.signal is not None)], device=self.device)
        stop = bool(all_reduce_sum(flag, self.world).item())
        if stop and self.signal is None:
            self.signal = signal.SIGTERM
        return stop


_IGNORED = ("resume", "hydra.")


def resumed_config(cfg, stored, overrides):
    """`cfg`: this command line's config; `stored`: the checkpoint's `config`; `overrides`: Hydra's task
    overrides (strings like "trainer.epochs=40"). Returns the config to continue with."""
    resumed = OmegaConf.create(stored)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(_IGNORED):
            continue
        if key.startswith("trainer.") and key != "trainer.epochs":
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=True)
            continue
        now, then = OmegaConf.select(cfg, key), OmegaConf.select(resumed, key)
        if OmegaConf.is_config(now):
            now = OmegaConf.to_container(now, resolve=True)
        if OmegaConf.is_config(then):
            then = OmegaConf.to_container(then, resolve=True)
        if now != then and key == "trainer.epochs":
            raise UserError(f"{override} differs from the run being resumed (trainer.epochs was {then}): its "
                            f"learning-rate schedule spans {then} epochs and would jump; resume without "
                            f"trainer.epochs, or start a new run with the length you want")
        if now != then:
            raise UserError(f"{override} differs from the run being resumed ({key} was {then}); resume with "
                            f"only trainer.* overrides, or start a new run without resume=")
    resumed.resume = cfg.resume
    return resumed


def parameter_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # BN scales/shifts and biases are 1-D
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# A closed registry keyed by the `_target_` the config files name: a checkpoint's stored config must not be
# able to name any callable (Hydra's instantiate would import and call whatever it names).
OPTIMIZERS = {"torch.optim.SGD": torch.optim.SGD, "torch.optim.AdamW": torch.optim.AdamW}
SCHEDULES = ("cosine", "onecycle", "multistep")


def build_optimizer(model, cfg):
    """`cfg` is the `optimizer` config section: `_target_`, one of OPTIMIZERS, and that class's options."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    target = cfg.pop("_target_", None)
    if target not in OPTIMIZERS:
        raise UserError(f"optimizer._target_={target!r} is not an optimizer this repository builds; choose "
                        f"optimizer=sgd or optimizer=adamw ({', '.join(OPTIMIZERS)})")
    weight_decay = cfg.pop("weight_decay", 0.0)
    try:
        return OPTIMIZERS[target](parameter_groups(model, weight_decay), **cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build the optimizer from {dict(cfg, _target_=target)}: {e}") from None


def lr_factor(cfg, step, total_steps, steps_per_epoch):
    """The factor on the base learning rate at `step` (0-based) of `total_steps`."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.name == "cosine":
        return cfg.min_factor + (1 - cfg.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "onecycle":
        # linear ramp up to the peak, then cosine annealing to min_factor (as torch's OneCycleLR)
        if progress < cfg.pct_start:
            return cfg.start_factor + (1 - cfg.start_factor) * progress / cfg.pct_start
        down = (progress - cfg.pct_start) / (1 - cfg.pct_start)
        return cfg.min_factor + (1 - cfg.min_factor) * 0.5 * (1 + math.cos(math.pi * down))
    if cfg.name == "multistep":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    raise UserError(f"unknown scheduler {cfg.name!r}; choose one of: {', '.join(SCHEDULES)}")


def build_scheduler(optimizer, cfg, epochs, steps_per_epoch):
    """A per-step LambdaLR following `lr_factor`; `cfg` is the `scheduler` config section."""
    total = epochs * steps_per_epoch
    # a plain namespace: the lambda runs every step, and reading an OmegaConf node costs ~50x more
    cfg = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg
    lr_factor(cfg, 0, total, steps_per_epoch)  # an unknown name fails here, not after the first epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total, steps_per_epoch))
