"""Checkpoints: plain containers only, written atomically, read with `weights_only=True`.

A checkpoint is a dict with `model` (state_dict), `config` (the resolved run config as plain containers,
enough to rebuild the model), and for training checkpoints `optimizer`, `scheduler`, `scaler`, `epoch`
(epochs completed), `step` (steps done in the epoch after that, non-zero only for an interrupted run),
`best_acc1`, `history` and `rng`. Deploy checkpoints carry `deploy: True` instead of training state.
"""
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from experiment.errors import UserError


def save_checkpoint(state, path):
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint without running any code it may carry; a UserError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file, e.g. "
                        f"outputs/<run>/checkpoints/best.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"refusing to load {path}: it holds pickled Python objects, which could run code; "
                            f"only checkpoints of plain tensors and containers are accepted") from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({e}); pass a .pt file written by train.py") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:100]}); "
                        f"pass a .pt file written by train.py or fuse.py") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this repository (needs 'model' and 'config' entries); "
                        f"pass a .pt file written by train.py or fuse.py")
    return ckpt


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
