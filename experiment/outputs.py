"""Where eval.py, fuse.py and the bench write: never onto one of their inputs, never into a place that cannot
hold the file, never half a file (each output is written atomically: `experiment.checkpoint.atomic_write`)."""
import os
from pathlib import Path

from experiment.errors import UserError


def check_outputs(outputs, inputs, option="out"):
    """Refuse, before any work, `outputs` (paths, None skipped) that would replace an input (the same file by
    name, through a symbolic link or as a hard link), that coincide, or whose folder cannot be made or written.
    `option` is the setting the user changes to fix it. Returns the outputs as Paths."""
    outputs = [Path(p).expanduser() for p in outputs if p is not None]
    inputs = [Path(p).expanduser() for p in inputs if p is not None]
    for i, out in enumerate(outputs):
        for other in inputs + outputs[:i]:
            if _same_file(out, other):
                what = "the input" if other in inputs else "another output,"
                raise UserError(f"{option}={out} would overwrite {what} {other}; pass another {option}=")
        _check_folder(out, option)
    return outputs


def _same_file(a, b):
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links: two names, one file
    except OSError:  # one of them does not exist (yet)
        return False


def _check_folder(path, option):
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: {folder} is a file, not a folder; pass another {option}=")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {folder} is not writable (a read-only file system, or no "
                        f"permission); pass an {option}= in a writable folder")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; pass a file name as {option}=")


def staging_path(path):
    """A temporary name beside `path` for a file written by other code (e.g. the ONNX exporter), moved onto
    `path` by `publish` only once every check passed; a killed writer's leftover is removed at the next
    write of `path` (`experiment.checkpoint.remove_stale_temporaries`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.staged.tmp")


def publish(staged, path):
    try:
        os.replace(staged, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); free disk space or fix permissions") from None
    return Path(path)
