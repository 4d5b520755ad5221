"""Run directories: one per run, never shared, agreed on by every torchrun process.

Hydra names the directory (configs/train.yaml). Two resolvers used there make it safe:
`run_dir` sends a resumed run back to its own directory, and gives processes other than rank 0 a private
scratch directory (they learn rank 0's over the process group), so a torchrun job leaves exactly one run
directory; `log_file` keeps those processes out of the run's log.
"""
import atexit
import os
import re
import shlex
import socket
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
    return _writable_dir(run_dir_of_checkpoint(resume) if resume else new_dir)


def _writable_dir(path):
    """Hydra creates the run directory and its log before train.py runs, and reports a failure there with a
    traceback: so the check happens here, when Hydra asks for the directory, with the usual one line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable (a read-only file system, or no permission)")
    except OSError as e:
        print(f"error: cannot use {path} as the run directory ({e.strerror or e}); pass a writable "
              f"hydra.run.dir", file=sys.stderr, flush=True)
        sys.exit(2)
    return str(path)


def check_run_dir_argument(argv):
    """A `hydra.run.dir=...` on the command line replaces the `run_dir` resolver, and Hydra makes that directory
    before train.py runs, reporting a failure with a traceback: look at its nearest existing folder first, with
    the usual one line, creating nothing. (A sweep, `-m`, does not use hydra.run.dir.)"""
    if "-m" in argv or "--multirun" in argv:
        return
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            path = Path(arg.split("=", 1)[1].strip("'\""))
            folder = path
            while not os.path.lexists(folder) and folder != folder.parent:
                folder = folder.parent
            problem = ("not a folder" if not folder.is_dir() else
                       "not writable" if not os.access(folder, os.W_OK | os.X_OK) else None)
            if problem:
                print(f"error: cannot use {path} as the run directory ({folder} is {problem}); pass a writable "
                      f"hydra.run.dir", file=sys.stderr, flush=True)
                sys.exit(2)


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


CLAIM = ".run.lock"


def claim_run_dir(run_dir, resuming=None):
    """Make `run_dir` this process's: refuse a directory that holds another run (see `check_run_dir_free`) or
    that a running train.py has claimed. The claim is a file holding `pid host`, created atomically; it goes
    when this process exits, and one left by a killed process of this machine no longer counts."""
    run_dir = Path(run_dir)
    check_run_dir_free(run_dir, resuming)
    lock = run_dir / CLAIM
    tmp = run_dir / f"{CLAIM}.{os.getpid()}.tmp"
    try:
        tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        for _ in range(2):
            try:
                os.link(tmp, lock)  # atomic and exclusive: fails when the claim exists; never half-written
                break
            except FileExistsError:
                owner = _claim_owner(lock)
                if owner is not None:
                    raise UserError(f"{run_dir} is in use by a running train.py (process {owner[0]} on "
                                    f"{owner[1]}); wait for it to end or choose another hydra.run.dir (if no "
                                    f"run is active there, delete {lock})") from None
                lock.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot claim {run_dir} as the run directory ({e.strerror or e}); pass a writable "
                        f"hydra.run.dir") from None
    finally:
        tmp.unlink(missing_ok=True)
    atexit.register(release_run_dir, lock)
    from experiment.checkpoint import remove_stale_temporaries  # what a killed save left behind

    for name in ("last.pt", "best.pt"):
        remove_stale_temporaries(run_dir / "checkpoints" / name)
    return lock


def release_run_dir(lock):
    if _claim_owner(lock, mine=True) is not None:
        Path(lock).unlink(missing_ok=True)


def _claim_owner(lock, mine=False):
    """(pid, host) of a live claim, or None when it is stale: its process no longer runs on this machine, or
    (`mine=False`) it is this process's own. `mine=True`: (pid, host) only when it is this process's."""
    from experiment.checkpoint import pid_alive

    try:
        pid, host = Path(lock).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None
    here = host == socket.gethostname()
    if mine:
        return (pid, host) if here and pid == os.getpid() else None
    if here and (pid == os.getpid() or not pid_alive(pid)):
        return None
    return pid, host


def hydra_quote(value):
    """`value` as a single-quoted Hydra override value: Hydra's grammar stops unquoted values at `,` `'` `[`
    `=` spaces and non-ASCII letters. Inside quotes only a quote and the backslashes right before a quote (or
    the closing one) are escapes."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(value))
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return f"'{value}'"


def resume_command(checkpoint):
    """The command line that continues a run from `checkpoint` (which holds the run's whole config)."""
    # train.py as it was typed, so the command works from the same directory (under a launcher such as submitit,
    # whose own script is argv[0], its absolute path); quoted, since paths may hold spaces
    script = sys.argv[0]
    if Path(script).name != "train.py":
        script = str(Path(__file__).resolve().parents[1] / "train.py")
    return shlex.join([script, f"resume={hydra_quote(checkpoint)}"])
