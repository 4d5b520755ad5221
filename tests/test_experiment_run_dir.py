"""experiment/run_dir.py: a run never writes into another run's directory, two runs never share one, an unusable
run directory is one line; an output never replaces an input, by name or through a link, nor a file the tool did
not write."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from experiment import run_dir as run_dir_module
from experiment.checkpoint import save_checkpoint
from experiment.errors import UserError
from experiment.run_dir import (CLAIM, RUN_MARKER, check_outputs, check_run_dir_free, claim_run_dir,
                                is_deploy_checkpoint, is_eval_report, release_run_dir, run_dir_of_checkpoint)
from test_experiment_checkpoint import make_state


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


def test_run_dir_of_checkpoint(tmp_path):
    assert run_dir_of_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt") == (tmp_path / "run").resolve()
    assert run_dir_of_checkpoint(tmp_path / "x.pt") == tmp_path.resolve()


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
    code = f"from experiment.run_dir import claim_run_dir; claim_run_dir({str(tmp_path)!r}); print('claimed')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "claimed" and not (tmp_path / CLAIM).exists()


def test_a_run_directory_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit:
        run_dir_module._run_dir(None, tmp_path / "file" / "run")
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: cannot use {tmp_path / 'file' / 'run'} as the run directory")


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path, capsys):
    name = tmp_path / ("x" * 300)  # passes the folder check; making it fails (most file systems allow 255 bytes)
    with pytest.raises(SystemExit) as exit:
        run_dir_module._run_dir(None, name)
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
        run_dir_module._run_dir(str(folder / "checkpoints" / "last.pt"), "unused")
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: cannot use {folder} as the run directory (its name holds $")
