"""A Hydra callback for the sweep tests (tests/test_sweep_processes.py): after each job of a `-m` sweep it
appends the number of live child processes of the sweep's process to a file. Loaded by the entry point's
process through `+hydra.callbacks.probe._target_=sweep_probe.ChildProcesses` with tests/ on PYTHONPATH."""
import os
from pathlib import Path

from hydra.experimental.callback import Callback


def child_processes(pid=None):
    """Ids of the live (not yet reaped) child processes of `pid` (default: this process), from /proc."""
    pid = pid or os.getpid()
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    return sorted(set(map(int, children)))


class ChildProcesses(Callback):
    def __init__(self, log):
        self.log = Path(log)

    def on_job_end(self, config, job_return, **kwargs):
        with self.log.open("a") as f:
            f.write(f"{config.hydra.job.num} {len(child_processes())}\n")
