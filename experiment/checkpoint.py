"""Checkpoints, run directories and output files: what a run and the tools around it write, and where.

A checkpoint is a dict of plain containers, written atomically and read with `weights_only=True`: `model`
(state_dict), `config` (the resolved run config as plain containers, enough to rebuild the model), and for
training checkpoints `optimizer`, `scheduler`, `scaler`, `epoch` (epochs completed), `step` (steps done in
the epoch after that, non-zero only for an interrupted run), `best_acc1`, `history` and `rng`. Deploy
checkpoints carry `deploy: True` instead of training state.

A run directory belongs to one run, never shared, agreed on by every torchrun process: train.py marks each one
it makes (RUN_MARKER), a new run takes only an absent or empty directory, and a resumed run continues only in
its own marked one (or in a new, empty one). Hydra names it (configs/train.yaml); two resolvers used there
make it safe: `run_dir` sends a resumed run back to its own directory, and gives processes other than rank 0
a private scratch directory (they learn rank 0's over the process group), so a torchrun job leaves exactly
one run directory; `log_file` keeps those processes out of the run's log.

eval.py, fuse.py and the bench write never onto one of their inputs, never over a file they did not write
themselves, never into a place that cannot hold the file, never half a file (`atomic_write`).
"""
import atexit
import glob
import json
import os
import pickle
import re
import shlex
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from experiment.config import escape_interpolations
from experiment.errors import UserError


# What train.py needs besides `model` and `config` to continue a run.
TRAINING_KEYS = ("optimizer", "scheduler", "epoch", "step", "best_acc1", "history", "rng", "train_totals")


def atomic_write(path, write, what="file", then=""):
    """Call `write(binary file)` on a temporary file beside `path`, then rename it to `path`: a crash never
    leaves a half-written `path`. A failed write (a full disk, no permission) leaves `path` as it was,
    removes the temporary file and raises a UserError whose advice ends with `then`."""
    path = Path(path)
    tmp = None
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # what a failure must not leave
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; these are ordinary files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write (disk full) as a RuntimeError
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        _remove_empty(made)  # an empty checkpoints/ would make a run directory look as if it held checkpoints
        kept = f"the previous {path} is intact" if path.exists() else f"nothing was written to {path}"
        raise UserError(f"could not write {what} {path} ({_first_line(e)}); {kept}. Free disk space "
                        f"(df -h {path.parent}) or fix permissions{then}") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        _remove_empty(made)
        raise
    return path


def _remove_empty(folders):
    """Remove `folders` (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def remove_stale_temporaries(path):
    """Remove the temporary files a killed writer of `path` left (`.<name>.<pid>.<random>.tmp` whose pid is
    no longer running on this machine); a live writer's temporary file is kept."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or not pid_alive(int(pid)):  # no pid: an older version's name
            tmp.unlink(missing_ok=True)


def pid_alive(pid):
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_checkpoint(state, path, then=""):
    """Write a checkpoint atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(state, f), what="checkpoint", then=then)


def link_checkpoint(source, path):
    """Make `path` a second name of the checkpoint file `source`, atomically: best.pt costs no second write
    when it is the epoch last.pt just saved. A later os.replace of `source` leaves `path` untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:  # a file system without hard links
        tmp.unlink(missing_ok=True)
        atomic_write(path, lambda f: f.write(Path(source).read_bytes()), what="checkpoint")
    return path


