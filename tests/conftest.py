"""Shared helpers: run the entry points as a user would, either inside the test process (`run_main`: the run
called directly on a config composed by Hydra's public API, the way `python <script>` would compose it) or, where a
process boundary is what is tested (exit on a signal, torchrun, Hydra's own command-line errors), in a real
subprocess from the repository root (`run_script`, `start_script`)."""
import atexit
import contextlib
import copy
import functools
import io
import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict, read_write

from experiment.run_dir import register_resolvers

ROOT = Path(__file__).resolve().parents[1]

# A network small enough for a CPU test that still learns digits in a few epochs: configs/experiment/tiny.yaml.
TINY = ["experiment=tiny"]

# The entry points run with one intra-op thread (script_env); so do the runs inside this process: on a small,
# shared CPU machine several PyTorch thread pools spinning at once make each step many times slower, and the
# thread count fixes the float summation order that exact-resume comparisons depend on.
torch.set_num_threads(1)

register_resolvers()  # as train.py does: the tests compose configs/train.yaml, whose run directory uses them

# Decoded image folders are cached under $XDG_CACHE_HOME (experiment/folder_cache.py): the tests', and the entry
# points they start, go to a folder of their own, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="alexnet-ac-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)


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


@functools.cache
def _entry_point(script):
    """The `main` of train.py, eval.py or fuse.py, loaded once. Loading runs the script's top level, which
    points Ctrl-C and SIGTERM at a handler that ends the process: the test process keeps its own."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return runpy.run_path(str(ROOT / script), run_name=f"entry_point_{Path(script).stem}")["main"]
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def _log_handlers(job_logging, stdout):
    """The handlers Hydra's job_logging config (configs/hydra/job_logging/) would install: the console into
    `stdout`, and the run's log file where the config has one. Built here rather than by logging.config,
    which would also close the handlers pytest has on the root logger."""
    conf = OmegaConf.to_container(job_logging, resolve=True)
    handlers = []
    for name, spec in conf["handlers"].items():
        if name not in conf["root"]["handlers"]:
            continue
        if spec["class"] == "logging.StreamHandler":
            handler = logging.StreamHandler(stdout)
        elif spec["class"] == "logging.FileHandler":
            handler = logging.FileHandler(spec["filename"], delay=spec.get("delay", False))
        else:
            raise NotImplementedError(spec["class"])
        handler.setFormatter(logging.Formatter(conf["formatters"][spec["formatter"]]["format"]))
        handlers.append(handler)
    return handlers, conf["root"]["level"]


def _hydra(script):
    """Hydra set up as `python <script>` sets it up: its config directory, the script's name as the job's."""
    return initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3", job_name=Path(script).stem)


def compose_main(script, *overrides):
    """The config `python <script> <overrides>` runs with, `hydra` section included, composed by Hydra."""
    with _hydra(script):
        return compose(config_name=Path(script).stem, overrides=list(map(str, overrides)), return_hydra_config=True)


def run_main(script, *overrides, check=True, composed=None):
    """`python <script> <overrides>` inside this process, for the tests where no process boundary is under
    test. Hydra composes the script's config from the same overrides with its public API (`compose`), or
    `composed` is that config, from `compose_main`; the console log and the run's log file are set up from its
    job_logging config, and the run itself is called directly on the config without its `hydra` section:
    train.py's `experiment.training.train(cfg, run_dir, overrides)`, eval.py's and fuse.py's `main` (a config
    handed to a @hydra.main function goes straight to it), each with the script's error handling. Returns a
    CompletedProcess: the exit status (0, or that of the SystemExit the run raised), the console log as stdout,
    what was printed to stderr. Overrides must be ones a single run accepts (no -m)."""
    from experiment.errors import exit_on_user_error
    from experiment.run_dir import CLAIM
    from experiment.training import train

    overrides = list(map(str, overrides))
    main = _entry_point(script)
    stdout, stderr = io.StringIO(), io.StringIO()
    root, handlers, returncode, run_dir = logging.getLogger(), [], 0, None
    saved = root.handlers[:], root.level, signal.getsignal(signal.SIGINT)
    try:
        # Hydra stays set up while the run goes on, as under @hydra.main (library code may compose a config group)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), _hydra(script):
            try:
                cfg = composed if composed is not None else compose(
                    config_name=Path(script).stem, overrides=overrides, return_hydra_config=True)
                run_dir = Path(cfg.hydra.run.dir).absolute()  # resolved here, as `python <script>` resolves it
                with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
                    cfg.hydra.runtime.output_dir = str(run_dir)  # what the run's log file is named after
                run_dir.mkdir(parents=True, exist_ok=True)
                handlers, level = _log_handlers(cfg.hydra.job_logging, stdout)
                root.handlers[:] = handlers
                root.setLevel(level)
                task_cfg = copy.deepcopy(cfg)
                with read_write(task_cfg), open_dict(task_cfg):
                    del task_cfg["hydra"]
                if Path(script).stem == "train":
                    exit_on_user_error(train)(task_cfg, str(run_dir), OmegaConf.to_container(cfg.hydra.overrides.task))
                else:
                    main(task_cfg)
            except SystemExit as e:
                returncode = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for handler in handlers:
            handler.close()
        root.handlers[:], level, handler = saved
        root.setLevel(level)
        signal.signal(signal.SIGINT, handler)
    claim = run_dir / CLAIM if run_dir is not None and Path(script).stem == "train" else None
    if claim and claim.is_file() and claim.read_text().split()[:1] == [str(os.getpid())]:
        raise AssertionError(f"{script} {' '.join(overrides)} ended but left its claim on {run_dir}")
    proc = subprocess.CompletedProcess([script, *overrides], returncode, stdout.getvalue(), stderr.getvalue())
    if check and returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} exited {returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """One tiny trained run per model on digits, shared by the tests that need checkpoints."""
    base = tmp_path_factory.mktemp("trained")
    runs = {}
    # The AC run starts from the plain block (branch scales 1): with the default 1/3 this 8-channel network spends
    # its first two epochs near chance (35.8% after 3), so it could not show that training learns. The default
    # 1/3 is checked in test_configs.py, and at full width in the README's measurements.
    for model, options in (("alexnet", []), ("alexnet_ac", ["model.gamma_init=1"])):
        run_main("train.py", *TINY, f"model={model}", *options, "trainer.epochs=3", f"hydra.run.dir={base / model}")
        runs[model] = base / model
    return runs
