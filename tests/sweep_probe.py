"""A Hydra callback for the sweep tests (tests/test_sweep_processes.py): after each job of a `-m` sweep it
appends the number of live child processes of the sweep's process to a file. Loaded by the entry point's
process through `+hydra.callbacks.probe._target_=sweep_probe.ChildProcesses` with tests/ on PYTHONPATH."""
from pathlib import Path

from hydra.experimental.callback import Callback

from experiment.sweep_bench import child_processes


class ChildProcesses(Callback):
    def __init__(self, log):
        self.log = Path(log)

    def on_job_end(self, config, job_return, **kwargs):
        with self.log.open("a") as f:
            f.write(f"{config.hydra.job.num} {len(child_processes())}\n")
