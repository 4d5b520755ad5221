"""Checkpoints: save, load and check them, and `CheckpointSaver`, which keeps a run's last.pt and best.pt.

A checkpoint is a dict of plain containers, written atomically and read with `weights_only=True`: `model`
(state_dict), `config` (the resolved run config as plain containers, enough to rebuild the model), and for
training checkpoints `optimizer`, `scheduler`, `scaler`, `epoch` (epochs completed), `step` (steps done in
the epoch after that, non-zero only for an interrupted run), `best_acc1`, `history` and `rng`. Deploy
checkpoints carry `deploy: True` instead of training state.

Files are written whole or not at all (`atomic_write`); where runs and tools may write is experiment/run_dir.py.
"""
import contextlib
import glob
import os
import pickle
import re
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from experiment.config import check_stored_config, escape_interpolations
from experiment.errors import UserError, first_line


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
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the folders made here, deepest first, as long as they are empty:
            for folder in made:  # an empty checkpoints/ would make a run directory look as if it held checkpoints
                folder.rmdir()
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save reports a short write (disk full) as a RuntimeError
            raise
        kept = f"the previous {path} is intact" if path.exists() else f"nothing was written to {path}"
        raise UserError(f"could not write {what} {path} ({first_line(e) or type(e).__name__}); {kept}. Free disk space "
                        f"(df -h {path.parent}) or fix permissions{then}") from None
    return path


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

    def save_epoch(self, epoch, is_best, state, save_last=False):
        """After epoch `epoch` (counted from 1); `state()` builds the checkpoint when one is due (`save_last`:
        last.pt is, whatever `save_every` says). Returns the path of last.pt when it was written here."""
        save_last = save_last or epoch % self.save_every == 0 or epoch == self.epochs
        if not (save_last or is_best):
            return None
        state = state()
        if not self.enabled:
            return None
        last, best = self.directory / "last.pt", self.directory / "best.pt"
        if save_last:
            save_checkpoint(state, last, then=self._then())
        if is_best and save_last:  # the same state: a second name, not a second write
            link_checkpoint(last, best)
        elif is_best:
            save_checkpoint(state, best, then=self._then())
        return last if save_last else None

    def save_interrupted(self, state):
        """last.pt of a run stopped mid-epoch: its path on rank 0, None elsewhere."""
        return save_checkpoint(state, self.directory / "last.pt", then=self._then()) if self.enabled else None

    def _then(self):
        """What a failed save advises: resuming from the last.pt there is, else a new run."""
        last = self.directory / "last.pt"
        if last.is_file():
            return f", then resume with: python {resume_command(last)}"
        return ", then start the run again with another hydra.run.dir (this run saved no checkpoint to resume from)"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path, map_location="cpu", training=False):
    """Read a checkpoint without running any code it may carry; a UserError for anything unusable.
    `training=True` also requires the training state that resuming needs."""
    path = Path(path)
    if path.is_dir():  # a run directory, or its checkpoints/ folder
        name = "last.pt" if training else "best.pt"  # a resumed run continues from its last state
        found = next((p for p in (path / "checkpoints" / name, path / name) if p.is_file()), None)
        raise UserError(f"checkpoint {path} is a folder, not a file; pass " + (
            f"{found}" if found else f"the path of a .pt file, e.g. outputs/<run>/checkpoints/{name}"))
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
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line(e, 100) or type(e).__name__}); "
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

