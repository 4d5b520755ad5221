"""experiment/training.py: an epoch stopped after any step and continued gives the very same result; a
non-finite loss stops training with the epoch and step, counted as the logs count them; a resumed run keeps its
stored recipe, only harmless trainer options may change."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from experiment.data import DeviceLoader
from experiment.errors import UserError
from experiment.models import build_model
from experiment.optim import build_optimizer, build_scheduler
from experiment.training import NonFiniteLoss, TrainTotals, resumed_config, train_one_epoch


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


STORED = {"model": {"name": "alexnet_ac"}, "optimizer": {"lr": 0.1}, "resume": None,
          "trainer": {"epochs": 30, "device": "cuda", "save_every": 1}}


def command_line(**trainer):
    return OmegaConf.create({**STORED, "resume": "run/checkpoints/last.pt", "trainer": {**STORED["trainer"], **trainer}})


def test_trainer_options_other_than_the_length_apply_on_top():
    cfg = command_line(device="cpu", save_every=5)
    resumed = resumed_config(cfg, STORED, ["trainer.device=cpu", "trainer.save_every=5"])
    assert (resumed.trainer.device, resumed.trainer.save_every, resumed.trainer.epochs) == ("cpu", 5, 30)
    assert resumed.resume == "run/checkpoints/last.pt"


def test_another_length_is_refused_since_the_schedule_would_jump():
    with pytest.raises(UserError, match=r"trainer.epochs=40 differs from the run being resumed \(trainer.epochs was "
                                        r"30\): its learning-rate schedule spans 30 epochs and would jump"):
        resumed_config(command_line(epochs=40), STORED, ["trainer.epochs=40"])


def test_the_same_length_or_none_given_is_accepted():
    assert resumed_config(command_line(), STORED, ["trainer.epochs=30"]).trainer.epochs == 30
    assert resumed_config(command_line(), STORED, []).trainer.epochs == 30


def test_a_preset_is_refused_when_resuming():
    """experiment=<preset> is no config key: comparing it found nothing, and its values were silently ignored."""
    with pytest.raises(UserError, match=r"experiment=cifar_acnet names no single config value .* resume with only "
                                        r"trainer\.\* overrides"):
        resumed_config(command_line(), STORED, ["experiment=cifar_acnet"])


def test_changing_the_recipe_is_refused():
    cfg = OmegaConf.merge(command_line(), {"optimizer": {"lr": 0.2}})
    with pytest.raises(UserError, match=r"optimizer.lr=0.2 differs from the run being resumed \(optimizer.lr was 0.1\)"):
        resumed_config(cfg, STORED, ["optimizer.lr=0.2"])


def test_train_runs_on_a_config_composed_by_hydra(tmp_path):
    """`train(cfg, run_dir)` called directly on a config Hydra's public API composes, as train.py calls it:
    the run directory is claimed and marked, and holds its config, checkpoints and metrics."""
    import json

    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from experiment.run_dir import CLAIM, RUN_MARKER
    from experiment.training import train

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny", "trainer.epochs=1"])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    assert not (run_dir / CLAIM).exists()  # released when the run ends: the next job of a sweep may take it
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["epochs"], [h["epoch"] for h in metrics["history"]]) == (1, [1])
    assert metrics["best_acc1"] == metrics["history"][0]["val_acc1"]
    assert (run_dir / RUN_MARKER).is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    assert OmegaConf.load(run_dir / "config.yaml").trainer.epochs == 1


def test_a_signal_during_the_end_of_run_report_lets_it_finish_then_stops(tmp_path, monkeypatch):
    """A signal after the last step (a sweep's `timeout` or `scancel`) reaches the process while it scores best.pt
    and writes metrics.json: the run's own handler takes it, the report is finished, then the process stops with
    128 + the signal number. A handler of the caller's would be reached only if the run's were already gone."""
    import signal

    from conftest import TINY, read_metrics, run_main
    import experiment.training as training

    reached_caller = []
    previous = signal.signal(signal.SIGINT, lambda *_: reached_caller.append(True))
    draw = training.log_kernel_skeleton

    def signalled_while_reporting(*args):
        os.kill(os.getpid(), signal.SIGINT)  # metrics.json is written; the TensorBoard figure and summary follow
        return draw(*args)

    monkeypatch.setattr(training, "log_kernel_skeleton", signalled_while_reporting)
    try:
        proc = run_main("train.py", *TINY, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not reached_caller
    assert proc.returncode == 128 + signal.SIGINT
    assert "interrupted (SIGINT) after the last epoch; the run is complete" in proc.stdout
    assert "done: best" in proc.stdout and read_metrics(tmp_path / "run")["history"]


@pytest.mark.parametrize("when", ["step", "evaluation"])
def test_a_signal_with_an_epochs_last_step_or_its_evaluation_stops_at_that_epochs_end(tmp_path, monkeypatch, when):
    """A stop that comes with an epoch's last step or during its evaluation is honoured at that epoch's end: its
    last.pt is saved (whatever trainer.save_every says) and the run exits. Every step of a one-step epoch is its
    last, so such a run stops too rather than training on to its end."""
    import signal

    from conftest import TINY, read_metrics, run_main
    import experiment.training as training

    train_one_epoch, record_epoch = training.train_one_epoch, training.record_epoch

    def signalled(wrapped, on_epoch):
        def call(*args, **kwargs):
            if (kwargs["epoch"] if "epoch" in kwargs else args[0]) == on_epoch:
                os.kill(os.getpid(), signal.SIGTERM)
            return wrapped(*args, **kwargs)
        return call

    if when == "step":  # before epoch 2's one step: that step is the one the signal comes with
        monkeypatch.setattr(training, "train_one_epoch", signalled(train_one_epoch, on_epoch=1))
        stopped_after = 2
    else:  # epoch 1's history record is written after its evaluation
        monkeypatch.setattr(training, "record_epoch", signalled(record_epoch, on_epoch=0))
        stopped_after = 1
    one_step = [*TINY, "dataset.batch_size=1024", "trainer.epochs=3", "trainer.save_every=3"]  # 1,437 images
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    proc = run_main("train.py", *one_step, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-2000:]
    assert f"interrupted (SIGTERM) at epoch {stopped_after + 1}, step 0; saved {last}" in proc.stdout
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["history"])) == (stopped_after, 0, stopped_after)
    assert not (run_dir / "metrics.json").exists()

    monkeypatch.setattr(training, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(training, "record_epoch", record_epoch)
    run_main("train.py", f"resume={last}")
    assert [h["epoch"] for h in read_metrics(run_dir)["history"]] == [1, 2, 3]


def test_ranks_agree_on_a_stop_every_few_steps_and_at_every_epochs_end(monkeypatch):
    """Under torchrun a rank stops only when all agree (else the others would wait for it in a collective): the
    flags are summed every `every` steps and at each epoch's end, so a one-step epoch stops within an epoch."""
    import signal

    import experiment.training as training
    from experiment.distributed import World
    from experiment.training import StopRequest

    reduced = []  # the flags this rank sent to the all-reduce; the other rank's is 0 here
    monkeypatch.setattr(training, "all_reduce_sum", lambda flag, world: reduced.append(flag.item()) or flag)
    with StopRequest(World(rank=0, size=2), torch.device("cpu"), every=3) as stop:
        assert [stop() for _ in range(4)] == [False] * 4 and reduced == [0.0]  # agreed after step 3 only
        os.kill(os.getpid(), signal.SIGTERM)
        assert not stop() and reduced == [0.0]  # step 5: no agreement due, so this rank does not stop alone
        assert stop(at_epoch_end=True) and reduced == [0.0, 1.0]
