"""Image folders decoded once into a uint8 tensor cache.

Decoding is most of the cost of a small-image folder: a sweep that decodes its folder in every job, through
DataLoader workers, spends more time decoding than training. A folder split that fits `dataset.cache_max_gb`
is decoded once, in parallel, into (N, 3, h, w) uint8, written to a cache file outside the dataset folder and
reused by every later job, process and rank. The file's name is a hash of the split's file list with each
file's size and modification time, plus the training resolution: a changed, added or removed image, or another
`dataset.image_size`, makes another name, so a stale cache is never read (and the new file replaces the
split's old one). The decode pass also finds the unreadable images, so no separate verification scan is needed.

What is stored is what the augmentation needs. The test view is deterministic, so every image's test view
(image_folder.test_view: resize, centre crop) is computed at decode time by the very PIL operations the streamed
path runs: it is the streamed path's, exactly, whatever the images' sizes. The test split stores nothing else;
the training split stores it too, for the images `dataset.val_split` holds out of it. For the training crops
the training split also stores every image: as they are when all share one size, unless they are larger than
the training crops can use; otherwise each is resized to a fixed square side (`stored_side`) and its original
size is kept: the crop boxes are drawn in original pixels, exactly as torchvision's RandomResizedCrop draws
them, and mapped onto the stored image.
"""
import hashlib
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiment.checkpoint import atomic_write, remove_stale_temporaries
from experiment.errors import UserError
from experiment.image_folder import UnreadableImage, read_rgb, test_view

log = logging.getLogger(__name__)

FORMAT = 2  # bump when what a cache file holds changes: old files then get other names and are never read
SMALLEST_CROP_SCALE = 0.08  # torchvision RandomResizedCrop's default lower bound on the crop's area fraction


@dataclass
class DecodedSplit:
    """One split of an image folder, decoded: what the device loaders serve."""

    images: torch.Tensor | None  # (N, 3, h, w) uint8 at the stored size, for training crops; None: test split
    views: torch.Tensor  # (N, 3, size, size) uint8: each image's test view, computed by PIL (`test_view`)
    sizes: torch.Tensor  # (N, 2) int64: each image's original (height, width), in which crops are drawn
    labels: torch.Tensor  # (N,) int64
    root: str  # the split's folder, for messages
    unreadable: list = field(default_factory=list)  # paths that could not be decoded (left out of the above)

    def __len__(self):
        return len(self.labels)

    @property
    def nbytes(self):
        """Memory the decoded split takes (what dataset.cache_max_gb bounds)."""
        return self.views.nbytes + (0 if self.images is None else self.images.nbytes)

    @property
    def targets(self):
        return self.labels.tolist()

    def subset(self, indices):
        return DecodedSplit(None if self.images is None else self.images[indices], self.views[indices],
                            self.sizes[indices], self.labels[indices], self.root, self.unreadable)


