"""Data sets and the batches the training loop draws from them.

Small data sets (CIFAR, digits) are loaded as uint8 tensors and kept on the training device: `DeviceLoader`
augments whole batches there (random crop with padding, horizontal flip, normalisation), with no per-sample
Python work and no host-device copy per step. An ImageNet-style folder that fits in memory is decoded once
(experiment/folder_cache.py) and served the same way by `ResizedCropLoader`, with torchvision's
RandomResizedCrop + flip computed on the device; larger ones are ImageFolders that `FolderLoader` streams
through DataLoader workers, which end when the loader is closed (the run closes every loader it made). All
loaders draw an epoch's data order and augmentation from a generator seeded by (seed, epoch), so an epoch can
be replayed from any step: that is what makes a resumed run, even one interrupted mid-epoch, match an
uninterrupted one.

Under DistributedDataParallel the configured batch size is the global one: every step takes the same
global batch as a single process would, and rank r gets its r-th slice.

Every failure a user can cause (no network, a missing root, a broken folder layout, an unreadable image)
becomes a UserError that says what to do.
"""
import copy
import logging
import math
import os
import signal
import urllib.error
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from omegaconf import OmegaConf

from experiment.config import literal_config
from experiment.errors import UserError, choose


log = logging.getLogger(__name__)
DATASET_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"  # eval/fuse dataset.name=<another>


@dataclass
class TensorData:
    """A dataset small enough to live on the training device: images (N, C, H, W) uint8, labels int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list
    val_images: torch.Tensor | None = None  # held out of the training images by dataset.val_split
    val_labels: torch.Tensor | None = None

    @property
    def has_val(self):
        return self.val_labels is not None


@dataclass
class FolderData:
    """An ImageNet-style folder, streamed from disk."""

    train: object  # torchvision.datasets.ImageFolder
    test: object
    classes: list
    val: object = None  # held out of train/ by dataset.val_split, read with the test transform

    @property
    def has_val(self):
        return self.val is not None


class DecodedFolder(FolderData):
    """An ImageNet-style folder decoded into memory: its splits are folder_cache.DecodedSplits."""


def load_dataset(cfg, train=True):
    """Load the dataset a `dataset/` config describes; `train=False` (evaluation) spares an image folder's
    training split its listing and scan. With `dataset.val_split` > 0 (and `train`), that fraction of the
    training images becomes the validation split (see `holdout_split`)."""
    data = choose(DATASETS, cfg.name, "dataset")(cfg, train)
    fraction = cfg.get("val_split") or 0
    return _hold_out(data, fraction) if train and fraction else data


def holdout_split(labels, fraction):
    """(train indices, validation indices): `fraction` of each class's images held out. The draw depends on the
    labels alone, not on the run's seed, so every seed and both models hold out the very same images."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
        raise UserError(f"dataset.val_split={fraction} must be a fraction of the training images in [0, 1), "
                        f"e.g. 0.1; 0 selects on the test split as the published code does")
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(0)
    held = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        held.append(members[torch.randperm(len(members), generator=generator)[:round(fraction * len(members))]])
    held = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    if not len(held) or labels[keep].unique().numel() < labels.unique().numel():
        raise UserError(f"dataset.val_split={fraction} holds out {len(held)} of {len(labels)} training images "
                        f"and leaves some class without training images; choose a fraction such as 0.1-0.2")
    return keep.nonzero().flatten(), held


def _hold_out(data, fraction):
    if isinstance(data, TensorData):
        train, val = holdout_split(data.train_labels, fraction)
        return TensorData(data.train_images[train], data.train_labels[train], data.test_images, data.test_labels,
                          data.classes, val_images=data.train_images[val], val_labels=data.train_labels[val])
    train_idx, val_idx = holdout_split(data.train.targets, fraction)
    if isinstance(data, DecodedFolder):
        return DecodedFolder(data.train.subset(train_idx), data.test, data.classes, val=data.train.subset(val_idx))
    train, val = data.train, copy.copy(data.train)  # one ImageFolder listing, two views of it
    samples = train.samples
    _set_samples(train, [samples[i] for i in train_idx.tolist()])
    _set_samples(val, [samples[i] for i in val_idx.tolist()])
    val.transform = data.test.transform  # validation images are scored like test images: no augmentation
    return FolderData(train, data.test, data.classes, val=val)


