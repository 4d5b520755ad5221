"""Reliability end to end, through the entry points: interruption and exact resume, atomic checkpoints,
non-finite losses, checkpoints that carry code, run directories that are never overwritten, and every user
mistake ending in one `error: ...` line with a non-zero exit and no traceback. Signals, Hydra's own
command-line errors and the run directory Hydra creates go through real subprocesses (run_script,
start_script); the rest runs the entry point's own `main`, error handling included, in this process
(conftest.run_main)."""
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, read_metrics, run_main, run_script, script_env, start_script

# digits with batch 16: 89 steps an epoch, so a signal lands mid-epoch; dropout stays on (0.5), so the
# resumed run also has to restore the random-number state to match.
INTERRUPTIBLE = [*TINY, "model.classifier_width=32", "model.dropout=0.5", "trainer.epochs=3", "dataset.batch_size=16"]
TIMING = ("epoch_s", "img_per_s")


def assert_one_error_line(proc, *phrases, code=2):
    """Exit status `code`, stderr exactly one `error: ...` line holding every phrase, no traceback anywhere."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def assert_hydra_error(proc, *phrases):
    """Hydra's own config errors: its short message (exit 1), naming what was wrong, and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    for phrase in phrases:
        assert phrase in out, (phrase, out[-3000:])


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def png_tree(root, classes=("cat", "dog", "fox"), per_class=4, val_classes=None):
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


FOLDER = ["dataset=folder", "dataset.image_size=32", "dataset.num_workers=0", "dataset.batch_size=4",
          "dataset.eval_batch_size=5", "trainer.epochs=1"]


# ---------------------------------------------------------------------------------------------------------------
# Interruption: finish the step, save, print the command that resumes, exit non-zero; the resumed run is exact.

