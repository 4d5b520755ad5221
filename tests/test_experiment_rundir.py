"""experiment/rundir.py: a run never writes into another run's directory; the printed resume command works."""
import shlex
import sys

import pytest

from conftest import ROOT
from experiment.errors import UserError
from experiment.rundir import check_run_dir_free, resume_command, run_dir_of_checkpoint


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
    assert shlex.split(cmd) == ["/repo dir/train.py", "resume=/runs/my run/checkpoints/last.pt"]


def test_resume_command_names_train_py_under_a_launcher(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/submitit/core/_submit.py", "/jobs"])
    script, resume = shlex.split(resume_command("/runs/r/checkpoints/last.pt"))
    assert script == str(ROOT / "train.py") and resume == "resume=/runs/r/checkpoints/last.pt"