def _set_samples(split, samples):
    """Give an ImageFolder other (path, class) samples, with the lists it derives from them."""
    split.samples, split.imgs, split.targets = samples, samples, [t for _, t in samples]


def _load_cifar(cfg, train=True):  # one archive holds both splits: `train` saves nothing
    from torchvision import datasets

    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    root = Path(cfg.root).expanduser()
    try:
        train = cls(root, train=True, download=cfg.download)
        test = cls(root, train=False, download=cfg.download)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(
            f"could not download {cfg.name} into {root} ({getattr(e, 'reason', e)}); without network, place "
            f"{cls.filename} from {cls.url} in {root} by hand, or train offline with dataset=digits or dataset=folder"
        ) from None
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        raise UserError(
            f"{cfg.name} not found or corrupted in {root}; set dataset.download=true, place {cls.filename} "
            f"(from {cls.url}) in {root}, or set dataset.root to where it lives"
        ) from None

    def to_tensors(split):
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(split.targets, dtype=torch.int64)

    return TensorData(*to_tensors(train), *to_tensors(test), classes=list(train.classes))


def _load_digits(cfg, train=True):
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled: real data that works offline."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # pixel values are 0..16
    images = F.interpolate(images, size=cfg.image_size, mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    return TensorData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                      classes=[str(d) for d in range(10)])


def _load_fake(cfg, train=True):
    """Random images and labels of a chosen shape, fixed by a seed: for benchmarks and smoke tests."""
    g = torch.Generator().manual_seed(0)
    shape = (3, cfg.image_size, cfg.image_size)

    def split(n):
        return (torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                torch.randint(0, cfg.num_classes, (n,), generator=g))

    return TensorData(*split(cfg.train_size), *split(cfg.test_size), classes=[str(c) for c in range(cfg.num_classes)])


