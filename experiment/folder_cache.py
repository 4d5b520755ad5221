"""Image folders decoded once into a uint8 tensor cache.

Decoding is most of the cost of a small-image folder: a sweep that decodes its folder in every job, through
DataLoader workers, spends more time decoding than training. A folder split that fits `dataset.cache_max_gb`
is decoded once, in parallel, into (N, 3, h, w) uint8, written to a cache file outside the dataset folder and
reused by every later job, process and rank. The file's name is a hash of the split's file list with each
file's size and modification time, plus the training resolution: a changed, added or removed image, or another
`dataset.image_size`, makes another name, so a stale cache is never read (and the new file replaces the
split's old one). The decode pass also finds the unreadable images, so no separate verification scan is needed.

The stored size keeps the promised augmentation computable. Images that all share one size are stored as they
are, unless they are larger than the training crops can use. Otherwise each is resized to a fixed square side
(`stored_side`) and its original size is kept: the crop boxes are drawn in original pixels, exactly as
torchvision's RandomResizedCrop draws them, and mapped onto the stored image.
"""
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiment.image_folder import UnreadableImage, read_rgb

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a cache file holds changes: old files then get other names and are never read
SMALLEST_CROP_SCALE = 0.08  # torchvision RandomResizedCrop's default lower bound on the crop's area fraction


@dataclass
class DecodedSplit:
    """One split of an image folder, decoded: what the device loaders serve."""

    images: torch.Tensor  # (N, 3, h, w) uint8, every image at the stored size
    sizes: torch.Tensor  # (N, 2) int64: each image's original (height, width), in which crops are drawn
    labels: torch.Tensor  # (N,) int64
    root: str  # the split's folder, for messages
    unreadable: list = field(default_factory=list)  # paths that could not be decoded (left out of `images`)

    def __len__(self):
        return len(self.labels)

    @property
    def skipped(self):  # report_skipped_images' name; with unreadable images the split exists only when skipping
        return self.unreadable

    @property
    def targets(self):
        return self.labels.tolist()

    def subset(self, indices):
        return DecodedSplit(self.images[indices], self.sizes[indices], self.labels[indices], self.root,
                            self.unreadable)


def default_cache_dir():
    """$XDG_CACHE_HOME/alexnet-ac/folders, or ~/.cache/alexnet-ac/folders."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alexnet-ac" / "folders"


def stored_side(image_size):
    """The square side images of mixed sizes are stored at: large enough that RandomResizedCrop's smallest crop
    (8% of the area) still has `image_size` pixels a side, so even it is not upsampled from the cache."""
    return math.ceil(image_size / math.sqrt(SMALLEST_CROP_SCALE))


def cache_key(samples, image_size):
    """A hash of the split's files (path, class, size, modification time) and the training resolution."""
    h = hashlib.sha256(json.dumps([FORMAT, image_size]).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(json.dumps([os.path.abspath(path), label, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def decoded_split(samples, root, image_size, cache_dir, max_bytes):
    """`samples` ((path, label) pairs, an ImageFolder's) decoded, from the cache in `cache_dir` when it holds
    them, else decoded now and cached there; None when the decoded split would exceed `max_bytes`."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    # <which split, at which size>-<its files>.pt: a new version of a split's files replaces its old cache file
    split_id = hashlib.sha256(json.dumps([os.path.abspath(root), image_size]).encode()).hexdigest()[:16]
    key = cache_key(samples, image_size)
    path = cache_dir / f"{split_id}-{key}.pt"
    cached = _load(path, root, len(samples))
    if cached is not None:
        return cached
    if len(samples) * 3 * image_size ** 2 > max_bytes:  # too large even at the crop size: spare the header pass
        return None
    sizes = map_in_threads(_original_size, [p for p, _ in samples])
    readable = [s for s in sizes if s is not None]
    shape = _stored_shape(readable, image_size)
    if len(readable) * 3 * shape[0] * shape[1] > max_bytes:
        return None
    split = _decode(samples, sizes, shape, root)
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


def _decode(samples, sizes, shape, root):
    """Decode every image, in threads, into one array."""
    from PIL import Image

    height, width = shape
    pixels = np.empty((len(samples), height, width, 3), dtype=np.uint8)
    ok = [False] * len(samples)

    def decode(i):
        if sizes[i] is None:
            return
        try:
            im = read_rgb(samples[i][0])
        except UnreadableImage:
            return
        if im.size != (width, height):  # antialiased bilinear, as torchvision's PIL transforms resize
            im = im.resize((width, height), Image.BILINEAR)
        pixels[i] = np.asarray(im)
        ok[i] = True

    map_in_threads(decode, range(len(samples)))
    keep = torch.tensor(ok, dtype=torch.bool)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)[keep].contiguous()
    original = torch.tensor([s if s else (0, 0) for s in sizes], dtype=torch.int64).view(-1, 2)[keep]
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)[keep]
    unreadable = [str(p) for (p, _), good in zip(samples, ok) if not good]
    return DecodedSplit(images, original, labels, str(root), unreadable)


def _save(path, split, key):
    """Write atomically (a temporary file in the same folder, then a rename): a process that reads the cache while
    another writes it sees the whole file or none. A cache that cannot be written costs speed, nothing else."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp",
                                         delete=False) as f:
            tmp = f.name
            torch.save({"format": FORMAT, "key": key, "images": split.images, "sizes": split.sizes,
                        "labels": split.labels, "unreadable": split.unreadable}, f)
        os.replace(tmp, path)
        log.info("decoded %d images of %s into the cache %s", len(split), split.root, path)
        return True
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        log.warning("could not write the decoded-image cache %s (%s); training goes on without it, decoding "
                    "again next time (set dataset.cache_dir to a writable folder)", path, e.strerror or e)
        return False


def _remove_older_versions(path, split_id):
    """Delete this split's caches of earlier versions of its files (names this module made: 16 hex digits, a
    dash, 64 hex digits), so that a folder edited between runs does not fill the disk with stale copies."""
    for old in path.parent.glob(f"{split_id}-*.pt"):
        if old != path and re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{64}\.pt", old.name):
            old.unlink(missing_ok=True)


def _load(path, root, num_samples):
    """The cached split, or None when there is no usable cache file. The file is data: loaded without
    unpickling code (weights_only) and checked for shape before use; anything else is decoded again."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True, map_location="cpu")
        images, sizes, labels, unreadable = (stored["images"], stored["sizes"], stored["labels"],
                                             stored["unreadable"])
        n = len(labels)
        if not (stored["format"] == FORMAT and stored["key"] == path.stem.split("-")[-1] and images.dtype == torch.uint8
                and images.dim() == 4 and images.shape[:2] == (n, 3) and sizes.shape == (n, 2)
                and labels.dtype == torch.int64 and n + len(unreadable) == num_samples
                and all(isinstance(p, str) for p in unreadable)):
            raise ValueError("unexpected contents")
    except Exception as e:
        log.warning("ignoring the unusable decoded-image cache %s (%s); decoding again", path, e)
        return None
    return DecodedSplit(images, sizes, labels, str(root), list(unreadable))
