"""A `-m` sweep runs its jobs in one process: no job may leave DataLoader workers behind, and a signal to the
process group (Ctrl-C, `timeout`, `scancel`) stops the whole sweep after the running job saved its state."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, script_env
from test_train import write_image_tree

PROBE = ["+hydra.callbacks.probe._target_=sweep_probe.ChildProcesses"]


def image_folder(root, per_class=8):
    write_image_tree(root, per_class=per_class)
    return root


def streamed(root, workers=2):
    """A folder dataset read through DataLoader workers, not the decoded cache."""
    return ["dataset=folder", f"dataset.root={root}", "dataset.image_size=32", f"dataset.num_workers={workers}",
            "dataset.cache=off", "dataset.batch_size=4", "dataset.eval_batch_size=6"]


def sweep(*overrides, start_new_session=False):
    env = script_env({"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *map(str, overrides)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=start_new_session)


def test_no_job_of_a_sweep_leaves_workers_behind(tmp_path):
    root = image_folder(tmp_path / "data")
    log = tmp_path / "children.txt"
    proc = sweep(*TINY, *streamed(root), "trainer.epochs=2", "seed=0,1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 *PROBE, f"+hydra.callbacks.probe.log={log}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert log.read_text().split("\n")[:-1] == ["0 0", "1 0", "2 0"], out[-3000:]  # job number, live children
    assert "can only test a child process" not in out and "Traceback" not in out, out[-3000:]
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_stops_the_whole_sweep(tmp_path, sig):
    root = image_folder(tmp_path / "data", per_class=30)
    sweep_dir = tmp_path / "sweep"
    proc = sweep(*TINY, *streamed(root), "trainer.epochs=50", "seed=0,1,2", f"hydra.sweep.dir={sweep_dir}",
                 start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        first_log = sweep_dir / "0_alexnet_ac_folder_seed0" / "train.log"
        while not (first_log.is_file() and "epoch 1/50" in first_log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, sig)  # as Ctrl-C in a terminal, `timeout` or `scancel` do: every process of the group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    saved = re.search(rf"interrupted \({sig.name}\) at epoch \d+, step \d+; saved (.+)$", out, re.M)
    assert saved and saved.group(1) == str(first_log.parent / "checkpoints" / "last.pt"), out[-3000:]
    assert re.search(r"^resume with: python \S+train\.py .*resume=.*last\.pt", out, re.M), out[-3000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0_alexnet_ac_folder_seed0"]  # no later job
    for _ in range(100):  # the workers are gone with their sweep: nothing of the group is left
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("processes of the sweep's group outlived it")


@pytest.mark.parametrize("failure, says", [
    (["dataset.image_size=8"], "too small"),  # refused after set-up started the loaders' workers
    (["optimizer.lr=1e12"], "non-finite"),  # a UserError from the middle of the epoch loop
])
def test_a_run_that_fails_ends_its_workers_too(tmp_path, failure, says):
    from conftest import run_main
    from experiment.sweep_bench import child_processes

    before = child_processes()
    root = image_folder(tmp_path / "data")
    proc = run_main("train.py", *TINY, *streamed(root), "trainer.epochs=2", *failure,
                    f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert child_processes() == before


UNCLOSED = """
import sys
from omegaconf import OmegaConf
from experiment.data import build_test_loader, load_dataset
cfg = OmegaConf.load("configs/dataset/folder.yaml")
cfg.root, cfg.image_size, cfg.num_workers, cfg.cache, cfg.eval_batch_size = sys.argv[1], 32, 2, "off", 5
loader = build_test_loader(load_dataset(cfg, train=False), cfg, device="cpu")
print(sum(len(y) for _, y in loader.epoch(0)))
"""


def _children():
    """The pids of this process's live (not zombie) child processes, read from /proc."""
    found = []
    for stat in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append(int(stat))
    return found


def test_a_loader_nobody_closed_ends_its_workers_when_it_is_collected(tmp_path):
    import gc

    from omegaconf import OmegaConf

    from experiment.data import build_test_loader, load_dataset

    root = image_folder(tmp_path / "data", per_class=4)
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "folder.yaml")
    cfg.root, cfg.image_size, cfg.num_workers, cfg.cache, cfg.eval_batch_size = str(root), 32, 2, "off", 5
    before = set(_children())
    loader = build_test_loader(load_dataset(cfg, train=False), cfg, device="cpu")
    assert sum(len(y) for _, y in loader.epoch(0)) == 12
    assert len(set(_children()) - before) == 2  # persistent workers, alive between epochs
    del loader
    gc.collect()
    assert set(_children()) - before == set()


def test_a_process_exits_even_with_a_loader_left_open(tmp_path):
    """Workers ignore SIGTERM, which is what multiprocessing's exit hook sends them before it waits for them: a
    loader nobody closed (eval.py and fuse.py leave theirs to the end of the process) must still let it exit."""
    root = image_folder(tmp_path / "data", per_class=4)
    proc = subprocess.run([sys.executable, "-c", UNCLOSED, str(root)], cwd=ROOT, text=True, capture_output=True,
                          env=script_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "12", proc.stderr[-2000:]