def _load_folder(cfg, train=True):
    from torchvision import transforms

    from experiment.image_folder import ImageFolder, test_view

    root = Path(cfg.root).expanduser()
    classes = check_folder_layout(root, ("train", "val") if train else ("val",))
    size = cfg.image_size
    splits = [ImageFolder(root / "train") if train else None, ImageFolder(root / "val")]
    decoded = _decode_folder(cfg, splits)
    if decoded:
        return DecodedFolder(*decoded, classes)
    splits[-1].transform = transforms.Compose([test_view(size), transforms.PILToTensor()])
    if train:
        splits[0].transform = transforms.Compose([transforms.RandomResizedCrop(size),
                                                  transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    if cfg.verify_images:
        for split in filter(None, splits):
            _drop_unreadable(split, skip=cfg.skip_bad_images)
    return FolderData(*splits, classes)


def _decode_folder(cfg, splits):
    """[train, test] decoded (experiment/folder_cache.py) when dataset.cache allows and every split fits
    dataset.cache_max_gb; else None, and the folder streams through DataLoader workers."""
    from experiment import folder_cache

    # the values passed config.py's checks (command line or checkpoint); configs stored before the cache existed
    # have no such keys
    max_gb = cfg.get("cache_max_gb", 8.0)
    if cfg.get("cache", "auto") == "off" or not max_gb:
        return None
    decoded = []
    for split, crops in zip(splits, (True, False)):
        if split is None:
            decoded.append(None)
            continue
        d = folder_cache.decoded_split(split.samples, split.root, cfg.image_size, cfg.get("cache_dir"), max_gb * 1e9,
                                       crops=crops)
        if d is None:
            log.info("%s does not fit dataset.cache_max_gb=%s decoded: streaming it through DataLoader workers",
                     split.root, max_gb)
            return None
        _check_unreadable(d.unreadable, len(d) + len(d.unreadable), split.root, cfg.skip_bad_images)
        decoded.append(d)
    return decoded


# dataset.name -> loader(dataset config, whether the training split is needed); the small datasets load both
# splits in one go either way
DATASETS = {"cifar10": _load_cifar, "cifar100": _load_cifar, "digits": _load_digits, "fake": _load_fake,
            "folder": _load_folder}


def check_folder_layout(root, splits=("train", "val")):
    """Validate root/train/<class>/* and root/val/<class>/* before any training; return the class names."""
    from experiment.image_folder import IMAGE_EXTENSIONS, class_names, image_files

    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist; set dataset.root to a folder holding train/ and val/")
    found = {}
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"{folder} is missing; dataset=folder expects {root}/train/<class>/*.jpg and "
                            f"{root}/val/<class>/*.jpg")
        _check_no_folder_read_twice(folder)
        classes = class_names(folder)
        if not classes:
            raise UserError(f"{folder} has no class folders; put each class's images in {folder}/<class>/")
        for c in classes:
            if not any(image_files(folder / c)):
                raise UserError(f"class folder {folder / c} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                f"add images or remove the folder")
        found[split] = classes
    if len(found) == 2 and found["train"] != found["val"]:
        only_train = sorted(set(found["train"]) - set(found["val"]))
        only_val = sorted(set(found["val"]) - set(found["train"]))
        raise UserError(f"train/ and val/ under {root} have different classes (only in train: {only_train}, "
                        f"only in val: {only_val}); both splits need the same class folders")
    return found[splits[0]]


def _check_no_folder_read_twice(folder):
    """ImageFolder follows links to folders: a link back to a parent (a loop) or to another class's folder
    would count images many times and under the wrong class. Refuse any folder reached twice, naming the link,
    whichever of it and its target is reached first. Hidden folders are not read, so not walked either."""
    from experiment.image_folder import walk

    seen = {}
    for path, _ in walk(folder):
        real = os.path.realpath(path)
        if real in seen:
            link, other = _link_at_or_above(path, folder), seen[real]
            if not link:
                link, other = _link_at_or_above(other, folder), path
            raise UserError(f"{link} is a link to {other}, which is read already (a link loop or a second "
                            f"copy of a folder would count its images again, under another class); remove the link")
        seen[real] = path


def _link_at_or_above(path, folder):
    """`path` or the nearest folder above it and below `folder` that is a link; None if none is."""
    while len(path) > len(str(folder)):
        if os.path.islink(path):
            return path
        path = os.path.dirname(path)


def _drop_unreadable(split, skip):
    from experiment.folder_cache import map_in_threads
    from experiment.image_folder import UnreadableImage, read_rgb

    def readable(path):
        try:
            read_rgb(path)  # decodes the whole image: truncated files fail here, not mid-epoch
            return True
        except UnreadableImage:
            return False

    ok = map_in_threads(readable, [p for p, _ in split.samples])
    bad = [p for (p, _), good in zip(split.samples, ok) if not good]
    _check_unreadable(bad, len(split.samples), split.root, skip)
    if bad:
        _set_samples(split, [s for s, good in zip(split.samples, ok) if good])
        split.unreadable = bad


def _check_unreadable(bad, total, root, skip):
    """Refuse a split with unreadable images unless dataset.skip_bad_images, and one with no readable image."""
    if bad and len(bad) == total:
        raise UserError(f"none of the {len(bad)} images in {root} can be read (e.g. {bad[0]}); check that "
                        f"the folder holds images, not e.g. unfinished downloads")
    if bad and not skip:
        raise UserError(f"cannot read image {bad[0]} ({len(bad)} unreadable in {root}); fix or remove it, "
                        f"or set dataset.skip_bad_images=true to leave such files out")


def report_skipped_images(data):
    """Log how many unreadable images dataset.skip_bad_images=true left out, per split (a split with unreadable
    images exists only when skipping them: `_check_unreadable` refuses it otherwise)."""
    for name in ("train", "test"):
        bad = getattr(getattr(data, name, None), "unreadable", None)
        if bad:
            log.warning("left out %d unreadable image(s) of the %s split (dataset.skip_bad_images=true), e.g. %s",
                        len(bad), name, bad[0])


def dataset_config(stored, overrides, config_dir=None):
    """The dataset config for evaluating a checkpoint: its own, with the non-null `overrides` on top. Naming
    another dataset starts from its file in `config_dir` (default: the repository's configs/dataset/). Stored
    and overridden values are data: no string in the result is an interpolation (`literal_config`)."""
    name = overrides.get("name")
    cfg = dict(stored)
    if name and name != cfg.get("name"):
        choose(DATASETS, name, "dataset.name")
        cfg = OmegaConf.to_container(_dataset_file(Path(config_dir or DATASET_CONFIGS), name), resolve=True)
    if "download" in cfg:  # a checkpoint is data from strangers: its config never decides to fetch and write files
        cfg["download"] = False
    if "cache_dir" in cfg:  # nor where a decoded-image cache is written: this machine's default place is
        cfg["cache_dir"] = None
    overrides = OmegaConf.to_container(overrides, resolve=True) if OmegaConf.is_config(overrides) else overrides
    return literal_config(cfg | {k: v for k, v in overrides.items() if v is not None and k != "name"})


def _dataset_file(config_dir, name):
    """configs/dataset/<name>.yaml with the files its `defaults` list names merged below it, as Hydra does."""
    cfg = OmegaConf.load(config_dir / f"{name}.yaml")
    bases = [_dataset_file(config_dir, base) for base in cfg.pop("defaults", []) if base != "_self_"]
    return OmegaConf.merge(*bases, cfg)


def epoch_generator(seed, epoch):
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def normalize(images, mean, std, channels_last=False):
    """uint8 (N, C, H, W) -> float32, normalised with per-channel mean/std given on the 0..1 scale: sequences,
    or tensors already on the images' device (the loaders keep them there: copying them from the host for
    every batch would make each step wait for the GPU)."""
    mean = torch.as_tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std = torch.as_tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _ShardedLoader:
    """What the loaders share: the global batch, this rank's share of it, and the normalisation. The options
    every loader takes (mean, std, device, seed, rank, world_size, channels_last) are this class's."""

    def __init__(self, num_samples, batch_size, *, train, mean, std, device, seed=0, rank=0, world_size=1,
                 channels_last=False):
        if train and batch_size % world_size:
            raise UserError(f"dataset.batch_size {batch_size} does not divide by the {world_size} processes; "
                            f"it is the global batch, so pick a multiple of {world_size}")
        if train and batch_size > num_samples:
            raise UserError(f"dataset.batch_size {batch_size} is larger than the {num_samples} training samples; "
                            f"set dataset.batch_size={min(num_samples, 128)} or smaller")
        self.train, self.batch_size, self.seed, self.num_samples = train, batch_size, seed, num_samples
        self.rank, self.world_size, self.device, self.channels_last = rank, world_size, device, channels_last
        self.mean, self.std = torch.tensor(mean, device=device), torch.tensor(std, device=device)

    def close(self):
        """Release what the loader holds beyond memory (DataLoader workers); the device loaders hold nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        if self.train:
            return self.num_samples // self.batch_size  # full batches only: static shapes, no 1-sample BN batch
        return math.ceil(len(self.eval_indices()) / self.batch_size)

    def rank_slices(self, start_step=0):
        """Per training step from `start_step` on, this rank's slice of the step's global batch in the order."""
        local = self.batch_size // self.world_size
        for step in range(start_step, len(self)):
            yield slice(step * self.batch_size + self.rank * local, step * self.batch_size + (self.rank + 1) * local)

    def eval_indices(self):
        """This rank's test samples: every world_size-th, so each is evaluated exactly once over all ranks."""
        return range(self.rank, self.num_samples, self.world_size)


class DeviceLoader(_ShardedLoader):
    def __init__(self, images, labels, batch_size, *, train, crop_padding=4, hflip=True, **options):
        super().__init__(len(labels), batch_size, train=train, **options)
        self.crop_padding = crop_padding if train else 0
        self.hflip = hflip and train
        p = self.crop_padding
        # Pad once, crop per batch: a crop is then a gather, with no padding work per step.
        self.images = F.pad(images, (p, p, p, p)).to(self.device) if p else images.to(self.device)
        self.labels = labels.to(self.device)
        self.height, self.width = images.shape[-2:]

    def epoch(self, epoch, start_step=0):
        """Yield (images float32 normalised, labels) for one epoch, starting at `start_step`."""
        device = self.labels.device
        if not self.train:
            idx = torch.tensor(self.eval_indices(), device=device)
            for i in range(start_step * self.batch_size, len(idx), self.batch_size):
                j = idx[i:i + self.batch_size]
                yield normalize(self.images[j], self.mean, self.std, self.channels_last), self.labels[j]
            return
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(self.num_samples, generator=g)
        shifts = torch.randint(0, 2 * self.crop_padding + 1, (2, self.num_samples), generator=g)
        flips = torch.rand(self.num_samples, generator=g) < 0.5
        order, shifts, flips = order.to(device), shifts.to(device), flips.to(device)
        rows = torch.arange(self.height, device=device)
        cols = torch.arange(self.width, device=device)
        for sl in self.rank_slices(start_step):
            j = order[sl]
            x = self.images[j]
            if self.crop_padding:
                r = (shifts[0, sl, None] + rows)[:, None, :, None]
                c = (shifts[1, sl, None] + cols)[:, None, None, :]
                b = torch.arange(len(j), device=device)[:, None, None, None]
                ch = torch.arange(x.shape[1], device=device)[None, :, None, None]
                x = x[b, ch, r, c]
            if self.hflip:
                x = torch.where(flips[sl, None, None, None], x.flip(3), x)
            yield normalize(x, self.mean, self.std, self.channels_last), self.labels[j]


class ResizedCropLoader(_ShardedLoader):
    """A decoded image folder's training split on the training device, augmented there as the streamed path does
    it with torchvision: RandomResizedCrop(size) with its default scale and ratio ranges, then a horizontal flip.
    The crop boxes are drawn in each image's original pixels and resampled as PIL does it (`resample`); the
    epoch's order, boxes and flips come from epoch_generator(seed, epoch), so a resumed run replays them."""

    def __init__(self, split, batch_size, *, size, **options):
        super().__init__(len(split), batch_size, train=True, **options)
        self.size, self.original_sizes = size, split.sizes
        self.images, self.labels = split.images.to(self.device), split.labels.to(self.device)
        # (N, 2) stored pixels per original pixel, (rows, columns): maps the crop boxes onto the stored images
        stored = torch.tensor(split.images.shape[-2:], dtype=torch.float32)
        self.stored_per_original = (stored / split.sizes.float()).to(self.device)

    def epoch(self, epoch, start_step=0):
        """Yield (images float32 normalised, labels) for one epoch, starting at `start_step`."""
        device = self.labels.device
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(self.num_samples, generator=g)
        boxes = random_resized_crop_boxes(self.original_sizes[order], g)
        flips = torch.rand(self.num_samples, generator=g) < 0.5
        order, boxes, flips = order.to(device), boxes.to(device), flips.to(device)
        for sl in self.rank_slices(start_step):
            j = order[sl]
            top, left, h, w = (boxes[sl] * self.stored_per_original[j].repeat(1, 2)).unbind(1)
            x = resample(self.images[j], (top, top + h), (left, left + w), self.size)
            x = torch.where(flips[sl, None, None, None], x.flip(3), x)
            yield normalize(x, self.mean, self.std, self.channels_last), self.labels[j]


def random_resized_crop_boxes(sizes, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """(N, 4) float boxes (top, left, height, width) in original pixels, one per (height, width) in `sizes`,
    drawn as torchvision's RandomResizedCrop.get_params draws them: up to `tries` draws of area fraction and
    log-uniform aspect ratio until the box fits, else the whole image cut to the ratio range, centred. All tries
    are drawn at once (the first that fits is used), so a batch needs no Python loop."""
    n = len(sizes)
    height, width = sizes[:, :1].double(), sizes[:, 1:].double()
    area = height * width * torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                    generator=generator)
    w = torch.sqrt(area * torch.exp(log_ratio)).round()
    h = torch.sqrt(area / torch.exp(log_ratio)).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.double().argmax(1, keepdim=True)
    w, h = w.gather(1, first), h.gather(1, first)
    top = (torch.rand(n, 1, generator=generator, dtype=torch.float64) * (height - h + 1)).floor()
    left = (torch.rand(n, 1, generator=generator, dtype=torch.float64) * (width - w + 1)).floor()
    # the fallback: the largest centred box within the ratio range
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], (height * ratio[1]).round(), width)
    fh = torch.where(in_ratio < ratio[0], (width / ratio[0]).round(), height)
    ok = fits.any(1, keepdim=True)
    top, left = torch.where(ok, top, ((height - fh) / 2).floor()), torch.where(ok, left, ((width - fw) / 2).floor())
    return torch.cat([top, left, torch.where(ok, h, fh), torch.where(ok, w, fw)], 1).float()