class CheckpointSaver:
    """The one rule for what a run keeps: last.pt every `save_every` epochs and after the last one; best.pt
    whenever an epoch scores best so far, as a hard link to last.pt when that is the very same state, else as a
    write of its own. Only rank 0 writes (`enabled`); the state is built on every rank, since building it
    gathers their RNG states."""

    def __init__(self, directory, save_every, epochs, enabled=True):
        self.directory, self.save_every, self.epochs, self.enabled = Path(directory), save_every, epochs, enabled

    def save_epoch(self, epoch, is_best, state):
        """After epoch `epoch` (counted from 1); `state()` builds the checkpoint when one is due."""
        save_last = epoch % self.save_every == 0 or epoch == self.epochs
        if not (save_last or is_best):
            return
        state = state()
        if not self.enabled:
            return
        last, best = self.directory / "last.pt", self.directory / "best.pt"
        if save_last:
            save_checkpoint(state, last, then=self._then())
        if is_best and save_last:  # the same state: a second name, not a second write
            link_checkpoint(last, best)
        elif is_best:
            save_checkpoint(state, best, then=self._then())

    def save_interrupted(self, state):
        """last.pt of a run stopped mid-epoch: its path on rank 0, None elsewhere."""
        return save_checkpoint(state, self.directory / "last.pt", then=self._then()) if self.enabled else None

    def _then(self):
        """What a failed save advises: resuming from the last.pt there is, else a new run."""
        last = self.directory / "last.pt"
        if last.is_file():
            return f", then resume with: python {resume_command(last)}"
        return ", then start the run again with another hydra.run.dir (this run saved no checkpoint to resume from)"


def _first_line(error, limit=160):
    lines = str(error).strip().splitlines()
    return (lines[0][:limit] if lines else "") or type(error).__name__


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path, map_location="cpu", training=False):
    """Read a checkpoint without running any code it may carry; a UserError for anything unusable.
    `training=True` also requires the training state that resuming needs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file, e.g. "
                        f"outputs/<run>/checkpoints/best.pt")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is not a readable PyTorch checkpoint (the file is empty: an interrupted copy "
                        f"or download?); pass a .pt file written by train.py or fuse.py")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on an unusual pickle protocol: the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # torch 2.4: "Unsupported global", 2.14: "unsupported GLOBAL"
            raise UserError(f"refusing to load {path}: it holds pickled Python objects, which could run code; "
                            f"only checkpoints of plain tensors and containers are accepted") from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint (torch.load with weights_only=True "
                        f"rejects its contents); pass a .pt file written by train.py or fuse.py") from None
    except Exception as e:  # RuntimeError, EOFError, BadZipFile, ValueError, OSError, ...: a damaged file
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e, 100)}); "
                        f"pass a .pt file written by train.py or fuse.py") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("config"), dict)
            and isinstance(ckpt["config"].get("model"), dict) and isinstance(ckpt.get("num_classes"), int)):
        raise UserError(f"{path} is not a checkpoint of this repository (needs 'model', 'config' and 'num_classes' "
                        f"entries); pass a .pt file written by train.py or fuse.py")
    if ckpt.get("deploy") not in (None, True, False):
        raise UserError(f"{path} has deploy={ckpt['deploy']!r}, not true or false (an edited file or other code); "
                        f"pass a .pt file written by train.py or fuse.py")
    num_classes, classes = ckpt["num_classes"], ckpt.get("classes")
    if (isinstance(num_classes, bool) or num_classes < 1 or not (classes is None or (
            isinstance(classes, list) and len(classes) == num_classes and all(isinstance(c, str) for c in classes)))):
        raise UserError(f"{path} has num_classes={num_classes!r} and classes that do not match it (an edited file or "
                        f"other code); pass a .pt file written by train.py or fuse.py")
    missing = [k for k in TRAINING_KEYS if k not in ckpt] if training else []
    if missing:
        what = "a deploy checkpoint" if ckpt.get("deploy") else f"missing {', '.join(missing)}"
        raise UserError(f"{path} cannot be resumed ({what}); resume from the run's checkpoints/last.pt")
    from experiment.config import check_stored_config

    check_stored_config(ckpt["config"], path, training=training)
    if training:
        _check_training_state(ckpt, path)
    return ckpt


def _check_training_state(ckpt, path):
    """The resume state has the types train.py wrote; an edited one is refused here, not mid-run."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = {"epoch": whole(ckpt["epoch"]), "step": whole(ckpt["step"]),
          "best_acc1": ckpt["best_acc1"] is None or isinstance(ckpt["best_acc1"], (int, float)),
          "history": isinstance(ckpt["history"], list) and all(isinstance(h, dict) for h in ckpt["history"]),
          "rng": isinstance(ckpt["rng"], list) and len(ckpt["rng"]) > 0
          and all(isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) for r in ckpt["rng"]),
          "train_totals": ckpt["train_totals"] is None or (isinstance(ckpt["train_totals"], list)
                                                            and all(isinstance(t, dict) for t in ckpt["train_totals"])),
          "optimizer": isinstance(ckpt["optimizer"], dict), "scheduler": isinstance(ckpt["scheduler"], dict)}
    bad = [k for k, good in ok.items() if not good]
    if bad:
        raise UserError(f"{path} cannot be resumed: its {', '.join(bad)} entry is not what train.py writes (an "
                        f"edited file or other code); resume from an unedited checkpoints/last.pt")


