"""One training run, read top to bottom in `train`: the run directory, data, model, optimizer and schedule,
the epoch loop with evaluation and checkpoints, and the end-of-run test of best.pt. It calls `train_one_epoch`
and `evaluate` (experiment/evaluation.py), which stay pure and testable.

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
from dataclasses import dataclass
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
from experiment.distributed import (World, all_gather_object, all_reduce_sum, broadcast_object, cleanup,
                                    init_distributed, local_main_first, select_device, unwrap, wrap_ddp)
from experiment.errors import UserError
from experiment.evaluation import autocast_context, evaluate
from experiment.models import build_model, check_input_fits, model_from_checkpoint
from experiment.optim import build_optimizer, build_scheduler
from experiment.run_dir import claim_run_dir, release_run_dir, run_dir_of_checkpoint
from experiment.tracking import RunTracker, arms, session_group, tensorboard_url, write_json

log = logging.getLogger("train")


def train(cfg, run_dir, overrides=()):
    """One training run into `run_dir` (rank 0's is used by every rank): `cfg` is the composed config,
    `overrides` the command line's Hydra overrides (a resumed run continues with its checkpoint's config and
    takes only trainer.* from them). Runs the same in one process and under torchrun."""
    check_train_config(cfg)
    device_option = cfg.trainer.device  # this command line's, also when resuming: where this process runs
    cfg, resume = config_to_resume(cfg, overrides)  # the checkpoint to continue from, or None
    tc = cfg.trainer
    world = init_distributed(select_device(device_option).type)
    # Whatever ends the run, its DataLoader workers end with it (a sweep runs every job in this process), then
    # the process group
    with ExitStack() as run:
        run.push(lambda error, *_: cleanup(world, together=error in (None, SystemExit)))  # SystemExit: a stop signal
        device = select_device(device_option, world.local_rank)
        run_dir = Path(broadcast_object(str(run_dir), world))
        if world.is_main:  # rank 0 alone writes the run directory; its tracker and saver are idle elsewhere
            # the claim ends with the run, not with the process: a sweep runs all its jobs in one process
            run.callback(release_run_dir, claim_run_dir(run_dir, resuming=cfg.resume if resume else None))
            # resolved, with any `${` a value holds escaped: OmegaConf.load gives back these values, runs nothing
            OmegaConf.save(literal_config(OmegaConf.to_container(cfg, resolve=True)), run_dir / "config.yaml")
            log.info("run directory: %s", run_dir)

        # Data. With dataset.val_split the epochs are scored, and best.pt picked, on held-out training images;
        # the test split is then touched once, at the end, so its score was not selected on.
        channels_last = device.type == "cuda" and tc.channels_last
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
        with local_main_first(world):
            data = load_dataset(cfg.dataset)
        report_skipped_images(data)
        num_classes = len(data.classes)
        loaders = dict(device=device, rank=world.rank, world_size=world.size, channels_last=channels_last)
        train_loader, test_loader = map(run.enter_context, build_loaders(data, cfg.dataset, seed=cfg.seed, **loaders))
        val_loader = run.enter_context(build_test_loader(data, cfg.dataset, split="val", **loaders)) \
            if data.has_val else test_loader

        # Model, optimizer and schedule
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes).to(device)  # the bare model: what checkpoints hold
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        check_input_fits(model, next(test_loader.epoch(0))[0][:1], cfg.model.name)
        optimizer = build_optimizer(model, cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.scheduler, tc.epochs, len(train_loader))

        # Where the run stands: a resumed run continues its epoch, step, scores and running sums
        epoch, step, best_acc1, history, seconds_before, totals = 0, 0, None, [], 0.0, None
        if resume:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            epoch, step, best_acc1, history = resume["epoch"], resume["step"], resume["best_acc1"], resume["history"]
            seconds_before = resume.get("train_seconds", 0.0)
            totals = resumed_totals(resume["train_totals"], world) if step else None
            if epoch < tc.epochs:
                log.info("resumed from %s at epoch %d, step %d", cfg.resume, epoch + 1, step)
            else:
                log.info("resumed from %s after its last epoch, to write the run's report", cfg.resume)
        # what trains and evaluates: the model under DDP and torch.compile when asked
        fast_model = wrap_ddp(model, world, device, sync_bn=tc.sync_bn)
        model = unwrap(fast_model)  # the same network (trainer.sync_bn converts its BatchNorm layers in place)
        if tc.compile:
            fast_model = torch.compile(fast_model, mode=None if tc.compile_mode == "default" else tc.compile_mode)
        if resume:  # after everything that draws random numbers at start-up, so dropout continues where it stopped
            rngs = resume["rng"]
            set_rng_state(rngs[world.rank] if len(rngs) == world.size else rngs[0])
        else:
            torch.manual_seed(cfg.seed + world.rank)

        # Tracker and checkpoints
        tracker = RunTracker(run_dir, enabled=world.is_main)
        run.callback(tracker.close)
        saver = CheckpointSaver(run_dir / "checkpoints", tc.save_every, tc.epochs, enabled=world.is_main)
        if tracker.enabled and epoch == 0 and step == 0:
            tracker.image_grid("images/augmented_batch", next(train_loader.epoch(0))[0][:64], cfg.dataset.mean,
                               cfg.dataset.std)
        log.info("%s on %s: %d parameters, %d classes, %d training steps per epoch, %s, %d process(es)",
                 cfg.model.name, cfg.dataset.name, count_parameters(model), num_classes, len(train_loader), device,
                 world.size)
        if data.has_val:
            log.info("validation split: %d held-out training images pick best.pt; the test split scores it at the "
                     "end", val_loader.num_samples)
        start = time.perf_counter()

        def train_seconds():  # of the whole run, resumed or not
            return seconds_before + time.perf_counter() - start

        def state(epoch, step, totals=None):
            """The checkpoint to continue from; built on every rank, since it gathers their RNG states and
            running totals."""
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": None, "epoch": epoch, "step": step,
                    "best_acc1": best_acc1, "history": history, "rng": all_gather_object(rng_state(), world),
                    "train_totals": all_gather_object(totals.state_dict(), world) if totals else None,
                    "train_seconds": train_seconds(), "num_classes": num_classes, "classes": list(data.classes),
                    "config": OmegaConf.to_container(cfg, resolve=True)}

        # The epoch loop. A stop signal saves last.pt where the run stopped (after the step it came with, or at the
        # end of the epoch whose last step or evaluation it came with) and exits with 128 + the signal number; one
        # after the last epoch lets the end-of-run report below finish first (the handlers stay until the run ends).
        bars = tc.progress and world.is_main and sys.stderr.isatty()  # a log file gets plain lines
        stop = run.enter_context(StopRequest(world, device, every=tc.log_every))

        def stopped(epoch, step, path):  # `path`: last.pt, just saved (None on ranks that do not write)
            if path:
                log.warning("interrupted (%s) at epoch %d, step %d; saved %s\nresume with: python %s",
                            stop.signal.name, epoch + 1, step, path, resume_command(path))
            sys.exit(stop.exit_code)

        run.enter_context(logging_redirect_tqdm())
        epoch_bar = tqdm(range(epoch, tc.epochs), desc="epochs", initial=epoch, total=tc.epochs,
                         disable=not bars, dynamic_ncols=True)
        for epoch in epoch_bar:
            batch_bar = tqdm(total=len(train_loader), initial=step, desc=f"epoch {epoch + 1}", leave=False,
                             disable=not bars, dynamic_ncols=True)
            try:
                totals, step = train_one_epoch(
                    fast_model, train_loader, optimizer, scheduler, epoch=epoch, device=device, amp=tc.amp,
                    label_smoothing=tc.label_smoothing, start_step=step, totals=totals, stop_requested=stop,
                    progress=batch_bar if bars else None, log_every=tc.log_every)
            except NonFiniteLoss as e:
                last = saver.directory / "last.pt"
                good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
                raise UserError(f"{e}; {good}; start a new run with a lower optimizer.lr or a longer "
                                f"scheduler.warmup_epochs") from None
            finally:
                batch_bar.close()
            if step < len(train_loader):  # stopped by a signal mid-epoch
                stopped(epoch, step, saver.save_interrupted(state(epoch, step, totals)))
            val = None
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
                val = evaluate(fast_model, val_loader, num_classes=num_classes, device=device, world=world,
                               amp=tc.amp)
            is_best = val is not None and (best_acc1 is None or val["acc1"] > best_acc1)
            if is_best:
                best_acc1 = val["acc1"]
            history.append(record_epoch(epoch, totals, val, optimizer, device, world, tracker, tc.epochs))
            totals, step = None, 0
            if best_acc1 is not None:
                epoch_bar.set_postfix(best_val_acc1=f"{best_acc1:.2f}")
            # a stop that came with the epoch's last step (a one-step epoch's every step) or during its evaluation
            stopping = epoch + 1 < tc.epochs and stop(at_epoch_end=True)
            last = saver.save_epoch(epoch + 1, is_best, lambda: state(epoch + 1, 0), save_last=stopping)
            if stopping:
                stopped(epoch + 1, 0, last)
        epoch_bar.close()

        # The end of the run, on rank 0: best.pt on the test split, metrics.json, TensorBoard, a summary
        if world.is_main:
            seconds = train_seconds()  # before scoring on the test split, which is not training
            test_acc1 = score_on_test(saver.directory / "best.pt", data, cfg.dataset, device) if data.has_val \
                else best_acc1
            metrics = {"model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed, "epochs": tc.epochs,
                       "best_acc1": best_acc1, "final_acc1": history[-1].get("val_acc1") if history else None,
                       "test_acc1": test_acc1, "selected_on": "val" if data.has_val else "test",
                       "best_epoch": next((h["epoch"] for h in history if h.get("val_acc1") == best_acc1), None),
                       "train_seconds": seconds,
                       "img_per_s": sum(h["img_per_s"] for h in history) / max(len(history), 1), "history": history}
            write_json(run_dir / "metrics.json", metrics)
            hparams = {"model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed, "epochs": tc.epochs,
                       "batch_size": cfg.dataset.batch_size, "lr": cfg.optimizer.lr, "params": count_parameters(model)}
            tracker.hparams(hparams, metrics, session_group(OmegaConf.to_container(cfg, resolve=True)),
                            step=tc.epochs)
            log_kernel_skeleton(tracker, model, cfg.model.name)
            log.info("done: best %s top-1 %.2f%% (epoch %s), final %s top-1 %.2f%%, test top-1 of best.pt %.2f%%, "
                     "%.0fs, %.0f img/s\n  run directory: %s\n  checkpoints: %s\n  compare the arms: python -m "
                     "experiment.report %s\n  tensorboard --logdir %s --host 127.0.0.1, then open %s",
                     metrics["selected_on"], best_acc1 or 0.0, metrics["best_epoch"], metrics["selected_on"],
                     metrics["final_acc1"] or 0.0, test_acc1 or 0.0, seconds, metrics["img_per_s"], run_dir,
                     saver.directory, run_dir.parent, run_dir.parent, tensorboard_url(arms(cfg.model.name)))
    if stop.signal:  # a signal after the last step: the run is complete, but the sweep stops here too
        log.warning("interrupted (%s) after the last epoch; the run is complete", stop.signal.name)
        sys.exit(128 + int(stop.signal))


def config_to_resume(cfg, overrides):
    """(config, checkpoint to resume or None): a resumed run continues with the config stored in its checkpoint.
    A finished run is refused here, on every rank, before any directory is claimed or written; one stopped after
    its last epoch but before its metrics.json (a second Ctrl-C, a hard kill) resumes to write its report."""
    if not cfg.resume:
        return cfg, None
    resume = load_checkpoint(cfg.resume, training=True)
    cfg = resumed_config(cfg, resume["config"], overrides)
    check_train_config(cfg, f" (of the run resumed from {cfg.resume})")
    if resume["epoch"] >= cfg.trainer.epochs and (run_dir_of_checkpoint(cfg.resume) / "metrics.json").is_file():
        raise UserError(f"{cfg.resume} is from a finished run ({resume['epoch']} of {cfg.trainer.epochs} "
                        f"epochs): nothing to resume; its results are in {run_dir_of_checkpoint(cfg.resume)}")
    return cfg, resume


_IGNORED = ("resume", "hydra.")
_ABSENT = object()


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
        now = OmegaConf.select(cfg, key, default=_ABSENT)
        if now is _ABSENT:  # not a key: a preset, whose values it sets
            raise UserError(f"{override} names no single config value (a preset like experiment= sets many), so it "
                            f"cannot be checked against the run being resumed: resume with only trainer.* overrides, "
                            f"or start a new run without resume=")
        now, then = _plain(now), _plain(OmegaConf.select(resumed, key))
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


def resumed_totals(saved, world):
    """This rank's running totals of the interrupted epoch; with another number of processes than saved them,
    rank 0 carries their sum (the epoch's loss and accuracy stay right, the data order differs anyway)."""
    if len(saved) == world.size:
        return TrainTotals(**saved[world.rank])
    if not world.is_main:
        return TrainTotals()
    return TrainTotals(**{k: sum(s[k] for s in saved) if k != "seconds" else max(s[k] for s in saved)
                          for k in saved[0]})


def record_epoch(epoch, totals, val, optimizer, device, world, tracker, epochs):
    """Epoch `epoch`'s history record (loss and top-1 of its `totals` over all ranks, learning rate, speed, and
    its `val` scores when it was evaluated), also sent to TensorBoard and the log."""
    # the loss and top-1 of the whole data: the sums over all ranks
    sums = torch.tensor([totals.loss_sum, totals.correct, totals.count], dtype=torch.float64, device=device)
    loss_sum, correct, count = all_reduce_sum(sums, world).tolist()
    record = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1), "train_acc1": 100.0 * correct / max(count, 1),
              "lr": optimizer.param_groups[0]["lr"], "epoch_s": totals.seconds,
              "img_per_s": totals.count * world.size / max(totals.seconds, 1e-9)}
    if val:
        record.update(val_loss=val["loss"], val_acc1=val["acc1"], val_acc5=val["acc5"])
    tracker.scalars({"train/loss": record["train_loss"], "train/acc1": record["train_acc1"], "lr": record["lr"],
                     "perf/img_per_s": record["img_per_s"], "perf/epoch_s": record["epoch_s"],
                     **({"val/loss": val["loss"], "val/acc1": val["acc1"], "val/acc5": val["acc5"]} if val else {})},
                    epoch + 1)
    log.info(f"epoch {epoch + 1}/{epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc1']:.2f}  "
             + (f"val loss {val['loss']:.4f} acc1 {val['acc1']:.2f} acc5 {val['acc5']:.2f}  " if val else "")
             + f"{record['img_per_s']:,.0f} img/s  {record['epoch_s']:.1f}s")
    return record


