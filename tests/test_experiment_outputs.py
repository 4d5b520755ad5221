"""experiment/outputs.py: an output never replaces an input, by name or through a link."""
import os

import pytest

from experiment.errors import UserError
from experiment.outputs import check_outputs, publish, staging_path


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


def test_a_staged_file_replaces_the_output_only_when_published(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    staged = staging_path(out)
    staged.write_bytes(b"new")
    assert out.read_bytes() == b"old" and staged.parent == out.parent
    publish(staged, out)
    assert out.read_bytes() == b"new" and not staged.exists()