def interrupt(run_dir, sig):
    """Start a run, wait until it is inside epoch 2, send `sig`; return (returncode, stdout, stderr)."""
    proc = start_script("train.py", *INTERRUPTIBLE, f"hydra.run.dir={run_dir}")
    log, deadline = run_dir / "train.log", time.monotonic() + 300
    try:
        while not (log.is_file() and "epoch 1/3" in log.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"train.py never reached epoch 2 (exit {proc.returncode})\n{out[-2000:]}\n{err[-2000:]}")
            time.sleep(0.05)
        time.sleep(0.2)  # into epoch 2's steps (about 1.5 s): a signal as epoch 1's line is written stops at its end
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def check_interrupted(run_dir, sig, returncode, out, err):
    """The interrupted run's report and checkpoint; returns the printed resume command."""
    assert returncode == 128 + sig, (returncode, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    last = run_dir / "checkpoints" / "last.pt"
    match = re.search(rf"interrupted \({signal.Signals(sig).name}\) at epoch 2, step (\d+); saved (.+)$", out, re.M)
    assert match and match.group(2) == str(last), out[-2000:]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == int(match.group(1)) and 0 < ckpt["step"] < 89
    assert ckpt["train_totals"][0]["count"] == 16 * ckpt["step"]
    assert len(ckpt["history"]) == 1 and not (run_dir / "metrics.json").exists()
    assert temp_files(run_dir) == []
    command = re.search(r"^resume with: python (.+)$", out, re.M)
    assert command, out[-2000:]
    return command.group(1)


def test_sigterm_finishes_the_step_saves_and_prints_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    command = check_interrupted(run_dir, signal.SIGTERM, *interrupt(run_dir, signal.SIGTERM))
    assert shlex.split(command) == [str(ROOT / "train.py"), f"resume='{run_dir / 'checkpoints' / 'last.pt'}'"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_script("train.py", *INTERRUPTIBLE, f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_resumed_after_a_signal_ends_exactly_like_an_uninterrupted_one(tmp_path, uninterrupted, sig):
    run_dir = tmp_path / "run"
    command = check_interrupted(run_dir, sig, *interrupt(run_dir, sig))
    # Run exactly the printed command, from where the user ran the first one.
    resumed = subprocess.run([sys.executable, *shlex.split(command)], cwd=ROOT, text=True, capture_output=True,
                             env=script_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "epoch 1/3" not in resumed.stdout and "epoch 3/3" in resumed.stdout

    a, b = read_metrics(uninterrupted), read_metrics(run_dir)
    strip = lambda history: [{k: v for k, v in h.items() if k not in TIMING} for h in history]  # noqa: E731
    assert strip(b["history"]) == strip(a["history"])
    assert (b["best_acc1"], b["final_acc1"], b["epochs"]) == (a["best_acc1"], a["final_acc1"], a["epochs"])
    ckpt_a = torch.load(uninterrupted / "checkpoints/last.pt", weights_only=True)
    ckpt_b = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert ckpt_a["model"].keys() == ckpt_b["model"].keys()
    assert all(torch.equal(ckpt_a["model"][k], ckpt_b["model"][k]) for k in ckpt_a["model"])
    momentum_a = [s["momentum_buffer"] for s in ckpt_a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in ckpt_b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert ckpt_a["scheduler"]["last_epoch"] == ckpt_b["scheduler"]["last_epoch"] == 3 * 89


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss

@pytest.mark.parametrize("blow_up, epoch, good", [
    (["optimizer.lr=1e6"], 1, "no checkpoint was written yet"),
    # a sane first epoch, then the learning rate multiplied by 1e8 half-way: epoch 2 diverges
    (["scheduler=multistep", "scheduler.milestones=[0.5]", "scheduler.gamma=1e8"], 2, "the last good checkpoint is"),
], ids=["first-epoch", "after-a-checkpoint"])
def test_non_finite_loss_stops_with_epoch_step_and_last_good_checkpoint(tmp_path, blow_up, epoch, good):
    run_dir = tmp_path / "run"
    proc = run_main("train.py", *TINY, "trainer.epochs=2", *blow_up, f"hydra.run.dir={run_dir}", check=False)
    line = assert_one_error_line(proc, f"non-finite (nan or inf) at epoch {epoch}, step ", good, "optimizer.lr")
    assert not (run_dir / "metrics.json").exists()
    if epoch == 2:
        last = run_dir / "checkpoints" / "last.pt"
        assert str(last) in line
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint that carries code is refused and its code never runs.

class Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # unpickling this creates the file
        return (open, (self.path, "w"))


@pytest.mark.parametrize("script, key", [("train.py", "resume"), ("fuse.py", "ckpt"), ("eval.py", "ckpt")])
def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path, script, key):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "downloaded" / "best.pt"
    evil.parent.mkdir()
    torch.save({"model": Payload(marker), "config": {"model": {"arch": "AlexNet"}}, "num_classes": 10}, evil)
    proc = run_main(script, f"{key}={evil}", check=False)
    assert_one_error_line(proc, "refusing to load", "pickled Python objects")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Run directories

def test_a_new_run_never_writes_into_an_existing_run(trained_runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_runs["alexnet"], run_dir)
    before = snapshot(run_dir)
    proc = run_main("train.py", *TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", check=False)
    assert_one_error_line(proc, f"{run_dir} already holds a run", f"resume={run_dir / 'checkpoints' / 'last.pt'}")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("extra, says", [
    ([], "is from a finished run (3 of 3 epochs): nothing to resume"),
    (["trainer.epochs=2"], "trainer.epochs=2 differs from the run being resumed (trainer.epochs was 3)"),
], ids=["same-length", "shorter"])
def test_resuming_a_finished_run_is_refused_and_rewrites_nothing(trained_runs, tmp_path, extra, says):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_runs["alexnet"], run_dir)
    before = snapshot(run_dir)
    proc = run_main("train.py", f"resume={run_dir / 'checkpoints' / 'last.pt'}", *extra, check=False)
    assert_one_error_line(proc, says)
    assert snapshot(run_dir) == before


def test_a_run_stopped_before_its_report_is_finished_by_resuming_it(trained_runs, tmp_path):
    """A run whose training ended but whose report was not written (a second Ctrl-C or a hard kill while it scored
    best.pt) is not lost: resuming it writes the metrics.json the uninterrupted run wrote."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_runs["alexnet"], run_dir)
    (run_dir / "metrics.json").unlink()
    proc = run_main("train.py", f"resume={run_dir / 'checkpoints' / 'last.pt'}")
    assert "after its last epoch, to write the run's report" in proc.stdout and "done: best" in proc.stdout
    written, expected = read_metrics(run_dir), read_metrics(trained_runs["alexnet"])
    for metrics in (written, expected):
        metrics.pop("train_seconds")  # last.pt's clock plus the resumed run's start-up: not the first run's end
    assert written == expected


def test_resuming_writes_only_into_its_own_run(trained_runs, tmp_path):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(trained_runs["alexnet"], run_dir)
    shutil.copytree(trained_runs["alexnet_ac"], other)
    ckpt = torch.load(other / "checkpoints" / "last.pt", weights_only=True)
    ckpt["config"]["trainer"]["epochs"] += 1  # unfinished: a finished run is refused before its directory is looked at
    torch.save(ckpt, other / "checkpoints" / "last.pt")
    before, before_other = snapshot(run_dir), snapshot(other)
    proc = run_main("train.py", f"resume={other / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={run_dir}",
                      check=False)
    assert_one_error_line(proc, "already holds another run", "leave out hydra.run.dir")
    assert snapshot(run_dir) == before and snapshot(other) == before_other


def test_a_finished_run_is_refused_before_its_target_directory_is_looked_at(trained_runs, tmp_path):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(trained_runs["alexnet"], run_dir)
    shutil.copytree(trained_runs["alexnet_ac"], other)
    before, before_other = snapshot(run_dir), snapshot(other)
    proc = run_main("train.py", f"resume={other / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={run_dir}",
                    check=False)
    assert_one_error_line(proc, "is from a finished run", "nothing to resume")
    assert snapshot(run_dir) == before and snapshot(other) == before_other


def test_a_new_run_never_writes_into_a_users_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own notes\n")
    before = snapshot(folder)
    proc = run_main("train.py", *TINY, "trainer.epochs=1", f"hydra.run.dir={folder}", check=False)
    assert_one_error_line(proc, f"{folder} is not empty and was not made by train.py", "choose another hydra.run.dir")
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["config.yaml"]


def test_a_checkpoint_copied_out_of_its_run_continues_only_in_a_new_folder(trained_runs, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    state = torch.load(trained_runs["alexnet"] / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["trainer"]["epochs"] = 4  # unfinished: one epoch to go
    torch.save(state, folder / "last.pt")
    (folder / "config.yaml").write_text("my own notes\n")
    before = snapshot(folder)
    proc = run_main("train.py", f"resume={folder / 'last.pt'}", check=False)
    assert_one_error_line(proc, f"{folder} is not a run directory train.py made", "pass hydra.run.dir=<a new folder>")
    assert snapshot(folder) == before

    run_dir = tmp_path / "continued"
    proc = run_main("train.py", f"resume={folder / 'last.pt'}", f"hydra.run.dir={run_dir}")
    assert "resumed from" in proc.stdout and read_metrics(run_dir)["epochs"] == 4
    assert snapshot(folder) == before


def test_a_killed_runs_folder_is_refused_for_a_new_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_script("train.py", *INTERRUPTIBLE, f"hydra.run.dir={run_dir}")
    try:  # killed in its first epoch, before any checkpoint: its log is all a new run could mix with
        deadline = time.monotonic() + 300
        while not ((run_dir / "train.log").is_file() and "training steps" in (run_dir / "train.log").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no handler runs, the claim and the log stay
        proc.communicate()
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    unclaimed = lambda: {k: v for k, v in snapshot(run_dir).items() if k.name != ".run.lock"}  # noqa: E731
    before = unclaimed()  # (the killed process's claim is stale: the next claim may clear it)
    proc = run_main("train.py", *TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", check=False)
    assert_one_error_line(proc, f"{run_dir} already holds a run that saved no checkpoint",
                          "choose another hydra.run.dir")
    assert unclaimed() == before


def test_a_failed_first_save_leaves_a_folder_that_says_what_happened(tmp_path):
    """A real file-size limit (ulimit -f): the log and the event file fit under it, the 1.6 MB checkpoint does not."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, env=script_env(), timeout=300,
                          preexec_fn=limit_file_size)
    line = assert_one_error_line(proc, f"could not write checkpoint {run_dir / 'checkpoints' / 'last.pt'}",
                                 "nothing was written", "start the run again with another hydra.run.dir")
    assert "resume=" not in line and not (run_dir / "checkpoints").exists() and temp_files(run_dir) == []


@pytest.mark.parametrize("script", ["fuse.py", "eval.py"])
def test_out_never_replaces_a_file_the_tool_did_not_write(trained_runs, tmp_path, script):
    source, other = tmp_path / "source", tmp_path / "other"
    shutil.copytree(trained_runs["alexnet_ac"], source)
    shutil.copytree(trained_runs["alexnet"], other)
    before = snapshot(other)
    ckpt = source / "checkpoints" / "best.pt"
    for target in (other / "checkpoints" / "last.pt", other / "metrics.json", other / "config.yaml"):
        proc = run_main(script, f"ckpt={ckpt}", f"out={target}", check=False)
        assert_one_error_line(proc, f"out={target} would replace a file this tool did not write")
    assert snapshot(other) == before
    out = tmp_path / ("deploy.pt" if script == "fuse.py" else "report.json")
    for _ in range(2):  # its own earlier output is replaced
        run_main(script, f"ckpt={ckpt}", f"out={out}")
    assert out.is_file()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files that are not usable

def write_bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.zeros(3, 3), path)
    elif kind == "folder":  # a run directory passed for its checkpoint: it was said not to exist
        path = tmp_path / "run"
        path.mkdir()
    return path


BAD_FILES = {"missing": "does not exist", "random-bytes": "not a readable PyTorch checkpoint",
             "empty": "the file is empty", "tensor": "not a checkpoint of this repository",
             "folder": "is a folder, not a file; pass the path of a .pt file"}


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("script, key", [("train.py", "resume"), ("fuse.py", "ckpt"), ("eval.py", "ckpt")])
def test_unusable_checkpoint_files(tmp_path, script, key, kind):
    if script != "train.py" and kind == "missing":
        pytest.skip("covered for eval.py and fuse.py by tests/test_eval.py")
    path = write_bad_file(tmp_path, kind)
    proc = run_main(script, f"{key}={path}", check=False)
    assert_one_error_line(proc, str(path), BAD_FILES[kind])


def edited_checkpoint(trained_runs, tmp_path, edit):
    ckpt = torch.load(trained_runs["alexnet_ac"] / "checkpoints/best.pt", weights_only=True)
    edit(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


EDITS = {
    "wider": lambda c: c["config"]["model"].update(width=0.25),
    # AC weights under the baseline's config (whose constructor has no gamma_init)
    "other-arch": lambda c: (c["config"]["model"].update(arch="AlexNet"), c["config"]["model"].pop("gamma_init")),
    "more-classes": lambda c: c.update(num_classes=12, classes=[str(i) for i in range(12)]),
}


@pytest.mark.parametrize("script", ["fuse.py", "eval.py"])
@pytest.mark.parametrize("edit", ["wider", "other-arch"])
def test_checkpoint_whose_weights_do_not_fit_its_config(trained_runs, tmp_path, script, edit):
    path = edited_checkpoint(trained_runs, tmp_path, EDITS[edit])
    proc = run_main(script, f"ckpt={path}", check=False)
    assert_one_error_line(proc, f"the weights in {path} do not fit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.pt"]  # nothing written beside it


def test_fuse_checkpoint_of_another_class_count(trained_runs, tmp_path):
    path = edited_checkpoint(trained_runs, tmp_path, EDITS["more-classes"])
    assert_one_error_line(run_main("fuse.py", f"ckpt={path}", check=False), "do not fit")


def test_eval_on_a_dataset_with_another_class_count(trained_runs, tmp_path):
    root = png_tree(tmp_path / "data", per_class=2)
    proc = run_main("eval.py", f"ckpt={trained_runs['alexnet_ac'] / 'checkpoints/best.pt'}", "dataset.name=folder",
                      f"dataset.root={root}", "dataset.num_workers=0", check=False)
    assert_one_error_line(proc, "predicts 10 classes but dataset folder has 3")


@pytest.mark.parametrize("script", ["fuse.py", "eval.py"])
def test_ckpt_left_out(script):
    assert_one_error_line(run_main(script, check=False), "ckpt is required; pass ckpt=")


# ---------------------------------------------------------------------------------------------------------------
# Data

def test_folder_dataset_root_missing(tmp_path):
    proc = run_main("train.py", *TINY, *FOLDER, "dataset.root=/nonexistent", f"hydra.run.dir={tmp_path / 'run'}",
                      check=False)
    assert_one_error_line(proc, "dataset root /nonexistent does not exist", "dataset.root")


def test_folder_dataset_root_left_out(tmp_path):
    proc = run_main("train.py", *TINY, "dataset=folder", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert_one_error_line(proc, "dataset.root is required")


def test_cifar10_not_downloaded_and_download_off(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_main("train.py", "dataset=cifar10", "dataset.download=false", f"dataset.root={tmp_path / 'empty'}",
                      "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert_one_error_line(proc, f"cifar10 not found or corrupted in {tmp_path / 'empty'}", "dataset.download=true")


def test_folder_with_different_class_lists(tmp_path):
    root = png_tree(tmp_path / "data", classes=("cat", "dog"), val_classes=("cat", "emu"))
    proc = run_main("train.py", *TINY, *FOLDER, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}",
                      check=False)
    assert_one_error_line(proc, "different classes", "only in train: ['dog']", "only in val: ['emu']")


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path):
    root = png_tree(tmp_path / "data")
    bad = root / "train" / "dog" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    proc = run_main("train.py", *TINY, *FOLDER, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}",
                      check=False)
    assert_one_error_line(proc, f"cannot read image {bad}", "dataset.skip_bad_images=true")

    run_dir = tmp_path / "skipping"
    proc = run_main("train.py", *TINY, *FOLDER, f"dataset.root={root}", "dataset.skip_bad_images=true",
                      f"hydra.run.dir={run_dir}")
    says = "left out 1 unreadable image(s) of the train split (dataset.skip_bad_images=true)"
    assert says in proc.stdout and says in (run_dir / "train.log").read_text()
    assert read_metrics(run_dir)["dataset"] == "folder"


def test_batch_larger_than_the_dataset(tmp_path):
    proc = run_main("train.py", *TINY, "dataset.batch_size=5000", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert_one_error_line(proc, "dataset.batch_size 5000 is larger than the 1437 training samples")


# ---------------------------------------------------------------------------------------------------------------
# Config

@pytest.mark.parametrize("override, says", [
    ("trainer.device=gpu", "trainer.device=gpu is not a choice; use auto, cpu or cuda"),
    ("scheduler.name=bogus", "scheduler.name='bogus' is not valid: it must be one of: cosine, onecycle, multistep"),
    ("optimizer.lr=-1", "optimizer.lr=-1 is not valid"),
    ("trainer.eval_every=0", "trainer.eval_every=0 is not valid: it must be a whole number of at least 1"),
    ("seed=abc", "seed='abc' is not valid"),
    ("optimizer._target_=numpy.savez", "optimizer._target_='numpy.savez' is not valid"),
    ("model.layout=imagenet", "does not fit 32x32 images"),
])
def test_bad_config_values(tmp_path, override, says):
    proc = run_main("train.py", *TINY, override, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert_one_error_line(proc, says)


@pytest.mark.parametrize("script, override, says", [
    ("fuse.py", "check_batch=0", "check_batch=0 is not valid"), ("fuse.py", "tolerance=abc", "tolerance='abc'"),
    ("eval.py", "dataset.eval_batch_size=0", "dataset.eval_batch_size=0 is not valid"),
    ("eval.py", "dataset.cache=sometimes", "dataset.cache='sometimes' is not valid"),
    ("fuse.py", "dataset.verify_images=maybe", "dataset.verify_images='maybe' is not valid"),
    ("fuse.py", "dataset.cache_dir=''", "dataset.cache_dir='' is not valid"),
])
def test_bad_eval_and_fuse_values(tmp_path, script, override, says):
    proc = run_main(script, f"ckpt={tmp_path / 'never-read.pt'}", override, check=False)
    assert_one_error_line(proc, says)


@pytest.mark.parametrize("target", ["numpy.savez", "os.system"])
def test_resuming_a_checkpoint_whose_config_names_code_runs_nothing(trained_runs, tmp_path, target):
    state = torch.load(trained_runs["alexnet"] / "checkpoints" / "last.pt", weights_only=True)
    marker = tmp_path / "PWNED"
    state["config"]["optimizer"] = {"_target_": target, "file": str(marker), "command": f"touch {marker}",
                                    "lr": 0.1, "weight_decay": 0.0}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "run" / "checkpoints" / "last.pt")
    proc = run_main("train.py", f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", check=False)
    assert_one_error_line(proc, f"optimizer._target_='{target}'", "is not valid")
    assert not marker.exists() and not (tmp_path / "run" / "train.log").exists()


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    proc = start_script("train.py", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    time.sleep(1.0)  # the entry point is still importing torch and Hydra
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out + err, out + err
    assert err.strip() == "error: interrupted"


def test_sigterm_during_start_up_is_one_line(tmp_path):
    proc = start_script("train.py", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    time.sleep(1.0)  # the entry point is still importing torch and Hydra: Python would die without a word
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in out + err, out + err
    assert err.strip() == "error: interrupted (SIGTERM)"


def test_sigterm_before_training_ends_the_runs_workers_and_claim(tmp_path, monkeypatch):
    """A SIGTERM once the run has started its DataLoader workers, before its first step: one line, exit 143, no
    worker left, the run directory's claim given back (run_main fails a run that leaves its claim)."""
    import multiprocessing

    import experiment.training as training

    fits = training.check_input_fits  # called on a first test batch: the workers are running

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return fits(*args)

    monkeypatch.setattr(training, "check_input_fits", terminated)
    root = png_tree(tmp_path / "data")
    proc = run_main("train.py", *TINY, *FOLDER, f"dataset.root={root}", "dataset.num_workers=2", "dataset.cache=off",
                    f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: interrupted (SIGTERM)"
    assert multiprocessing.active_children() == []


def test_run_directory_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_script("train.py", *TINY, f"hydra.run.dir={tmp_path / 'file' / 'run'}", check=False)
    assert_one_error_line(proc, f"cannot use {tmp_path / 'file' / 'run'} as the run directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(tmp_path):
    proc = run_main("train.py", *TINY, "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert_one_error_line(proc, "trainer.device=cuda but no CUDA device is visible", "trainer.device=cpu")


@pytest.mark.parametrize("script, override, says", [
    ("train.py", "trainer.nonexistent=1",
     ["Could not override 'trainer.nonexistent'", "Key 'nonexistent' is not in struct"]),
    ("train.py", "model=nonexistent", ["Could not find 'model/nonexistent'", "alexnet_ac"]),
    ("eval.py", "bogus=1", ["Could not override 'bogus'"]),
])
def test_unknown_config_keys_and_options(tmp_path, script, override, says):
    proc = run_script(script, override, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert_hydra_error(proc, *says)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# A stored config is data: no interpolation in it is resolved, and its values pass the command line's checks.

@pytest.mark.parametrize("script", ["eval.py", "fuse.py"])
def test_a_stored_interpolation_is_never_resolved(trained_runs, tmp_path, script, monkeypatch):
    made = tmp_path / "made-by-a-resolver"
    monkeypatch.setenv("A_SECRET_FOR_THIS_TEST", "hunter2")

    def edit(c):  # a stranger's checkpoint: a cifar10 root whose resolver would make a folder
        c["config"]["dataset"] = {**c["config"]["dataset"], "name": "cifar10", "download": True,
                                  "root": f"${{run_dir:null,{made}}}"}
    proc = run_main(script, f"ckpt={edited_checkpoint(trained_runs, tmp_path, edit)}", check=False)
    assert_one_error_line(proc, "cifar10 not found or corrupted in ${run_dir:null,")
    assert not made.exists()

    leak = edited_checkpoint(trained_runs, tmp_path, lambda c: c["config"]["dataset"].update(
        image_size="${oc.env:A_SECRET_FOR_THIS_TEST}"))
    proc = run_main(script, f"ckpt={leak}", check=False)
    assert_one_error_line(proc, "dataset.image_size='${oc.env:A_SECRET_FOR_THIS_TEST}' stored in")
    assert "hunter2" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["eval.py", "fuse.py"])
@pytest.mark.parametrize("key, value, says", [
    ("eval_batch_size", -5, "dataset.eval_batch_size=-5 stored in"),
    ("mean", "abc", "dataset.mean='abc' stored in"),
    ("std", [0.3, 0.0, 0.3], "dataset.std=[0.3, 0.0, 0.3] stored in"),
])
def test_stored_dataset_values_pass_the_command_lines_checks(trained_runs, tmp_path, script, key, value, says):
    path = edited_checkpoint(trained_runs, tmp_path, lambda c: c["config"]["dataset"].update({key: value}))
    proc = run_main(script, f"ckpt={path}", check=False)
    assert_one_error_line(proc, says, "is not valid", "the file was edited or written by other code")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.pt"]


def test_a_dataset_root_holding_dollar_brace_round_trips_through_eval_fuse_and_resume(tmp_path):
    root = png_tree(tmp_path / "data ${HOME}")  # a real folder name; escaped on the command line as \${
    run_dir = tmp_path / "run"
    escaped = str(root).replace("${", "\\${")
    run_main("train.py", *TINY, *FOLDER, f"dataset.root='{escaped}'", f"hydra.run.dir={run_dir}")
    last = run_dir / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["config"]["dataset"]["root"] == str(root)
    from omegaconf import OmegaConf
    assert OmegaConf.load(run_dir / "config.yaml").dataset.root == str(root)  # config.yaml: data as well

    report = run_dir / "best.eval.json"
    run_main("eval.py", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", f"out={report}")
    assert json.loads(report.read_text())["num_samples"] == 12
    moved = tmp_path / "moved ${USER}"  # the data moved to another such folder: named on eval.py's command line
    root.rename(moved)
    escaped_moved = str(moved).replace("${", "\\${")
    run_main("eval.py", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", f"dataset.root='{escaped_moved}'",
             f"out={report}")
    assert json.loads(report.read_text())["num_samples"] == 12
    moved.rename(root)
    run_main("fuse.py", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}")
    assert (run_dir / "checkpoints" / "best_deploy.pt").is_file()

    state = torch.load(last, weights_only=True)
    state["config"]["trainer"]["epochs"] = 2  # one more epoch to resume into
    torch.save(state, last)
    proc = run_main("train.py", f"resume={last}")
    assert "resumed from" in proc.stdout and read_metrics(run_dir)["epochs"] == 2
    assert torch.load(last, weights_only=True)["config"]["dataset"]["root"] == str(root)


# ---------------------------------------------------------------------------------------------------------------
# Models are what they claim

def poisoned(c):  # a diverged run's weights: one nan in the first conv
    name = next(k for k, v in c["model"].items() if v.is_floating_point())
    c["model"][name].view(-1)[0] = float("nan")


@pytest.mark.parametrize("script", ["eval.py", "fuse.py"])
def test_weights_that_are_not_finite_are_refused(trained_runs, tmp_path, script):
    path = edited_checkpoint(trained_runs, tmp_path, poisoned)
    proc = run_main(script, f"ckpt={path}", check=False)
    line = assert_one_error_line(proc, f"the weights in {path} are not finite (nan or inf in ")
    assert "NOT exact" not in proc.stdout + line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.pt"]  # no report with a bare NaN in it


def test_outputs_that_are_not_finite_are_refused(trained_runs, tmp_path):
    def overflow(c):  # finite weights whose logits overflow float32
        last = [k for k in c["model"] if k.endswith("weight")][-1]
        c["model"][last] *= 1e38
    path = edited_checkpoint(trained_runs, tmp_path, overflow)
    proc = run_main("eval.py", f"ckpt={path}", check=False)
    assert_one_error_line(proc, f"the model in {path} gives non-finite outputs", "digits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.pt"]


def test_compare_refuses_a_checkpoint_of_another_dataset_with_as_many_classes(trained_runs, tmp_path):
    other = edited_checkpoint(trained_runs, tmp_path, lambda c: c["config"]["dataset"].update(name="fake"))
    best = trained_runs["alexnet_ac"] / "checkpoints" / "best.pt"
    proc = run_main("eval.py", f"ckpt={best}", f"compare={other}", f"out={tmp_path / 'r.json'}", check=False)
    assert_one_error_line(proc, f"{other} was trained on dataset fake, {best} on digits",
                          "compare checkpoints of the same task")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("overrides, says", [
    (["scheduler=multistep", "scheduler.milestones=abc"], "scheduler.milestones='abc' is not valid"),
    (["scheduler=multistep", "scheduler.milestones=[-1]"], "scheduler.milestones=[-1] is not valid"),
    (["dataset.mean=[0,0]"], "dataset.mean=[0, 0] is not valid: it must be a list of 3 finite numbers"),
    (["model.gamma_init=nan"], "model.gamma_init=nan is not valid"),
])
def test_more_bad_config_values_are_one_line_before_any_work(tmp_path, overrides, says):
    proc = run_main("train.py", *TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert_one_error_line(proc, says)
    assert not (tmp_path / "run" / "train.log").exists()


@pytest.mark.parametrize("where", ["outputs-a-file", "sweep-dir-under-a-file"])
def test_a_sweep_whose_directory_cannot_be_made_is_one_line(tmp_path, where):
    (tmp_path / "outputs").write_text("x")
    option = [] if where == "outputs-a-file" else [f"hydra.sweep.dir={tmp_path / 'outputs' / 'sweep'}"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *TINY, "seed=0,1", *option], cwd=tmp_path,
                          text=True, capture_output=True, env=script_env(), timeout=300)
    assert_one_error_line(proc, "as the sweep directory", "outputs is a file, not a folder",
                          "pass a writable hydra.sweep.dir")
    assert (tmp_path / "outputs").read_text() == "x"


@pytest.mark.parametrize("option", ["hydra.run.dir", "hydra.sweep.dir"])
def test_a_run_directory_named_with_dollar_brace_is_one_line(tmp_path, option):
    # Hydra resolves its run directory's name again, so a `${` there fails even escaped (a dataset root may hold one)
    folder = tmp_path / "runs ${x}"
    sweep = ["-m", "seed=0,1"] if option == "hydra.sweep.dir" else []
    escaped = str(folder).replace("${", "\\${")  # as the command line takes a literal `${`
    proc = run_script("train.py", *sweep, *TINY, f"{option}={escaped}", check=False)
    assert_one_error_line(proc, f"cannot use {folder} as the", "its name holds ${")
    assert not folder.exists()


@pytest.mark.parametrize("script, override, key", [
    ("train.py", "trainer.epochs=${nope}", "trainer.epochs"),
    ("eval.py", "ckpt=${oc.env:AN_UNSET_VARIABLE_OF_THIS_TEST}", "ckpt"),
])
def test_an_interpolation_that_does_not_resolve_is_one_line(tmp_path, script, override, key):
    proc = run_main(script, *(TINY if script == "train.py" else []), override, f"hydra.run.dir={tmp_path / 'run'}",
                    check=False)
    assert_one_error_line(proc, f"{key}: its interpolation does not resolve", "write a literal ${ as \\${")


@pytest.mark.parametrize("script", ["eval.py", "fuse.py"])
@pytest.mark.parametrize("edit, says", [
    ({"num_classes": -1}, "has num_classes=-1"), ({"num_classes": 0}, "has num_classes=0"),
    ({"classes": 7}, "has num_classes=10 and classes that do not match"),
    ({"classes": ["a", "b"]}, "has num_classes=10 and classes that do not match"),
    ({"deploy": "yes"}, "has deploy='yes', not true or false"),
], ids=["negative-classes", "no-classes", "classes-a-number", "fewer-class-names", "deploy-a-string"])
def test_a_checkpoint_whose_entries_disagree_is_one_line(trained_runs, tmp_path, script, edit, says):
    path = edited_checkpoint(trained_runs, tmp_path, lambda c: c.update(edit))
    assert_one_error_line(run_main(script, f"ckpt={path}", check=False), f"{path} {says}")