def default_cache_dir():
    """$XDG_CACHE_HOME/alexnet-ac/folders, or ~/.cache/alexnet-ac/folders."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alexnet-ac" / "folders"


def stored_side(image_size):
    """The square side images of mixed sizes are stored at: large enough that RandomResizedCrop's smallest crop
    (8% of the area) still has `image_size` pixels a side, so even it is not upsampled from the cache."""
    return math.ceil(image_size / math.sqrt(SMALLEST_CROP_SCALE))


def cache_key(samples, image_size, crops):
    """A hash of the split's files (path, class, size, modification and status-change time), the training
    resolution, whether the images are stored for training crops, and the file format. The status-change time
    catches a file replaced by a copy that keeps size and modification time (`rsync -a`, `cp -p`, `tar x`)."""
    h = hashlib.sha256(json.dumps([FORMAT, image_size, crops]).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(json.dumps([os.path.abspath(path), label, st.st_size, st.st_mtime_ns, st.st_ctime_ns]).encode())
    return h.hexdigest()


def decoded_split(samples, root, image_size, cache_dir, max_bytes, crops=True):
    """`samples` ((path, label) pairs, an ImageFolder's) decoded, from the cache in `cache_dir` when it holds
    them, else decoded now and cached there; None when the decoded split would exceed `max_bytes`. `crops`:
    also store the images for training crops (a training split), not only their test views."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    # <which split, at which size>-<its files>.pt: a new version of a split's files replaces its old cache file
    split_id = hashlib.sha256(json.dumps([os.path.abspath(root), image_size]).encode()).hexdigest()[:16]
    if len(samples) * 3 * image_size ** 2 > max_bytes:  # too large even as test views alone: spare every stat
        return None
    key = cache_key(samples, image_size, crops)
    path = cache_dir / f"{split_id}-{key}.pt"
    cached = _load(path, samples, root, image_size, crops)
    if cached is not None:  # the budget holds for a cache file too (it may have been lowered since it was written)
        return cached if cached.nbytes <= max_bytes else None
    sizes = map_in_threads(_original_size, [p for p, _ in samples])
    readable = [s for s in sizes if s is not None]
    shape = _stored_shape(readable, image_size) if crops else None
    if len(readable) * 3 * (math.prod(shape or (0,)) + image_size ** 2) > max_bytes:
        return None
    split = _decode(samples, sizes, shape, image_size, root)
    if _save(path, split, key):
        _remove_older_versions(path, split_id)
    return split


def map_in_threads(fn, items):
    """[fn(item) for item in items] on up to 16 threads: PIL releases the GIL while it decodes and resizes."""
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def _original_size(path):
    """(height, width) from the file's header, or None when the header cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception:
        return None


def _stored_shape(sizes, image_size):
    side = stored_side(image_size)
    if sizes and len(set(sizes)) == 1 and max(sizes[0]) <= side:
        return sizes[0]
    largest = max((max(s) for s in sizes), default=side)
    return (min(side, largest),) * 2  # no larger than the largest original: upsampling stores nothing new


def _decode(samples, sizes, shape, image_size, root):
    """Decode every image, in threads, into its test view and (unless `shape` is None) the image at `shape`."""
    from PIL import Image

    view = test_view(image_size)
    views = np.empty((len(samples), image_size, image_size, 3), dtype=np.uint8)
    pixels = None if shape is None else np.empty((len(samples), *shape, 3), dtype=np.uint8)

    def decode(i):  # whether the image could be read
        if sizes[i] is None:
            return False
        try:
            im = read_rgb(samples[i][0])
        except UnreadableImage:
            return False
        views[i] = np.asarray(view(im))
        if pixels is not None:
            height, width = shape
            if im.size != (width, height):  # antialiased bilinear, as torchvision's PIL transforms resize
                im = im.resize((width, height), Image.BILINEAR)
            pixels[i] = np.asarray(im)
        return True

    ok = map_in_threads(decode, range(len(samples)))
    keep = torch.tensor(ok, dtype=torch.bool)

    def kept(array):
        return torch.from_numpy(array).permute(0, 3, 1, 2)[keep].contiguous()

    original = torch.tensor([s if s else (0, 0) for s in sizes], dtype=torch.int64).view(-1, 2)[keep]
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)[keep]
    unreadable = [str(p) for (p, _), good in zip(samples, ok) if not good]
    return DecodedSplit(None if pixels is None else kept(pixels), kept(views), original, labels, str(root),
                        unreadable)


def _save(path, split, key):
    """Write atomically, as checkpoints are written (a temporary file in the same folder, then a rename; the
    umask's mode, so a cache folder shared by a group is shared as its other files are): a process that reads the
    cache while another writes it sees the whole file or none. A cache that cannot be written costs speed,
    nothing else."""
    _remove_stale_temporaries(path.parent)
    contents = {"format": FORMAT, "key": key, "images": split.images, "views": split.views, "sizes": split.sizes,
                "labels": split.labels, "unreadable": split.unreadable}
    try:
        atomic_write(path, lambda f: torch.save(contents, f), what="the decoded-image cache")
    except UserError as e:  # atomic_write's advice (free disk space, fix permissions) does not fit a file in the way
        file = next((p for p in (path.parent, *path.parent.parents) if p.is_file()), None)
        why = (f"could not use the decoded-image cache folder {path.parent}: {file} is a file, not a folder" if file
               else e)
        log.warning("%s; training goes on without it, decoding again next time (set dataset.cache_dir to a "
                    "writable folder)", why)
        return False
    log.info("decoded %d images of %s into the cache %s", len(split), split.root, path)
    return True


def _remove_stale_temporaries(folder):
    """Delete the temporary files that writers killed mid-write left in the cache folder, whichever split's
    file they were writing: `.<split>-<key>.pt.<pid>.<random>.tmp` (atomic_write's naming) of a process no
    longer running, and `.<16 hex digits>.<8 characters>.tmp`, the first format's naming, which has no pid.
    Only names this module makes: a user's own files in the folder are never touched."""
    for tmp in folder.glob(".*.tmp"):
        written = re.fullmatch(r"\.([0-9a-f]{16}-[0-9a-f]{64}\.pt)\.\d+\.[^.]+\.tmp", tmp.name)
        if written:
            remove_stale_temporaries(folder / written.group(1))
        elif re.fullmatch(r"\.[0-9a-f]{16}\.[0-9a-z_]{8}\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)


def _remove_older_versions(path, split_id):
    """Delete this split's caches of earlier versions of its files (names this module made: 16 hex digits, a
    dash, 64 hex digits), so that a folder edited between runs does not fill the disk with stale copies."""
    for old in path.parent.glob(f"{split_id}-*.pt"):
        if old != path and re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{64}\.pt", old.name):
            old.unlink(missing_ok=True)


def _load(path, samples, root, image_size, crops):
    """The cached split of `samples`, or None when there is no usable cache file. The file is data: loaded without
    unpickling code (weights_only) and checked before use (shapes, types, the samples' labels, sizes that crops
    can divide by); anything else is decoded again. It is memory-mapped, so the processes of one machine (torchrun
    ranks, the jobs of parallel sweeps) share its pages rather than each holding a copy."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        images, views, sizes, labels, unreadable = (stored["images"], stored["views"], stored["sizes"],
                                                    stored["labels"], stored["unreadable"])
        n = len(labels)
        if not (stored["format"] == FORMAT and stored["key"] == path.stem.split("-")[-1]
                and views.dtype == torch.uint8 and views.shape == (n, 3, image_size, image_size)
                and ((images.dtype == torch.uint8 and images.dim() == 4 and images.shape[:2] == (n, 3)) if crops
                     else images is None)
                and sizes.shape == (n, 2) and sizes.dtype == torch.int64 and bool((sizes > 0).all())
                and all(isinstance(p, str) for p in unreadable)
                and labels.dtype == torch.int64 and n + len(unreadable) == len(samples)
                and labels.tolist() == _readable_labels(samples, unreadable)):
            raise ValueError("unexpected contents")
    except Exception as e:
        log.warning("ignoring the unusable decoded-image cache %s (%s); decoding again", path, e)
        return None
    return DecodedSplit(images, views, sizes, labels, str(root), list(unreadable))


def _readable_labels(samples, unreadable):
    """The labels of `samples` without those of the `unreadable` paths: what a cache file of them must hold."""
    skipped = {os.path.abspath(p) for p in unreadable}
    return [label for path, label in samples if os.path.abspath(path) not in skipped]
