"""Learning-rate schedules and weight-decay groups."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from experiment.errors import UserError
from experiment.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups
from nets import AlexNetAC


def schedule(name, **kw):
    base = {"name": name, "warmup_epochs": 0, "warmup_start_factor": 0.1, "min_factor": 0.0}
    return OmegaConf.create({**base, **kw})


def test_cosine_runs_from_one_to_min_factor():
    cfg = schedule("cosine", min_factor=0.1)
    assert lr_factor(cfg, 0, 100, 10) == 1.0
    assert lr_factor(cfg, 50, 100, 10) == pytest.approx(0.55)
    assert lr_factor(cfg, 100, 100, 10) == pytest.approx(0.1)


def test_warmup_is_linear_then_hands_over():
    cfg = schedule("cosine", warmup_epochs=1, warmup_start_factor=0.2)
    assert [lr_factor(cfg, s, 100, 10) for s in (0, 5)] == [pytest.approx(0.2), pytest.approx(0.6)]
    assert lr_factor(cfg, 10, 100, 10) == 1.0


def test_onecycle_peaks_at_pct_start():
    cfg = schedule("onecycle", pct_start=0.25, start_factor=0.04)
    values = [lr_factor(cfg, s, 100, 10) for s in range(101)]
    assert values[0] == pytest.approx(0.04) and max(values) == values[25] == 1.0 and values[-1] == pytest.approx(0)


def test_multistep_decays_at_fractions():
    cfg = schedule("multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(cfg, s, 100, 10) for s in (49, 50, 75)] == [1.0, pytest.approx(0.1), pytest.approx(0.01)]


def test_unknown_schedule_fails_at_build_time():
    model = AlexNetAC(width=0.125, classifier_width=8)
    opt = build_optimizer(model, OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.1, "weight_decay": 0.0}))
    with pytest.raises(UserError, match="unknown scheduler 'bogus'"):
        build_scheduler(opt, schedule("bogus"), 2, 10)


def test_scheduler_steps_follow_lr_factor():
    model = AlexNetAC(width=0.125, classifier_width=8)
    opt = build_optimizer(model, OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.2, "weight_decay": 1e-4}))
    sched = build_scheduler(opt, schedule("cosine"), epochs=2, steps_per_epoch=5)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_skips_batchnorm_and_biases():
    model = AlexNetAC(width=0.125, classifier_width=8)
    decay, no_decay = parameter_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    bn = {id(m.weight) for m in model.modules() if "BatchNorm" in type(m).__name__}
    assert bn and bn <= {id(p) for p in no_decay["params"]}
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("target", ["torch.optim.SGD", "torch.optim.AdamW"])
def test_the_two_shipped_optimizer_targets_build(target):
    opt = build_optimizer(torch.nn.Linear(2, 2), OmegaConf.create({"_target_": target, "lr": 0.1,
                                                                   "weight_decay": 1e-4}))
    assert type(opt).__name__ == target.rsplit(".", 1)[1] and opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("target", ["numpy.savez", "os.system", "builtins.eval", "torch.optim.LBFGS"])
def test_an_optimizer_target_outside_the_registry_never_runs(tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    cfg = {"_target_": target, "lr": str(tmp_path / "marker"), "weight_decay": 0.0, "file": "marker"}
    with pytest.raises(UserError, match="is not an optimizer this repository builds"):
        build_optimizer(torch.nn.Linear(2, 2), cfg)
    assert list(tmp_path.iterdir()) == []
