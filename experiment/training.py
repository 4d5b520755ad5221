"""One training run, start to finish: data, model, optimizer, the epoch loop, evaluation, stop signals,
resuming, checkpoints, reports.

train.py calls `train` once per run; it lives here, not in the script, so that launchers that ship the task
function to another machine (Hydra's SLURM launcher pickles it) reach it by reference.

Running sums stay on the device and are read back only for the progress bar and at the end of an epoch,
so a step never waits for the GPU to finish the one before.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from experiment.checkpoint import CheckpointSaver, load_checkpoint, resume_command, rng_state, set_rng_state
from experiment.complexity import count_parameters
from experiment.config import check_train_config, escape_interpolations, literal_config
from experiment.data import build_loaders, build_test_loader, load_dataset, report_skipped_images
from experiment.distributed import World, all_gather_object, all_reduce_sum, local_main_first, unwrap, wrap_ddp
from experiment.errors import UserError
from experiment.evaluation import autocast_context, evaluate
from experiment.models import build_model, check_input_fits, model_from_checkpoint
from experiment.optim import build_optimizer, build_scheduler
from experiment.run_dir import claim_run_dir, run_dir_of_checkpoint
from experiment.tracking import RunTracker, arms, session_group, tensorboard_url, write_json

log = logging.getLogger("train")


@dataclass
class Run:
    """What one training run works with and where it stands: the epoch loop advances it, a checkpoint stores it."""

    cfg: object
    world: World
    device: torch.device
    run_dir: Path
    data: object
    train_loader: object
    val_loader: object
    model: torch.nn.Module  # the bare model: its state_dict is what checkpoints hold
    fast_model: torch.nn.Module  # what trains and evaluates: the model under DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    scheduler: object
    tracker: RunTracker
    saver: CheckpointSaver
    epoch: int = 0
    step: int = 0  # steps done in epoch `epoch`; non-zero only when resuming an interrupted epoch
    best_acc1: float | None = None
    history: list = field(default_factory=list)
    totals: TrainTotals | None = None
    seconds_before: float = 0.0  # training time of the run before it was resumed
    start: float = 0.0  # perf_counter() when this process's epoch loop began
    stopped_by: signal.Signals | None = None  # a stop signal that came after the last step

    @property
    def num_classes(self):
        return len(self.data.classes)

    def train_seconds(self):
        return self.seconds_before + time.perf_counter() - self.start


def train(cfg, overrides, world, device, run_dir):
    """One training run into `run_dir`: `cfg` is the composed config, `overrides` the command line's
    (needed to resume), `world` the process group (a world of one without torchrun)."""
    cfg, resume = config_of_run(cfg, overrides)
    # The loaders' DataLoader workers end with the run, however it ends: a sweep runs every job in this process
    with ExitStack() as loaders:
        run = set_up(cfg, resume, world, device, Path(run_dir), loaders)
        run_epochs(run)
        if world.is_main:  # what only rank 0 does: score, write metrics.json and the run's summary
            report(run)
        run.tracker.close()
    if run.stopped_by:  # a signal after the last step: the run is complete, but the sweep stops here too
        log.warning("interrupted (%s) after the last epoch; the run is complete", run.stopped_by.name)
        sys.exit(128 + int(run.stopped_by))


def config_of_run(cfg, overrides):
    """(config, checkpoint to resume or None): a resumed run continues with the config stored in its checkpoint.
    A finished run is refused here, on every rank, before any directory is claimed or written."""
    if not cfg.resume:
        return cfg, None
    resume = load_checkpoint(cfg.resume, training=True)
    cfg = resumed_config(cfg, resume["config"], overrides)
    check_train_config(cfg, f" (of the run resumed from {cfg.resume})")
    if resume["epoch"] >= cfg.trainer.epochs:
        raise UserError(f"{cfg.resume} is from a finished run ({resume['epoch']} of {cfg.trainer.epochs} "
                        f"epochs): nothing to resume; its results are in {run_dir_of_checkpoint(cfg.resume)}")
    return cfg, resume


def set_up(cfg, resume, world, device, run_dir, loaders):
    """Claim the run directory, load the data, build model, optimizer and schedule, restore a resumed state.
    The data loaders are entered into the ExitStack `loaders`, which closes them."""
    if world.is_main:  # rank 0 alone writes the run directory; its tracker and checkpoint saver are idle elsewhere
        claim_run_dir(run_dir, resuming=cfg.resume if resume else None)
        # resolved, with any `${` a value holds escaped: OmegaConf.load gives back these values, runs nothing
        OmegaConf.save(literal_config(OmegaConf.to_container(cfg, resolve=True)), run_dir / "config.yaml")
        log.info("run directory: %s", run_dir)
    tc = cfg.trainer
    channels_last = device.type == "cuda" and tc.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    with local_main_first(world):
        data = load_dataset(cfg.dataset)
    report_skipped_images(data)
    train_loader, test_loader = build_loaders(data, cfg.dataset, device=device, seed=cfg.seed, rank=world.rank,
                                              world_size=world.size, channels_last=channels_last)
    loaders.enter_context(train_loader)
    loaders.enter_context(test_loader)
    # With dataset.val_split the epochs are scored, and best.pt picked, on held-out training images; the test
    # split is then touched once, at the end, so its score was not selected on.
    val_loader = build_test_loader(data, cfg.dataset, device=device, rank=world.rank, world_size=world.size,
                                   channels_last=channels_last, split="val") if data.has_val else test_loader
    loaders.enter_context(val_loader)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(data.classes)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    check_input_fits(model, next(test_loader.epoch(0))[0][:1], cfg.model.name)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, tc.epochs, len(train_loader))
    progress = {}
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        progress = dict(epoch=resume["epoch"], step=resume["step"], best_acc1=resume["best_acc1"],
                        history=resume["history"], seconds_before=resume.get("train_seconds", 0.0),
                        totals=resumed_totals(resume["train_totals"], world) if resume["step"] else None)
        log.info("resumed from %s at epoch %d, step %d", cfg.resume, resume["epoch"] + 1, resume["step"])
    ddp_model = wrap_ddp(model, world, device, sync_bn=tc.sync_bn)
    fast_model = torch.compile(ddp_model, mode=None if tc.compile_mode == "default" else tc.compile_mode) \
        if tc.compile else ddp_model
    if resume:  # after everything that draws random numbers at start-up, so dropout continues where it stopped
        rngs = resume["rng"]
        set_rng_state(rngs[world.rank] if len(rngs) == world.size else rngs[0])
    else:
        torch.manual_seed(cfg.seed + world.rank)
    run = Run(cfg, world, device, run_dir, data, train_loader, val_loader, unwrap(ddp_model), fast_model, optimizer,
              scheduler, RunTracker(run_dir, enabled=world.is_main),
              CheckpointSaver(run_dir / "checkpoints", tc.save_every, tc.epochs, enabled=world.is_main), **progress)
    if run.tracker.enabled and run.epoch == 0 and run.step == 0:
        x, _ = next(train_loader.epoch(0))
        run.tracker.image_grid("images/augmented_batch", x[:64], cfg.dataset.mean, cfg.dataset.std)
    log.info("%s on %s: %d parameters, %d classes, %d training steps per epoch, %s, %d process(es)",
             cfg.model.name, cfg.dataset.name, count_parameters(model), run.num_classes, len(train_loader), device,
             world.size)
    if data.has_val:
        log.info("validation split: %d held-out training images pick best.pt; the test split scores it at the end",
                 val_loader.num_samples)
    return run


def run_epochs(run):
    """Train from where `run` stands to the last epoch, evaluating and saving as configured. A stop signal
    saves last.pt mid-epoch and exits with 128 + the signal number."""
    tc = run.cfg.trainer
    bars = tc.progress and run.world.is_main and sys.stderr.isatty()  # a log file gets plain lines
    run.start = time.perf_counter()
    with StopRequest(run.world, run.device, every=tc.log_every) as stop, logging_redirect_tqdm():
        epoch_bar = tqdm(range(run.epoch, tc.epochs), desc="epochs", initial=run.epoch, total=tc.epochs,
                         disable=not bars, dynamic_ncols=True)
        for epoch in epoch_bar:
            run.epoch = epoch
            record = train_epoch(run, stop, bars)
            if record is None:  # stopped by a signal: save mid-epoch and tell how to continue
                path = run.saver.save_interrupted(checkpoint_state(run, run.epoch, run.step, run.totals))
                if path:
                    log.warning("interrupted (%s) at epoch %d, step %d; saved %s\nresume with: python %s",
                                stop.signal.name, run.epoch + 1, run.step, path, resume_command(path))
                sys.exit(stop.exit_code)
            run.totals, run.step = None, 0
            finished = run.epoch + 1
            val = None
            if finished % tc.eval_every == 0 or finished == tc.epochs:
                val = evaluate(run.fast_model, run.val_loader, num_classes=run.num_classes, device=run.device,
                               world=run.world, amp=tc.amp)
            is_best = val is not None and (run.best_acc1 is None or val["acc1"] > run.best_acc1)
            if is_best:
                run.best_acc1 = val["acc1"]
            record_epoch(run, record, val)
            if run.best_acc1 is not None:
                epoch_bar.set_postfix(best_val_acc1=f"{run.best_acc1:.2f}")
            run.saver.save_epoch(finished, is_best, lambda: checkpoint_state(run, finished, 0))
        epoch_bar.close()
        run.stopped_by = stop.signal


def train_epoch(run, stop, bars):
    """Train epoch `run.epoch` from `run.step`; returns its history record (loss and top-1 over all ranks, speed),
    or None when a stop signal ended it early: `run.step` and `run.totals` then say where it stopped."""
    tc = run.cfg.trainer
    batch_bar = tqdm(total=len(run.train_loader), initial=run.step, desc=f"epoch {run.epoch + 1}", leave=False,
                     disable=not bars, dynamic_ncols=True)
    try:
        run.totals, run.step = train_one_epoch(
            run.fast_model, run.train_loader, run.optimizer, run.scheduler, epoch=run.epoch, device=run.device,
            amp=tc.amp, label_smoothing=tc.label_smoothing, start_step=run.step, totals=run.totals,
            stop_requested=stop, progress=batch_bar if bars else None, log_every=tc.log_every)
    except NonFiniteLoss as e:
        last = run.saver.directory / "last.pt"
        good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise UserError(f"{e}; {good}; start a new run with a lower optimizer.lr or a longer "
                        f"scheduler.warmup_epochs") from None
    finally:
        batch_bar.close()
    if run.step < len(run.train_loader):
        return None
    totals, seconds = reduce_train_totals(run.totals, run.device, run.world), run.totals.seconds
    return {"epoch": run.epoch + 1, "train_loss": totals["loss"], "train_acc1": totals["acc1"],
            "lr": run.optimizer.param_groups[0]["lr"], "epoch_s": seconds,
            "img_per_s": run.totals.count * run.world.size / max(seconds, 1e-9)}


def record_epoch(run, record, val):
    """Add the finished epoch, its `record` from `train_epoch` and `val` scores, to history, TensorBoard and log."""
    epoch = record["epoch"]
    if val:
        record.update(val_loss=val["loss"], val_acc1=val["acc1"], val_acc5=val["acc5"])
    run.history.append(record)
    run.tracker.scalars({"train/loss": record["train_loss"], "train/acc1": record["train_acc1"], "lr": record["lr"],
                         "perf/img_per_s": record["img_per_s"], "perf/epoch_s": record["epoch_s"],
                         **({"val/loss": val["loss"], "val/acc1": val["acc1"], "val/acc5": val["acc5"]}
                            if val else {})}, epoch)
    log.info(f"epoch {epoch}/{run.cfg.trainer.epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc1']:.2f}  "
             + (f"val loss {val['loss']:.4f} acc1 {val['acc1']:.2f} acc5 {val['acc5']:.2f}  " if val else "")
             + f"{record['img_per_s']:,.0f} img/s  {record['epoch_s']:.1f}s")


def checkpoint_state(run, epoch, step, totals=None):
    """The state to continue from; built on every rank, since it gathers their RNG states and running totals."""
    world = run.world
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": None, "epoch": epoch, "step": step,
            "best_acc1": run.best_acc1, "history": run.history, "rng": all_gather_object(rng_state(), world),
            "train_totals": all_gather_object(totals.state_dict(), world) if totals else None,
            "train_seconds": run.train_seconds(), "num_classes": run.num_classes,
            "classes": list(run.data.classes), "config": OmegaConf.to_container(run.cfg, resolve=True)}


def report(run):
    """Rank 0, after the last epoch: metrics.json, TensorBoard's hparams and kernel skeleton, a summary."""
    cfg, history, best_acc1 = run.cfg, run.history, run.best_acc1
    seconds = run.train_seconds()  # before scoring on the test split, which is not training
    test_acc1 = score_on_test(run) if run.data.has_val else best_acc1
    metrics = {"model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed, "epochs": cfg.trainer.epochs,
               "best_acc1": best_acc1, "final_acc1": history[-1].get("val_acc1") if history else None,
               "test_acc1": test_acc1, "selected_on": "val" if run.data.has_val else "test",
               "best_epoch": next((h["epoch"] for h in history if h.get("val_acc1") == best_acc1), None),
               "train_seconds": seconds,
               "img_per_s": sum(h["img_per_s"] for h in history) / max(len(history), 1), "history": history}
    write_json(run.run_dir / "metrics.json", metrics)
    hparams = {"model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed, "epochs": cfg.trainer.epochs,
               "batch_size": cfg.dataset.batch_size, "lr": cfg.optimizer.lr, "params": count_parameters(run.model)}
    run.tracker.hparams(hparams, metrics, session_group(OmegaConf.to_container(cfg, resolve=True)),
                        step=cfg.trainer.epochs)
    log_kernel_skeleton(run.tracker, run.model, cfg.model.name)
    log.info("done: best %s top-1 %.2f%% (epoch %s), final %s top-1 %.2f%%, test top-1 of best.pt %.2f%%, "
             "%.0fs, %.0f img/s\n  run directory: %s\n  checkpoints: %s\n  compare the arms: python -m experiment.report %s"
             "\n  tensorboard --logdir %s --host 127.0.0.1, then open %s",
             metrics["selected_on"], best_acc1 or 0.0, metrics["best_epoch"], metrics["selected_on"],
             metrics["final_acc1"] or 0.0, test_acc1 or 0.0, metrics["train_seconds"], metrics["img_per_s"],
             run.run_dir, run.saver.directory, run.run_dir.parent, run.run_dir.parent,
             tensorboard_url(arms(cfg.model.name)))


