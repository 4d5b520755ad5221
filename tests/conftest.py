"""Shared helpers: run the entry points as a user would, in a subprocess from the repository root."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A network small enough for a CPU test that still learns digits in a few epochs.
TINY = ["experiment=digits_demo", "model.width=0.125", "model.classifier_width=128", "model.dropout=0",
        "trainer.progress=false"]


def script_env(env=None):
    """The environment for an entry point: one intra-op thread unless the caller's environment says otherwise.
    On a small, shared CPU machine, several PyTorch thread pools spinning at once make each step many times
    slower (measured: 16x on 2 cores); the thread count also fixes the float summation order, so runs that
    must match exactly are compared under the same setting."""
    return {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}


def run_script(script, *overrides, timeout=300, check=True, env=None):
    """Run `python <script> <overrides>` from the repository root; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, overrides)], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=script_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, overrides))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def start_script(script, *overrides, env=None):
    """Start `python <script> <overrides>` from the repository root without waiting (stdout and stderr piped,
    text): for tests that signal a running process. Returns the Popen."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, overrides)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=script_env(env))


def read_metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """One tiny trained run per model on digits, shared by the tests that need checkpoints."""
    base = tmp_path_factory.mktemp("trained")
    runs = {}
    for model in ("alexnet", "alexnet_ac"):
        run_script("train.py", *TINY, f"model={model}", "trainer.epochs=3", f"hydra.run.dir={base / model}")
        runs[model] = base / model
    return runs
