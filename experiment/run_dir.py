"""Run directories and output files: where train.py, eval.py, fuse.py and the bench write.

A run directory belongs to one run, never shared, agreed on by every torchrun process: train.py marks each one
it makes (RUN_MARKER), a new run takes only an absent or empty directory, and a resumed run continues only in
its own marked one (or in a new, empty one). Hydra names it (configs/train.yaml); two resolvers used there
(`register_resolvers`) make it safe: `run_dir` sends a resumed run back to its own directory, and gives
processes other than rank 0 a private scratch directory (they learn rank 0's over the process group), so a
torchrun job leaves exactly one run directory; `log_file` keeps those processes out of the run's log.

eval.py, fuse.py and the bench write never onto one of their inputs, never over a file they did not write
themselves, never into a place that cannot hold the file (`check_outputs`).
"""
import atexit
import contextlib
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from experiment.checkpoint import pid_alive, remove_stale_temporaries
from experiment.errors import UserError, exit_with


def _is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def _run_dir(resume, new_dir):
    if not _is_main_process():
        return str(Path(tempfile.gettempdir()) / f"alexnet-ac-rank{os.environ['RANK']}-{os.getpid()}")
    path = run_dir_of_checkpoint(resume) if resume else new_dir
    # Hydra makes the directory next, and reports a failure with a traceback: check, then make it here
    why = (_DOLLAR_BRACE if "${" in str(path) else None) or make_folder(path)
    if why:
        _exit_unusable_run_dir(path, why)
    return str(path)


SWEEP_DIR = "outputs/multirun"  # configs/train.yaml's hydra.sweep.dir, up to its time stamp


def check_run_dir_argument(argv):
    """Hydra makes the run directory (`hydra.run.dir=...` on the command line replaces the `run_dir` resolver)
    or, for a sweep (`-m`), the sweep directory before train.py runs, and reports a failure with a traceback:
    check the one it will make first."""
    sweep = "-m" in argv or "--multirun" in argv
    option = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    given = [arg.split("=", 1)[1].strip("'\"") for arg in argv if arg.startswith(f"{option}=")]
    path = given[-1] if given else SWEEP_DIR if sweep else None
    if path is None:
        return
    if "\\${" in path:  # an escaped `${`: a literal one in the folder's name
        _exit_unusable_run_dir(path.replace("\\${", "${"), _DOLLAR_BRACE, option)
    path = Path(path.split("${", 1)[0] or ".")  # the part before an interpolation (a time stamp) is what exists
    why = _folder_problem(path)  # creates nothing
    if why:
        _exit_unusable_run_dir(path, why, option)


# Hydra resolves its run directory's name again after train.py's resolver and the command line: a `${` in it,
# even escaped, ends in an InterpolationKeyError traceback
_DOLLAR_BRACE = "its name holds ${, which Hydra reads as an interpolation even when escaped: use a name without it"


def _exit_unusable_run_dir(path, why, option="hydra.run.dir"):
    what = "sweep" if option == "hydra.sweep.dir" else "run"
    exit_with(f"cannot use {path} as the {what} directory ({why}); pass a writable {option}")


def make_folder(path):
    """Make the folder `path` and its parents; why that cannot be done (see `_folder_problem`), or None."""
    why = _folder_problem(Path(path))
    if not why:
        try:  # what the check cannot foresee: a name too long, a full disk, a quota
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = e.strerror or str(e)
    return why


def _folder_problem(path):
    """Why nothing can be made at or below `path`, judged by its nearest existing path ("X is a file, not a
    folder", "X is not writable ..."), or None."""
    folder = path
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable (a read-only file system, or no permission)"
    return None


def register_resolvers():
    """The resolvers configs/train.yaml uses to name a run's directory, log file and model (`model_run_name`:
    <arch> or <arch>_ac for torchvision models); an entry point calls this before Hydra composes its config."""
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
    OmegaConf.register_new_resolver("log_file", lambda path: path if _is_main_process() else os.devnull, replace=True)
    OmegaConf.register_new_resolver("model_run_name", lambda arch, ac: f"{arch}_ac" if ac else arch, replace=True)


