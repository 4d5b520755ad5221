"""One training run, start to finish: data, model, optimizer, the epoch loop, checkpoints, reports.

train.py calls `train` once per run; it lives here, not in the script, so that launchers that ship the task
function to another machine (Hydra's SLURM launcher pickles it) reach it by reference.
"""
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from experiment import rundir
from experiment.checkpoint import link_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from experiment.complexity import count_parameters
from experiment.config_checks import check_train_config
from experiment.datasets import load_dataset, report_skipped_images
from experiment.distributed import World, all_gather_object, local_main_first, unwrap, wrap_ddp
from experiment.engine import NonFiniteLoss, TrainTotals, evaluate, reduce_train_totals, train_one_epoch
from experiment.errors import UserError
from experiment.interrupt import StopRequest
from experiment.loaders import build_loaders, build_test_loader
from experiment.models import build_model, check_input_fits, model_from_checkpoint
from experiment.optim import build_optimizer, build_scheduler
from experiment.resume import resumed_config
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
    if world.is_main:
        rundir.claim_run_dir(run_dir, resuming=cfg.resume if resume else None)
    if resume and resume["epoch"] >= cfg.trainer.epochs:
        raise UserError(f"{cfg.resume} is from a finished run ({resume['epoch']} of {cfg.trainer.epochs} "
                        f"epochs): nothing to resume; its results are in {rundir.run_dir_of_checkpoint(cfg.resume)}")
    if world.is_main:
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
                                stop.signal.name, epoch + 1, step, path, rundir.resume_command(path))
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
    from experiment.figures import kernel_skeleton, kernel_skeleton_figure
    from nets import fuse_model

    layers = kernel_skeleton(fuse_model(model))
    if layers:  # a network without square KxK convs (K > 1) has no skeleton to draw
        tracker.figure("images/kernel_skeleton", kernel_skeleton_figure({f"{name} (fused)": layers}, layers_per_row=3))
