"""experiment/engine.py: an epoch stopped after any step and continued gives the very same result; a
non-finite loss stops training with the epoch and step, counted as the logs count them."""
import pytest
import torch
from omegaconf import OmegaConf

from experiment.engine import NonFiniteLoss, TrainTotals, train_one_epoch
from experiment.loaders import DeviceLoader
from experiment.models import build_model
from experiment.optim import build_optimizer, build_scheduler

MODEL = OmegaConf.create({"name": "alexnet_ac", "arch": "AlexNetAC", "width": 0.125, "classifier_width": 16,
                          "dropout": 0.5})  # dropout on: the global RNG matters
OPTIM = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4})
SCHED = OmegaConf.create({"name": "cosine", "warmup_epochs": 0, "warmup_start_factor": 0.1, "min_factor": 0.0})


def setup(lr=0.05):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (96,), generator=g)
    loader = DeviceLoader(images, labels, 8, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", seed=3)
    torch.manual_seed(0)
    model = build_model(MODEL, 4)
    optimizer = build_optimizer(model, OmegaConf.merge(OPTIM, {"lr": lr}))
    scheduler = build_scheduler(optimizer, SCHED, 2, len(loader))
    torch.manual_seed(1)
    return model, optimizer, scheduler, loader


def stop_after(n):
    calls = iter(range(10**9))
    return lambda: next(calls) + 1 >= n


@pytest.mark.parametrize("stop_at", [1, 5, 11])
def test_epoch_stopped_and_continued_equals_one_run(stop_at):
    model, optimizer, scheduler, loader = setup()
    straight, _ = train_one_epoch(model, loader, optimizer, scheduler, epoch=0, device="cpu")
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler, loader = setup()
    totals, step = train_one_epoch(model, loader, optimizer, scheduler, epoch=0, device="cpu",
                                   stop_requested=stop_after(stop_at))
    assert step == stop_at < len(loader)
    # what a checkpoint keeps of the totals, through a plain dict
    totals = TrainTotals(**totals.state_dict())
    totals, step = train_one_epoch(model, loader, optimizer, scheduler, epoch=0, device="cpu", start_step=step,
                                   totals=totals)
    assert step == len(loader)
    assert (totals.loss_sum, totals.correct, totals.count) == (straight.loss_sum, straight.correct, straight.count)
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


def test_non_finite_loss_names_epoch_and_step_from_one():
    model, optimizer, scheduler, loader = setup(lr=1e9)
    with pytest.raises(NonFiniteLoss) as info:
        train_one_epoch(model, loader, optimizer, scheduler, epoch=4, device="cpu", log_every=1000)
    e = info.value
    assert e.epoch == 4 and 0 < e.step < len(loader)
    assert str(e) == f"the training loss became non-finite (nan or inf) at epoch 5, step {e.step + 1} of {len(loader)}"
