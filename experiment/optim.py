"""Optimizer and learning-rate schedule.

Weight decay applies to conv and linear weights only: decaying BatchNorm scales (three per ACB) and biases
would pull the branch BNs of an ACB towards zero and penalise the AC model more than the baseline.
The schedule is a function of the optimizer step, so it resumes exactly from a step count.

A module of its own, below checkpoint.py: a checkpoint's stored config may name only these optimizers and
schedules, and checking that must not import the training loop (which loads checkpoints).
"""
import math
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from experiment.errors import UserError, choose


def parameter_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # BN scales/shifts and biases are 1-D
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# A closed registry keyed by the `_target_` the config files name: a checkpoint's stored config must not be
# able to name any callable (Hydra's instantiate would import and call whatever it names).
OPTIMIZERS = {"torch.optim.SGD": torch.optim.SGD, "torch.optim.AdamW": torch.optim.AdamW}


def build_optimizer(model, cfg):
    """`cfg` is the `optimizer` config section: `_target_`, one of OPTIMIZERS, and that class's options."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    target = cfg.pop("_target_", None)
    optimizer = choose(OPTIMIZERS, target, "optimizer._target_",
                       f"optimizer._target_={target!r} is not an optimizer this repository builds; choose "
                       f"optimizer=sgd or optimizer=adamw ({', '.join(OPTIMIZERS)})")
    weight_decay = cfg.pop("weight_decay", 0.0)
    try:
        return optimizer(parameter_groups(model, weight_decay), **cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build the optimizer from {dict(cfg, _target_=target)}: {e}") from None


def lr_factor(cfg, step, total_steps, steps_per_epoch):
    """The factor on the base learning rate at `step` (0-based) of `total_steps`."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup
    return choose(SCHEDULES, cfg.name, "scheduler")(cfg, (step - warmup) / max(1, total_steps - warmup))


def _cosine(cfg, progress):
    return cfg.min_factor + (1 - cfg.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def _onecycle(cfg, progress):
    """A linear ramp up to the peak, then cosine annealing to min_factor (as torch's OneCycleLR)."""
    if progress < cfg.pct_start:
        return cfg.start_factor + (1 - cfg.start_factor) * progress / cfg.pct_start
    return _cosine(cfg, (progress - cfg.pct_start) / (1 - cfg.pct_start))


def _multistep(cfg, progress):
    return cfg.gamma ** sum(progress >= m for m in cfg.milestones)


# scheduler.name -> the factor on the base learning rate after warm-up, at `progress` in [0, 1] of the rest
SCHEDULES = {"cosine": _cosine, "onecycle": _onecycle, "multistep": _multistep}


def build_scheduler(optimizer, cfg, epochs, steps_per_epoch):
    """A per-step LambdaLR following `lr_factor`; `cfg` is the `scheduler` config section."""
    total = epochs * steps_per_epoch
    # a plain namespace: the lambda runs every step, and reading an OmegaConf node costs ~50x more
    cfg = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg
    choose(SCHEDULES, cfg.name, "scheduler")  # an unknown name fails here, not after the warm-up
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total, steps_per_epoch))
