"""experiment/checkpoint.py: atomic writes, safe reads, one clear UserError for every unusable file; a run never
writes into another run's directory and the printed resume command works; an output never replaces an input, by
name or through a link."""
import json
import os
import pickle
import shlex
import socket
import subprocess
import sys

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import ROOT
from experiment import checkpoint as ckpt_module
from experiment.checkpoint import (CLAIM, RUN_MARKER, TRAINING_KEYS, CheckpointSaver, atomic_write, check_outputs,
                                   check_run_dir_free, claim_run_dir, is_deploy_checkpoint, is_eval_report,
                                   load_checkpoint, release_run_dir, resume_command, rng_state,
                                   run_dir_of_checkpoint, save_checkpoint, set_rng_state)
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
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path)  # a directory is not a checkpoint either


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


def make_run(path, checkpoint=True):
    """A run directory as train.py leaves one: its marker, a log, and (with `checkpoint`) checkpoints/last.pt."""
    path.mkdir(parents=True)
    (path / RUN_MARKER).write_text("made by train.py\n")
    (path / "train.log").write_text("epoch 1/3 ...\n")
    if checkpoint:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "last.pt").write_bytes(b"x")
    return path


def test_absent_and_empty_directories_are_free(tmp_path):
    check_run_dir_free(tmp_path / "new", None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / CLAIM).write_text("1 host\n")  # a claim is no content
    check_run_dir_free(tmp_path / "empty", None)


@pytest.mark.parametrize("content, says", [
    ("config.yaml", "is not empty and was not made by train.py; a new run starts only in an empty or new folder"),
    ("checkpoints", "is not empty and was not made by train.py"),
    ("train.log", "is not empty and was not made by train.py"),
    ("run", r"already holds a run; choose another hydra.run.dir, or continue that run with resume=.*/last.pt"),
    ("run without checkpoint", "already holds a run that saved no checkpoint"),
])
def test_a_new_run_takes_only_an_empty_directory(tmp_path, content, says):
    folder = tmp_path / "folder"
    if content.startswith("run"):
        make_run(folder, checkpoint=content == "run")
    else:
        folder.mkdir()
        (folder / content).mkdir() if content == "checkpoints" else (folder / content).write_text("mine\n")
    with pytest.raises(UserError, match=says):
        check_run_dir_free(folder, None)


def test_resuming_may_write_only_into_its_own_run(tmp_path):
    mine, other = make_run(tmp_path / "mine"), make_run(tmp_path / "other")
    check_run_dir_free(mine, str(mine / "checkpoints" / "last.pt"))
    check_run_dir_free(tmp_path / "fresh", str(mine / "checkpoints" / "last.pt"))
    with pytest.raises(UserError, match="already holds another run .*leave out hydra.run.dir"):
        check_run_dir_free(other, str(mine / "checkpoints" / "last.pt"))


@pytest.mark.parametrize("layout", ["copied beside other files", "copied into a checkpoints folder"])
def test_a_checkpoint_copied_out_of_its_run_does_not_resume_in_place(tmp_path, layout):
    folder = tmp_path / "downloads"
    last = folder / ("checkpoints/last.pt" if "checkpoints" in layout else "last.pt")
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    (folder / "notes.txt").write_text("mine\n")
    says = f"{folder} is not a run directory train.py made .*pass hydra.run.dir=<a new folder>"
    with pytest.raises(UserError, match=says):
        check_run_dir_free(folder, str(last))
    check_run_dir_free(tmp_path / "new", str(last))  # what the message advises


def test_a_claim_marks_the_directory_and_a_refused_one_leaves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = claim_run_dir(run_dir)
    assert (run_dir / RUN_MARKER).is_file()
    release_run_dir(lock)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "config.yaml").write_text("mine\n")
    with pytest.raises(UserError, match="not made by train.py"):
        claim_run_dir(tmp_path / "user")
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == ["config.yaml"]


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


def test_run_dir_of_checkpoint(tmp_path):
    assert run_dir_of_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt") == (tmp_path / "run").resolve()
    assert run_dir_of_checkpoint(tmp_path / "x.pt") == tmp_path.resolve()


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


def test_a_second_claim_on_a_directory_in_use_is_refused(tmp_path):
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / CLAIM).write_text(f"{running.pid} {socket.gethostname()}\n")
        with pytest.raises(UserError, match=f"is in use by a running train.py \\(process {running.pid}"):
            claim_run_dir(tmp_path)
        (tmp_path / CLAIM).write_text("1 some-other-host\n")  # cannot tell whether it runs: it counts
        with pytest.raises(UserError, match="process 1 on some-other-host"):
            claim_run_dir(tmp_path)
    finally:
        running.kill()
        running.wait()
    assert not (tmp_path / "config.yaml").exists()


