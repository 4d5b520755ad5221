"""experiment/rundir.py: a run never writes into another run's directory; the printed resume command works."""
import os
import shlex
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from experiment.errors import UserError
from hydra.core.override_parser.overrides_parser import OverridesParser

from experiment import rundir
from experiment.rundir import (CLAIM, check_run_dir_free, claim_run_dir, hydra_quote, release_run_dir,
                               resume_command, run_dir_of_checkpoint)


def make_run(path):
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "last.pt").write_bytes(b"x")
    return path


def test_fresh_and_half_started_directories_are_free(tmp_path):
    check_run_dir_free(tmp_path / "new", None)
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "train.log").write_text("failed before training\n")
    check_run_dir_free(tmp_path / "crashed", None)  # nothing there to lose


@pytest.mark.parametrize("marker", ["checkpoints", "metrics.json"])
def test_a_new_run_never_takes_a_used_directory(tmp_path, marker):
    (tmp_path / marker).mkdir() if marker == "checkpoints" else (tmp_path / marker).write_text("{}")
    with pytest.raises(UserError, match=r"already holds a run; choose another hydra.run.dir, or continue that run "
                                        r"with resume=.*checkpoints/last.pt"):
        check_run_dir_free(tmp_path, None)


def test_resuming_may_write_only_into_its_own_run(tmp_path):
    mine, other = make_run(tmp_path / "mine"), make_run(tmp_path / "other")
    check_run_dir_free(mine, str(mine / "checkpoints" / "last.pt"))
    check_run_dir_free(tmp_path / "fresh", str(mine / "checkpoints" / "last.pt"))
    with pytest.raises(UserError, match="already holds another run .*leave out hydra.run.dir"):
        check_run_dir_free(other, str(mine / "checkpoints" / "last.pt"))


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
                                  "/tmp/back\\slash\\'/last.pt", "/tmp/end\\"])
def test_resume_command_survives_the_shell_and_hydra(path):
    _, override = shlex.split(resume_command(path))
    assert OverridesParser.create().parse_override(override).value() == path


def test_a_second_claim_on_a_directory_in_use_is_refused(tmp_path):
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / CLAIM).write_text(f"{running.pid} {socket.gethostname()}\n")
        with pytest.raises(UserError, match=f"is in use by a running train.py \\(process {running.pid}"):
            claim_run_dir(tmp_path)
        (tmp_path / CLAIM).write_text(f"1 some-other-host\n")  # cannot tell whether it runs: it counts
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
    (tmp_path / "checkpoints").mkdir()
    stale_tmp = tmp_path / "checkpoints" / f".last.pt.{dead}.abcdefgh.tmp"
    stale_tmp.write_bytes(b"half a checkpoint")
    lock = claim_run_dir(tmp_path, resuming=tmp_path / "checkpoints" / "last.pt")
    assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert not stale_tmp.exists()  # a killed save's leftover goes when its run continues
    release_run_dir(lock)
    assert not lock.exists()


def test_the_claim_goes_when_the_process_ends(tmp_path):
    code = f"from experiment.rundir import claim_run_dir; claim_run_dir({str(tmp_path)!r}); print('claimed')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "claimed" and not (tmp_path / CLAIM).exists()


def test_a_run_directory_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit:
        rundir._writable_dir(tmp_path / "file" / "run")
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: cannot use {tmp_path / 'file' / 'run'} as the run directory")