def score_on_test(best, data, dataset_cfg, device):
    """Top-1 of `best` (best.pt, picked on the validation split) on the whole test split the way eval.py scores
    it (rebuilt from the file, float32, one process), so `test_acc1` is what `eval.py ckpt=best.pt` reports."""
    if not best.is_file():  # e.g. a run resumed from a last.pt copied without its best.pt
        log.warning("%s is missing, so the checkpoint picked on the validation split cannot be scored on the test "
                    "split: metrics.json has test_acc1 null (score it with eval.py once best.pt is back)", best)
        return None
    model = model_from_checkpoint(load_checkpoint(best), best).to(device)
    with build_test_loader(data, dataset_cfg, device=device) as loader:
        result = evaluate(model, loader, num_classes=len(data.classes), device=device, world=World(), amp=False)
    log.info("best.pt on the test split: top-1 %.2f%%, top-5 %.2f%%, %d images", result["acc1"], result["acc5"],
             result["num_samples"])
    return result["acc1"]


def log_kernel_skeleton(tracker, model, name):
    """ACNet's kernel-skeleton picture of the trained model (after fusion) in TensorBoard."""
    from experiment.figures import kernel_skeleton, kernel_skeleton_figure
    from nets import fuse_model

    layers = kernel_skeleton(fuse_model(model))
    if layers:  # a network without square KxK convs (K > 1) has no skeleton to draw
        tracker.figure("images/kernel_skeleton", kernel_skeleton_figure({f"{name} (fused)": layers}, layers_per_row=3))


class NonFiniteLoss(Exception):
    """`epoch` and `step` are 0-based like the loop's; the message counts from 1, as the logs do."""

    def __init__(self, epoch, step, steps_per_epoch):
        super().__init__(f"the training loss became non-finite (nan or inf) at epoch {epoch + 1}, step {step + 1} "
                         f"of {steps_per_epoch}")
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


def _check_finite(first_bad, epoch, steps_per_epoch):
    bad = int(first_bad.item())
    if bad >= 0:
        raise NonFiniteLoss(epoch, bad, steps_per_epoch)


class StopRequest:
    """Call it after each step: true once a stop signal arrived (on any rank, under torchrun).

    A second Ctrl-C stops at once. Under torchrun the ranks agree every `every` steps and at every epoch's end
    (`at_epoch_end`), so they all stop at the same point and none is left waiting in a collective."""

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

    def __call__(self, at_epoch_end=False):
        if not self.world.distributed:
            return self.signal is not None
        self.calls += 1
        if self.calls % self.every and not at_epoch_end:
            return False
        flag = torch.tensor([float(self.signal is not None)], device=self.device)
        stop = bool(all_reduce_sum(flag, self.world).item())
        if stop and self.signal is None:
            self.signal = signal.SIGTERM
        return stop