def score_on_test(run):
    """Top-1 of best.pt, picked on the validation split, on the whole test split the way eval.py scores it
    (rebuilt from the file, float32, one process), so `test_acc1` is what `eval.py ckpt=best.pt` reports."""
    best = run.saver.directory / "best.pt"
    if not best.is_file():  # e.g. a run resumed from a last.pt copied without its best.pt
        log.warning("%s is missing, so the checkpoint picked on the validation split cannot be scored on the test "
                    "split: metrics.json has test_acc1 null (score it with eval.py once best.pt is back)", best)
        return None
    model = model_from_checkpoint(load_checkpoint(best), best).to(run.device)
    with build_test_loader(run.data, run.cfg.dataset, device=run.device) as loader:
        result = evaluate(model, loader, num_classes=run.num_classes, device=run.device, world=World(), amp=False)
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
    from experiment.figures import kernel_skeleton, kernel_skeleton_figure
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
    resumed = literal_config(stored)  # stored strings are data, never interpolations
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(_IGNORED):
            continue
        if key.startswith("trainer.") and key != "trainer.epochs":
            OmegaConf.update(resumed, key, escape_interpolations(_plain(OmegaConf.select(cfg, key))),
                             force_add=True)
            continue
        now, then = _plain(OmegaConf.select(cfg, key)), _plain(OmegaConf.select(resumed, key))
        if now == then:
            continue
        if key == "trainer.epochs":
            fix = (f"its learning-rate schedule spans {then} epochs and would jump; resume without trainer.epochs, "
                   f"or start a new run with the length you want")
        else:
            fix = "resume with only trainer.* overrides, or start a new run without resume="
        raise UserError(f"{override} differs from the run being resumed ({key} was {then}): {fix}")
    resumed.resume = escape_interpolations(cfg.resume)
    return resumed


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
