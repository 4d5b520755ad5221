"""Eager and torch.compile'd training from one seed, step for step: for test_experiment_bench's slow test on the
CPU and the loss stage of gpu_check.py on CUDA."""
import argparse

import torch

from experiment.bench import NUM_CLASSES, _compiled, fake_loader, model_config, training_config
from experiment.models import build_model
from experiment.optim import build_optimizer, build_scheduler
from experiment.training import train_one_epoch


def compiled_loss_curve(kind, *, compile_mode=None, steps=5, batch_size=32, width=0.25, classifier_width=64,
                        image_size=32, device="cpu", seed=0):
    """(per-step training losses, trained model) of `steps` one-step epochs of train_one_epoch, eager
    (compile_mode None) or compiled, float32. Inductor draws dropout masks from its own generator unless
    `fallback_random`, so it is set here: with it, eager and compiled see the same masks and the two curves
    can be compared."""
    import torch._inductor.config as inductor_config

    device = torch.device(device)
    args = argparse.Namespace(layout="cifar", width=width, classifier_width=classifier_width, dropout=0.5)
    optimizer_cfg, scheduler_cfg, _ = training_config()
    loader = fake_loader(batch_size, 1, image_size, device, seed=seed)
    torch.manual_seed(seed)
    model = build_model(model_config(kind, args), NUM_CLASSES).to(device)
    optimizer = build_optimizer(model, optimizer_cfg)
    scheduler = build_scheduler(optimizer, scheduler_cfg, steps, 1)
    torch._dynamo.reset()
    fast = _compiled(model, compile_mode) if compile_mode else model
    losses = []
    with inductor_config.patch(fallback_random=True):
        for epoch in range(steps):
            torch.manual_seed(seed + 1 + epoch)
            totals, _ = train_one_epoch(fast, loader, optimizer, scheduler, epoch=epoch, device=device)
            losses.append(totals.loss_sum / totals.count)
    return losses, model