def resample(images, rows, cols, size):
    """uint8 (B, C, size, size): a crop of each image resized as PIL crops, then resizes (antialiased bilinear),
    columns first, then rows, each pass rounded to 8 bits. An axis is (in0, in1), each (B,): the crop's span
    [in0, in1), whose pixels alone are read. As weight matrices the whole batch is two matmuls."""
    x = images.float()
    x = torch.einsum("bchw,bow->bcho", x, _resample_weights(*cols, images.shape[-1], size)).round_().clamp_(0, 255)
    x = torch.einsum("bcho,bph->bcpo", x, _resample_weights(*rows, images.shape[-2], size)).round_().clamp_(0, 255)
    return x.to(torch.uint8)


def _resample_weights(in0, in1, in_size, size):
    """(B, size, in_size): PIL's triangle-filter coefficients (ImagingResample's precompute_coeffs)."""
    device = in0.device
    # a tensor divisor: CUDA divides by a plain number as a product with its reciprocal, which may lose a bit
    scale = ((in1 - in0) / torch.full_like(in0, size)).float()[:, None, None]
    filter_scale = scale.clamp(min=1.0)
    out = torch.arange(size, device=device, dtype=torch.float32)[None, :, None]
    centre = in0.float()[:, None, None] + (out + 0.5) * scale
    pixel = torch.arange(in_size, device=device, dtype=torch.float32)[None, None, :] + 0.5
    weights = (1 - ((pixel - centre) / filter_scale).abs()).clamp(min=0)
    weights = weights * ((pixel > in0.float()[:, None, None]) & (pixel < in1.float()[:, None, None]))
    return weights / weights.sum(2, keepdim=True).clamp(min=1e-12)