def rng_state():
    """This process's random state: the CPU generator and, when used, its own CUDA device's (one device per
    process, so the state fits a machine with another number of GPUs)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def _run_dir(resume, new_dir):
    if not _is_main_process():
        return str(Path(tempfile.gettempdir()) / f"alexnet-ac-rank{os.environ['RANK']}-{os.getpid()}")
    path = run_dir_of_checkpoint(resume) if resume else new_dir
    # Hydra makes the directory next, and reports a failure with a traceback: check, then make it here
    why = (_DOLLAR_BRACE if "${" in str(path) else None) or _folder_problem(Path(path))
    if not why:
        try:  # what the check cannot foresee: a name too long, a full disk, a quota
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = e.strerror or str(e)
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
    print(f"error: cannot use {path} as the {what} directory ({why}); pass a writable {option}", file=sys.stderr,
          flush=True)
    sys.exit(2)


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


def _log_file(path):
    return path if _is_main_process() else os.devnull


OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("log_file", _log_file, replace=True)


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
        own = run_dir.resolve() == run_dir_of_checkpoint(resuming)
        if own and marked:
            return
        if own:
            raise UserError(f"{run_dir} is not a run directory train.py made (it has no {RUN_MARKER}: a checkpoint "
                            f"copied there, or a run older than the marker), so {resuming} does not continue there; "
                            f"pass hydra.run.dir=<a new folder> to continue that run in it")
        raise UserError(f"{run_dir} already holds another run than the one {resuming} belongs to; leave out "
                        f"hydra.run.dir to continue in {run_dir_of_checkpoint(resuming)}, or pick a new directory")
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
    """Make `run_dir` this process's: refuse a directory this run does not own (see `check_run_dir_free`) or
    one a running train.py has claimed, then mark it as a run directory (RUN_MARKER). The claim is a file
    holding `pid host`, created atomically; it goes when this process exits, and one left by a killed process
    of this machine no longer counts."""
    run_dir = Path(run_dir)
    lock = run_dir / CLAIM
    tmp = run_dir / f"{CLAIM}.{os.getpid()}.tmp"
    try:
        tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        for _ in range(2):
            try:
                os.link(tmp, lock)  # atomic and exclusive: fails when the claim exists; never half-written
                break
            except FileExistsError:
                owner = _live_owner(lock)
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
        Path(lock).unlink(missing_ok=True)


def _read_claim(lock):
    """(pid, host) written in a claim file, or None when there is none or it is unreadable."""
    try:
        pid, host = Path(lock).read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _live_owner(lock):
    """(pid, host) of the claim's owner when it is another process that may still run: on another machine,
    or running here; None when the claim is stale (its process ended) or this process's own."""
    owner = _read_claim(lock)
    if owner and owner[1] == socket.gethostname() and (owner[0] == os.getpid() or not pid_alive(owner[0])):
        return None
    return owner


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
    # escaped for OmegaConf too: a `${` in the path is part of a folder name, not an interpolation
    return shlex.join([script, f"resume={hydra_quote(escape_interpolations(str(checkpoint)))}"])


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
        _check_folder(out, option)
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
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"checkpoint", "acc1", "acc5", "num_samples"} <= report.keys()


def _same_file(a, b):
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links: two names, one file
    except OSError:  # one of them does not exist (yet)
        return False


def _check_folder(path, option):
    why = _folder_problem(path.parent)
    if why:
        raise UserError(f"cannot write {path}: {why}; pass another {option}= in a writable folder")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; pass a file name as {option}=")