def run_dir_of_checkpoint(path):
    """<run>/checkpoints/last.pt -> <run>"""
    path = Path(path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


RUN_MARKER = ".alexnet-ac-run"  # written by train.py into every run directory it makes
CLAIM = ".run.lock"  # a running train.py's claim on its run directory


def check_run_dir_free(run_dir, resuming=None):
    """A run writes only into a directory it owns. A new run's directory is absent or empty; a resumed run goes
    on in its own directory, which holds the RUN_MARKER train.py wrote there, or starts afresh in an empty one.
    `resuming`: the path of the checkpoint a resumed run continues from; None for a new run."""
    run_dir = Path(run_dir)
    if not _contents(run_dir):
        return
    marked = (run_dir / RUN_MARKER).is_file()
    if resuming:
        if run_dir.resolve() != run_dir_of_checkpoint(resuming):
            raise UserError(f"{run_dir} already holds another run than the one {resuming} belongs to; leave out "
                            f"hydra.run.dir to continue in {run_dir_of_checkpoint(resuming)}, or pick a new directory")
        if not marked:
            raise UserError(f"{run_dir} is not a run directory train.py made (it has no {RUN_MARKER}: a checkpoint "
                            f"copied there, or a run older than the marker), so {resuming} does not continue there; "
                            f"pass hydra.run.dir=<a new folder> to continue that run in it")
        return
    last = run_dir / "checkpoints" / "last.pt"
    if marked and last.is_file():
        raise UserError(f"{run_dir} already holds a run; choose another hydra.run.dir, or continue that run with "
                        f"resume={last}")
    if marked:
        raise UserError(f"{run_dir} already holds a run that saved no checkpoint (it failed or was killed early); "
                        f"choose another hydra.run.dir, or delete {run_dir} to start there again")
    raise UserError(f"{run_dir} is not empty and was not made by train.py; a new run starts only in an empty or "
                    f"new folder: choose another hydra.run.dir")


def _contents(run_dir):
    """What `run_dir` holds besides run claims (a missing directory holds nothing)."""
    try:
        return [p for p in run_dir.iterdir() if not p.name.startswith(CLAIM)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def claim_run_dir(run_dir, resuming=None):
    """Make `run_dir` (created when absent) this process's: refuse a directory this run does not own (see
    `check_run_dir_free`) or one a running train.py has claimed, then mark it as a run directory (RUN_MARKER).
    The claim is a file holding `pid host`, created atomically; the caller releases it when the run ends
    (`release_run_dir`; at the latest it goes when this process exits), and one left by a killed process of this
    machine no longer counts. Returns the claim's path."""
    run_dir = Path(run_dir)
    lock = run_dir / CLAIM
    tmp = run_dir / f"{CLAIM}.{os.getpid()}.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # made by Hydra under train.py; `train` may be called without it
        tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        for _ in range(2):
            try:
                os.link(tmp, lock)  # atomic and exclusive: fails when the claim exists; never half-written
                break
            except FileExistsError:
                pid, host = _read_claim(lock) or (None, None)
                # another process that may still run (on another machine, or running here) keeps its claim
                if host and (host != socket.gethostname() or (pid != os.getpid() and pid_alive(pid))):
                    raise UserError(f"{run_dir} is in use by a running train.py (process {pid} on {host}); wait for "
                                    f"it to end or choose another hydra.run.dir (if no run is active there, delete "
                                    f"{lock})") from None
                lock.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot claim {run_dir} as the run directory ({e.strerror or e}); pass a writable "
                        f"hydra.run.dir") from None
    finally:
        tmp.unlink(missing_ok=True)
    try:  # under the claim, so no other train.py can take the directory between the check and the marker
        check_run_dir_free(run_dir, resuming)
        marker = run_dir / RUN_MARKER
        if not marker.exists():
            marker.write_text(f"a run directory made by train.py on {time.strftime('%Y-%m-%d %H:%M:%S')}; only "
                              f"this run writes here (train.py resume=... continues it)\n")
    except BaseException:
        release_run_dir(lock)
        raise
    atexit.register(release_run_dir, lock)
    for name in ("last.pt", "best.pt"):  # what a killed save left behind
        remove_stale_temporaries(run_dir / "checkpoints" / name)
    return lock


def release_run_dir(lock):
    if _read_claim(lock) == (os.getpid(), socket.gethostname()):
        # a claim that cannot be removed must not replace how the run ended (its exit status, its error): once
        # this process is gone, the claim no longer counts on this machine, and the refusal elsewhere names it
        with contextlib.suppress(OSError):
            Path(lock).unlink(missing_ok=True)


def _read_claim(lock):
    """(pid, host) written in a claim file, or None when there is none or it is unreadable."""
    try:
        pid, host = Path(lock).read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def check_outputs(outputs, inputs, option="out", replaceable=lambda path: False):
    """Refuse, before any work, `outputs` (paths, None skipped) that would replace an input (the same file by
    name, through a symbolic link or as a hard link), that coincide, whose folder cannot be made or written, or
    that would replace an existing file the tool did not write: `replaceable(path)` recognises the tool's own
    earlier outputs. `option` is the setting the user changes to fix it. Returns the outputs as Paths."""
    outputs = [Path(p).expanduser() for p in outputs if p is not None]
    inputs = [Path(p).expanduser() for p in inputs if p is not None]
    for i, out in enumerate(outputs):
        for other in inputs + outputs[:i]:
            if _same_file(out, other):
                what = "the input" if other in inputs else "another output,"
                raise UserError(f"{option}={out} would overwrite {what} {other}; pass another {option}=")
        why = _folder_problem(out.parent)
        if why:
            raise UserError(f"cannot write {out}: {why}; pass another {option}= in a writable folder")
        if out.is_dir():
            raise UserError(f"cannot write {out}: it is a folder; pass a file name as {option}=")
        if out.is_file() and not replaceable(out):
            raise UserError(f"{option}={out} would replace a file this tool did not write (only its own earlier "
                            f"outputs are replaced); pass another {option}=, or move that file away first")
    return outputs


def is_deploy_checkpoint(path):
    """Whether `path` is a deploy checkpoint, as fuse.py writes them (read as data, never run)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a checkpoint at all: not fuse.py's either
        return False
    return isinstance(ckpt, dict) and ckpt.get("deploy") is True and isinstance(ckpt.get("model"), dict)


def is_eval_report(path):
    """Whether `path` is a JSON report as eval.py writes them (a run's metrics.json is not)."""
    return is_json_with_keys(path, {"checkpoint", "acc1", "acc5", "num_samples"})


def is_json_with_keys(path, keys):
    """Whether `path` holds a JSON object with (at least) `keys`: how a tool recognises its own earlier output."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and keys <= obj.keys()


def _same_file(a, b):
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links: two names, one file
    except OSError:  # one of them does not exist (yet)
        return False