def test_a_claim_left_by_a_killed_run_does_not_block(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / CLAIM).write_text(f"{dead} {socket.gethostname()}\n")
    (tmp_path / RUN_MARKER).write_text("made by train.py\n")  # the killed run's directory
    (tmp_path / "checkpoints").mkdir()
    stale_tmp = tmp_path / "checkpoints" / f".last.pt.{dead}.abcdefgh.tmp"
    stale_tmp.write_bytes(b"half a checkpoint")
    lock = claim_run_dir(tmp_path, resuming=tmp_path / "checkpoints" / "last.pt")
    assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert not stale_tmp.exists()  # a killed save's leftover goes when its run continues
    release_run_dir(lock)
    assert not lock.exists()


def test_the_claim_goes_when_the_process_ends(tmp_path):
    code = f"from experiment.checkpoint import claim_run_dir; claim_run_dir({str(tmp_path)!r}); print('claimed')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "claimed" and not (tmp_path / CLAIM).exists()


def test_a_run_directory_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit:
        ckpt_module._run_dir(None, tmp_path / "file" / "run")
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: cannot use {tmp_path / 'file' / 'run'} as the run directory")


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path, capsys):
    name = tmp_path / ("x" * 300)  # passes the folder check; making it fails (most file systems allow 255 bytes)
    with pytest.raises(SystemExit) as exit:
        ckpt_module._run_dir(None, name)
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: cannot use {name} as the run directory (File name too long); "
                                               f"pass a writable hydra.run.dir")


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"checkpoint")
    return path


def test_an_output_beside_the_input_is_fine(ckpt):
    assert check_outputs([ckpt.with_name("last.eval.json"), None], [ckpt, None]) == [ckpt.with_name("last.eval.json")]


@pytest.mark.parametrize("alias", ["same", "relative", "symlink", "hardlink", "symlinked folder"])
def test_an_output_that_is_an_input_is_refused(ckpt, tmp_path, monkeypatch, alias):
    if alias == "same":
        out = ckpt
    elif alias == "relative":
        monkeypatch.chdir(ckpt.parent)
        out = ckpt.parent / ".." / "checkpoints" / "last.pt"
    elif alias == "symlink":
        out = tmp_path / "link.pt"
        out.symlink_to(ckpt)
    elif alias == "hardlink":
        out = tmp_path / "hard.pt"
        os.link(ckpt, out)
    else:
        (tmp_path / "ln").symlink_to(ckpt.parent)
        out = tmp_path / "ln" / "last.pt"
    with pytest.raises(UserError, match="^out=.* would overwrite the input .*last.pt; pass another out="):
        check_outputs([out], [ckpt])
    assert ckpt.read_bytes() == b"checkpoint"


def test_two_outputs_on_one_file_are_refused(tmp_path, ckpt):
    with pytest.raises(UserError, match="would overwrite another output"):
        check_outputs([tmp_path / "m.onnx", tmp_path / "m.onnx"], [ckpt])


def test_an_output_under_a_file_or_onto_a_folder_is_refused(tmp_path, ckpt):
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_outputs([ckpt / "x.json"], [])
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_outputs([ckpt.parent / "last.pt" / "deeper" / "x.json"], [])
    with pytest.raises(UserError, match="it is a folder"):
        check_outputs([ckpt.parent], [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_an_output_in_a_read_only_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(UserError, match="is not writable"):
        check_outputs([tmp_path / "ro" / "sub" / "x.json"], [])




def test_an_existing_output_is_replaced_only_when_the_tool_wrote_it(tmp_path, ckpt):
    out = tmp_path / "metrics.json"
    out.write_text('{"best_acc1": 90.0}')
    with pytest.raises(UserError, match="^out=.*metrics.json would replace a file this tool did not write"):
        check_outputs([out], [ckpt], replaceable=is_eval_report)
    out.write_text(json.dumps({"checkpoint": "x.pt", "acc1": 1.0, "acc5": 5.0, "num_samples": 3}))
    assert check_outputs([out], [ckpt], replaceable=is_eval_report) == [out]


def test_a_deploy_checkpoint_is_recognised(tmp_path):
    training = save_checkpoint(make_state(), tmp_path / "last.pt")
    deploy = save_checkpoint({"model": {"w": torch.zeros(1)}, "config": {}, "deploy": True}, tmp_path / "d.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert is_deploy_checkpoint(deploy)
    assert not is_deploy_checkpoint(training) and not is_deploy_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="would replace a file this tool did not write"):
        check_outputs([training], [deploy], replaceable=is_deploy_checkpoint)


def test_resuming_a_checkpoint_from_a_folder_named_with_dollar_brace_is_one_line(tmp_path, capsys):
    folder = tmp_path / "a ${x}"
    with pytest.raises(SystemExit) as exit:
        ckpt_module._run_dir(str(folder / "checkpoints" / "last.pt"), "unused")
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: cannot use {folder} as the run directory (its name holds $")
