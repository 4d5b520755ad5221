"""experiment/checkpoint.py: atomic writes, safe reads, one clear UserError for every unusable file; the printed
resume command works (run directories and output paths: test_experiment_run_dir.py)."""
import os
import pickle
import shlex
import subprocess
import sys

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import ROOT
from experiment import checkpoint as ckpt_module
from experiment.checkpoint import (TRAINING_KEYS, CheckpointSaver, atomic_write, load_checkpoint, resume_command,
                                   rng_state, save_checkpoint, set_rng_state)
from experiment.errors import UserError


def make_state(value=1.0):
    return {"model": {"w": torch.full((3, 3), value), "b": torch.zeros(3)}, "num_classes": 3,
            "config": {"model": {"name": "alexnet", "arch": "AlexNet"}, "dataset": {"name": "digits"},
                       "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1}, "scheduler": {"name": "cosine"}},
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 5}, "scaler": None,
            "epoch": 1, "step": 0, "best_acc1": 12.5, "history": [{"epoch": 1, "val_acc1": 12.5}],
            "rng": [rng_state()], "train_totals": None, "classes": ["a", "b", "c"]}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class Payload:
    """Unpickling this creates `path`: a stand-in for a checkpoint that carries code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_round_trip_is_plain_and_weights_only(tmp_path):
    state = make_state()
    path = save_checkpoint(state, tmp_path / "deep" / "dir" / "last.pt")
    assert path == tmp_path / "deep" / "dir" / "last.pt"
    loaded = load_checkpoint(path, training=True)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["history"] == state["history"] and loaded["config"] == state["config"]
    torch.load(path, weights_only=True)  # what any user can do with it
    assert leftovers(path.parent) == []


def test_saved_file_is_an_ordinary_file_not_private(tmp_path):
    path = save_checkpoint(make_state(), tmp_path / "last.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def half_then_fail(error):
    def fake_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error
    return fake_save


DISK_FULL = [OSError(28, "No space left on device"),  # what a plain write reports
             RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")]  # torch.save's


@pytest.mark.parametrize("error", DISK_FULL)
def test_failed_write_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch, error):
    path = save_checkpoint(make_state(1.0), tmp_path / "last.pt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_then_fail(error))
    with pytest.raises(UserError, match=r"could not write checkpoint .*last\.pt.*previous .* is intact.*disk space"):
        save_checkpoint(make_state(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((3, 3), 1.0))
    assert leftovers(tmp_path) == []


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", half_then_fail(OSError(28, "No space left on device")))
    with pytest.raises(UserError, match="nothing was written"):
        save_checkpoint(make_state(), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_is_reraised_and_cleaned_up(tmp_path, monkeypatch):
    path = save_checkpoint(make_state(1.0), tmp_path / "last.pt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_then_fail(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make_state(2.0), path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_crash_between_write_and_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(make_state(1.0), tmp_path / "last.pt")
    before = path.read_bytes()

    def no_rename(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckpt_module.os, "replace", no_rename)
    with pytest.raises(UserError, match="is intact"):
        save_checkpoint(make_state(2.0), path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; pass the path of a \.pt file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_folder_is_named_as_one_with_the_checkpoint_to_pass(tmp_path):
    """It used to say "checkpoint D does not exist" of a folder that does."""
    with pytest.raises(UserError, match=rf"^checkpoint {tmp_path} is a folder, not a file; pass the path of a \.pt"):
        load_checkpoint(tmp_path)
    save_checkpoint(make_state(1.0), tmp_path / "checkpoints" / "best.pt")
    for folder in (tmp_path, tmp_path / "checkpoints"):  # a run directory, or its checkpoints/ folder
        with pytest.raises(UserError, match=rf"is a folder, not a file; pass {tmp_path / 'checkpoints' / 'best.pt'}$"):
            load_checkpoint(folder)
    with pytest.raises(UserError, match=r"is a folder, not a file; pass .*/checkpoints/last\.pt$"):  # resume= of it
        load_checkpoint(tmp_path, training=True)


@pytest.mark.parametrize("content, says", [
    (b"", "the file is empty"),
    (os.urandom(4096), "not a readable PyTorch checkpoint"),
    (b"hello, I am a text file\n", "not a readable PyTorch checkpoint"),
    (b"PK\x03\x04" + b"\0" * 100, "not a readable PyTorch checkpoint"),  # a broken zip archive
])
def test_files_that_are_not_checkpoints(tmp_path, content, says):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=says) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint(tmp_path):
    path = save_checkpoint(make_state(), tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("obj", [torch.zeros(3), {"model": {"w": torch.zeros(1)}}, {"config": {}, "model": {}},
                                 [1, 2, 3], {"model": torch.zeros(1), "config": {"model": {}}, "num_classes": 3}])
def test_torch_files_that_are_not_checkpoints_of_this_repository(tmp_path, obj):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(UserError, match="not a checkpoint of this repository"):
        load_checkpoint(path)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({**make_state(), "model": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UserError, match="refusing to load .*pickled Python objects, which could run code"):
        load_checkpoint(path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_raw_pickles_with_code_are_refused(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(marker), "config": {}}, f, protocol=protocol)
    with pytest.raises(UserError, match="refusing to load|not a readable PyTorch checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resuming_needs_the_training_state(tmp_path):
    deploy = {k: v for k, v in make_state().items() if k not in TRAINING_KEYS}
    path = save_checkpoint({**deploy, "deploy": True}, tmp_path / "best_deploy.pt")
    assert load_checkpoint(path)["deploy"] is True  # fine for eval.py
    with pytest.raises(UserError, match="cannot be resumed \\(a deploy checkpoint\\).*last.pt"):
        load_checkpoint(path, training=True)
    partial = {k: v for k, v in make_state().items() if k != "optimizer"}
    path = save_checkpoint(partial, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="missing optimizer"):
        load_checkpoint(path, training=True)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(123)
    state = make_state()
    state["rng"] = [rng_state()]
    expected = torch.rand(5)
    path = save_checkpoint(state, tmp_path / "last.pt")
    torch.manual_seed(999)
    set_rng_state(load_checkpoint(path)["rng"][0])
    assert torch.equal(torch.rand(5), expected)


def test_torch_2_14_pickle_refusal_is_recognised(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({**make_state(), "model": Payload(tmp_path / "PWNED")}, path)
    with pytest.raises(UserError, match="^refusing to load "):
        load_checkpoint(path)


@pytest.mark.parametrize("target", ["os.system", "numpy.savez"])
@pytest.mark.parametrize("key", ["optimizer._target_", "model.arch", "dataset.name"])
def test_a_stored_config_naming_code_is_refused(tmp_path, monkeypatch, target, key):
    monkeypatch.chdir(tmp_path)
    state = make_state()
    section, name = key.split(".")
    state["config"][section] = {**state["config"][section], name: target, "file": "marker"}
    path = save_checkpoint(state, tmp_path / "crafted.pt")
    with pytest.raises(UserError, match=f"{key}='{target}' stored in .*crafted.pt is not valid"):
        load_checkpoint(path, training=True)
    if section != "optimizer":  # eval.py and fuse.py load without training state
        with pytest.raises(UserError, match=f"{key}='{target}'"):
            load_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.pt"]


@pytest.mark.parametrize("key, value", [("epoch", "3"), ("step", -1), ("rng", []), ("history", {"a": 1}),
                                        ("best_acc1", "99"), ("train_totals", 5)])
def test_edited_resume_state_is_refused(tmp_path, key, value):
    path = save_checkpoint({**make_state(), key: value}, tmp_path / "last.pt")
    with pytest.raises(UserError, match=f"cannot be resumed: its {key} entry"):
        load_checkpoint(path, training=True)


def test_a_killed_save_leaves_a_temporary_file_that_the_next_save_removes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = [tmp_path / f".last.pt.{dead}.abcd1234.tmp", tmp_path / ".last.pt.k3j4l5m6.tmp"]
    live = tmp_path / f".last.pt.{os.getpid()}.zzzz.tmp"  # a save in progress in a running process
    other = tmp_path / f".best.pt.{dead}.abcd.tmp"  # another file's: its own next save removes it
    for p in (*stale, live, other):
        p.write_bytes(b"half")
    save_checkpoint(make_state(), tmp_path / "last.pt")
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()


def test_a_failed_first_save_leaves_no_checkpoints_folder(tmp_path):
    def fail(f):
        raise OSError(27, "File too large")
    with pytest.raises(UserError, match="nothing was written"):
        atomic_write(tmp_path / "run" / "checkpoints" / "last.pt", fail, what="checkpoint")
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept" / "checkpoints").mkdir(parents=True)  # a folder that was there before stays
    with pytest.raises(UserError):
        atomic_write(tmp_path / "kept" / "checkpoints" / "last.pt", fail)
    assert (tmp_path / "kept" / "checkpoints").is_dir()


def test_a_failed_save_advises_resuming_only_from_a_checkpoint_that_exists(tmp_path, monkeypatch):
    saver = CheckpointSaver(tmp_path / "checkpoints", save_every=1, epochs=3)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(UserError, match="start the run again with another hydra.run.dir") as first:
            saver.save_epoch(1, True, make_state)
    assert "resume=" not in str(first.value) and not (tmp_path / "checkpoints").exists()
    saver.save_epoch(1, True, make_state)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(UserError, match=r"the previous .*last.pt is intact.*then resume with: python .*resume="):
            saver.save_epoch(2, False, make_state)


def test_resume_command_is_quoted(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/repo dir/train.py", "trainer.epochs=5"])
    cmd = resume_command("/runs/my run/checkpoints/last.pt")
    assert shlex.split(cmd) == ["/repo dir/train.py", "resume='/runs/my run/checkpoints/last.pt'"]


def test_resume_command_names_train_py_under_a_launcher(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/submitit/core/_submit.py", "/jobs"])
    script, resume = shlex.split(resume_command("/runs/r/checkpoints/last.pt"))
    assert script == str(ROOT / "train.py") and resume == "resume='/runs/r/checkpoints/last.pt'"


@pytest.mark.parametrize("path", ["/home/José/run,1/checkpoints/last.pt", "/tmp/it's [x]=y/a b/last.pt",
                                  "/tmp/back\\slash\\'/last.pt", "/tmp/end\\", "/data ${HOME}/run/last.pt",
                                  "/data\\${x}/last.pt"])
def test_resume_command_survives_the_shell_and_hydra(path):
    _, override = shlex.split(resume_command(path))
    value = OverridesParser.create().parse_override(override).value()
    assert OmegaConf.create({"resume": value}).resume == path  # what train.py's config then holds
