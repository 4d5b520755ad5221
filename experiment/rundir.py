"""Run directories: one per run, never shared, agreed on by every torchrun process.

Hydra names the directory (configs/train.yaml). Two resolvers used there make it safe:
`run_dir` sends a resumed run back to its own directory, and gives processes other than rank 0 a private
scratch directory (they learn rank 0's over the process group), so a torchrun job leaves exactly one run
directory; `log_file` keeps those processes out of the run's log.
"""
import os
import shlex
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from experiment.errors import UserError


def _is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def _run_dir(resume, new_dir):
    if not _is_main_process():
        return str(Path(tempfile.gettempdir()) / f"alexnet-ac-rank{os.environ['RANK']}-{os.getpid()}")
    if resume:
        return str(run_dir_of_checkpoint(resume))
    return new_dir


def _log_file(path):
    return path if _is_main_process() else os.devnull


OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("log_file", _log_file, replace=True)


def run_dir_of_checkpoint(path):
    """<run>/checkpoints/last.pt -> <run>"""
    path = Path(path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def check_run_dir_free(run_dir, resuming=None):
    """A run never writes into a directory that already holds a run, unless it is resuming that very run.
    `resuming`: the path of the checkpoint a resumed run continues from; None for a new run."""
    run_dir = Path(run_dir)
    taken = (run_dir / "checkpoints").exists() or (run_dir / "metrics.json").exists()
    if not taken or (resuming and run_dir.resolve() == run_dir_of_checkpoint(resuming)):
        return
    if resuming:
        raise UserError(f"{run_dir} already holds another run than the one {resuming} belongs to; leave out "
                        f"hydra.run.dir to continue in {run_dir_of_checkpoint(resuming)}, or pick a new directory")
    raise UserError(f"{run_dir} already holds a run; choose another hydra.run.dir, or continue that run with "
                    f"resume={run_dir / 'checkpoints' / 'last.pt'}")


def resume_command(checkpoint):
    """The command line that continues a run from `checkpoint` (which holds the run's whole config)."""
    # train.py as it was typed, so the command works from the same directory (under a launcher such as submitit,
    # whose own script is argv[0], its absolute path); quoted, since paths may hold spaces
    script = sys.argv[0]
    if Path(script).name != "train.py":
        script = str(Path(__file__).resolve().parents[1] / "train.py")
    return shlex.join([script, f"resume={checkpoint}"])