class _EpochSampler(torch.utils.data.Sampler):
    """This rank's indices for one epoch, from `start_step` on; set `epoch`/`start_step` before iterating. For
    training, (augmentation seed, index) pairs for `_SeededSamples`."""

    def __init__(self, loader):
        self.loader, self.epoch, self.start_step = loader, 0, 0

    def __iter__(self):
        ld = self.loader
        if not ld.train:
            return iter(ld.eval_indices())
        g = epoch_generator(ld.seed, self.epoch)
        order = torch.randperm(ld.num_samples, generator=g).tolist()
        seeds = torch.randint(2**62, (ld.num_samples,), generator=g).tolist()
        return iter([(seeds[i], i) for sl in ld.rank_slices(self.start_step) for i in order[sl]])


class _SeededSamples(torch.utils.data.Dataset):
    """A training split read by (seed, index) pairs: each sample's random transforms (crop, flip) are drawn from
    its own seed, a function of (run seed, epoch, index) alone, so neither a worker's random stream (which a
    resumed run restarts) nor the number of workers decides them. The process's own generator (dropout's, with
    no workers) is left where it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, seed_and_index):
        seed, index = seed_and_index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class FolderLoader(_ShardedLoader):
    def __init__(self, dataset, batch_size, *, train, num_workers=8, **options):
        super().__init__(len(dataset), batch_size, train=train, **options)
        # a weak reference: the finaliser below holds the DataLoader, and through it the sampler, which must not
        # keep this FolderLoader alive (its workers would then outlive it until the process exits)
        self.sampler = _EpochSampler(weakref.proxy(self))
        local = batch_size // self.world_size if train else batch_size
        self.loader = torch.utils.data.DataLoader(
            _SeededSamples(dataset) if train else dataset, batch_size=local, sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=torch.device(self.device).type == "cuda", persistent_workers=num_workers > 0,
            worker_init_fn=_leave_stop_signals_to_the_main_process, drop_last=False,
            # else the DataLoader would draw its workers' base seed from the global generator, shifting dropout's
            generator=torch.Generator().manual_seed(self.seed * 1000 + self.rank))
        # weakref.finalize registers its exit hook after multiprocessing's, so it runs first (atexit is LIFO)
        self._end_workers = weakref.finalize(self, _end_workers, self.loader)

    def epoch(self, epoch, start_step=0):
        from experiment.image_folder import UnreadableImage

        self.sampler.epoch, self.sampler.start_step = epoch, start_step if self.train else 0
        try:
            for x, y in self.loader:
                x = x.to(self.device, non_blocking=True)
                yield normalize(x, self.mean, self.std, self.channels_last), y.to(self.device, non_blocking=True)
        except UnreadableImage as e:  # from a worker, its message is the worker's traceback: keep the last line
            line = next(line for line in reversed(str(e).splitlines()) if "cannot read image" in line)
            raise UserError(f"{line[line.index('cannot read image'):]} in the middle of an epoch; fix or remove it, "
                            f"or set dataset.verify_images=true to find such files before training (and "
                            f"dataset.skip_bad_images=true to leave them out)") from None

    def close(self):
        """End the workers now. Persistent workers otherwise live as long as the process: a Hydra sweep runs
        its jobs in one process, so every job would leave its workers behind (and their iterators, whose
        finalisers then fail in the next job's forked workers with `can only test a child process`)."""
        self._end_workers()


def _end_workers(loader):
    """Shut a DataLoader's persistent workers down: by the loader's own protocol, then SIGKILL for any that did
    not stop (they ignore SIGTERM, see below). Also run when the FolderLoader is collected or at the latest when
    the interpreter exits, before multiprocessing's own exit hook, whose SIGTERM the workers would ignore while
    it waited for them."""
    iterator, loader._iterator = loader._iterator, None
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    iterator._shutdown_workers()
    for worker in iterator._workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


def _leave_stop_signals_to_the_main_process(worker_id):
    """Ctrl-C, `timeout`, `scancel` and container stops signal the whole process group, workers included. A
    worker killed by one takes the batch it was preparing with it, and the main process could only fail; so
    workers ignore SIGINT and SIGTERM, the main process finishes its step, saves, and closes the loader. A main
    process killed outright leaves nothing behind either: workers exit when their parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loaders(data, cfg, *, seed, **placement):
    """(train loader, test loader) for what `load_dataset` returned. `placement`: device, and optionally rank,
    world_size and channels_last."""
    common = dict(mean=tuple(cfg.mean), std=tuple(cfg.std), seed=seed, **placement)
    if isinstance(data, TensorData):
        train = DeviceLoader(data.train_images, data.train_labels, cfg.batch_size, train=True,
                             crop_padding=cfg.crop_padding, hflip=cfg.hflip, **common)
    elif isinstance(data, DecodedFolder):
        train = ResizedCropLoader(data.train, cfg.batch_size, size=cfg.image_size, **common)
    else:
        train = FolderLoader(data.train, cfg.batch_size, train=True, num_workers=cfg.num_workers, **common)
    return train, build_test_loader(data, cfg, **placement)


def build_test_loader(data, cfg, *, split="test", **placement):
    """The test split, or with `split="val"` the held-out validation split (this rank's share of it),
    normalised like the training data. `placement`: as `build_loaders` takes it."""
    common = dict(mean=tuple(cfg.mean), std=tuple(cfg.std), **placement)
    if isinstance(data, TensorData):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        return DeviceLoader(images, labels, cfg.eval_batch_size, train=False, **common)
    if isinstance(data, DecodedFolder):  # the test view is the same every epoch: computed once, when decoded
        split = getattr(data, split)
        return DeviceLoader(split.views, split.labels, cfg.eval_batch_size, train=False, **common)
    return FolderLoader(getattr(data, split), cfg.eval_batch_size, train=False, num_workers=cfg.num_workers, **common)


def checkpoint_test_loader(ckpt, path, overrides, *, device, config_dir=None):
    """The test split of the dataset a checkpoint was trained on, with the non-null dataset `overrides` of
    eval.py/fuse.py on top: (dataset config, class names, loader). `config_dir`: see `dataset_config`."""
    cfg = dataset_config(ckpt["config"]["dataset"], overrides, config_dir)
    data = load_dataset(cfg, train=False)
    report_skipped_images(data)
    if len(data.classes) != ckpt["num_classes"]:
        raise UserError(f"{path} predicts {ckpt['num_classes']} classes but dataset {cfg.name} has "
                        f"{len(data.classes)}; use it on the dataset it was trained on")
    stored = ckpt.get("classes")
    if stored and list(stored) != list(data.classes):
        differ = [f"{a}/{b}" for a, b in zip(stored, data.classes) if a != b]
        raise UserError(f"{path} was trained on classes that {cfg.name} names otherwise (checkpoint/dataset: "
                        f"{', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}); its scores would compare "
                        f"wrong labels: use it on the dataset it was trained on")
    return cfg, list(data.classes), build_test_loader(data, cfg, device=device)
