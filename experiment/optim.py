"""Optimizer and learning-rate schedule.

Weight decay applies to conv and linear weights only: decaying BatchNorm scales (three per ACB) and biases
would pull the branch BNs of an ACB towards zero and penalise the AC model more than the baseline.
The schedule is a function of the optimizer step, so it resumes exactly from a step count.
"""
import math
from types import SimpleNamespace

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiment.errors import UserError


def parameter_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # BN scales/shifts and biases are 1-D
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, cfg):
    """`cfg` is the `optimizer` config section: a torch.optim class as `_target_` and its options."""
    try:
        optimizer_class = instantiate(cfg, _partial_=True)  # params passed after: Hydra would wrap them in a DictConfig
        return optimizer_class(parameter_groups(model, cfg.weight_decay))
    except Exception as e:
        raise UserError(f"cannot build the optimizer from {dict(cfg)}: {e}") from None


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
    raise UserError(f"unknown scheduler {cfg.name!r}; choose cosine, onecycle or multistep")


def build_scheduler(optimizer, cfg, epochs, steps_per_epoch):
    """A per-step LambdaLR following `lr_factor`; `cfg` is the `scheduler` config section."""
    total = epochs * steps_per_epoch
    # a plain namespace: the lambda runs every step, and reading an OmegaConf node costs ~50x more
    cfg = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg
    lr_factor(cfg, 0, total, steps_per_epoch)  # an unknown name fails here, not after the first epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total, steps_per_epoch))
