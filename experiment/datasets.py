"""Datasets as the training loop sees them: small ones as uint8 tensors, large image folders as ImageFolder.

Every failure a user can cause (no network, a missing root, a broken folder layout, an unreadable image)
becomes a UserError that says what to do.
"""
import copy
import logging
import os
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from experiment.errors import UserError

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "digits", "fake", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


def load_dataset(cfg, train=True):
    """Load the dataset a `dataset/` config describes; `train=False` (evaluation) spares an image folder's
    training split its listing and scan. With `dataset.val_split` > 0 (and `train`), that fraction of the
    training images becomes the validation split (see `holdout_split`)."""
    loaders = {"cifar10": _load_cifar, "cifar100": _load_cifar, "digits": _load_digits, "fake": _load_fake,
               "folder": _load_folder}
    if cfg.name not in DATASETS:
        raise UserError(f"unknown dataset {cfg.name!r}; choose one of: {', '.join(loaders)}")
    data = _load_folder(cfg, train) if cfg.name == "folder" else loaders[cfg.name](cfg)
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
    train, val = data.train, copy.copy(data.train)  # one ImageFolder listing, two views of it
    samples = train.samples
    train.samples = [samples[i] for i in train_idx.tolist()]
    val.samples = [samples[i] for i in val_idx.tolist()]
    for split in (train, val):
        split.targets = [t for _, t in split.samples]
        split.imgs = split.samples
    val.transform = data.test.transform  # validation images are scored like test images: no augmentation
    return FolderData(train, data.test, data.classes, val=val)


def _load_cifar(cfg):
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


def _load_digits(cfg):
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled: real data that works offline."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # pixel values are 0..16
    images = F.interpolate(images, size=cfg.image_size, mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return TensorData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                      classes=[str(d) for d in range(10)])


def _load_fake(cfg):
    """Random images and labels of a chosen shape, fixed by a seed: for benchmarks and smoke tests."""
    g = torch.Generator().manual_seed(0)
    shape = (3, cfg.image_size, cfg.image_size)

    def split(n):
        return (torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                torch.randint(0, cfg.num_classes, (n,), generator=g))

    return TensorData(*split(cfg.train_size), *split(cfg.test_size), classes=[str(c) for c in range(cfg.num_classes)])


def _load_folder(cfg, train=True):
    from torchvision import datasets, transforms

    root = Path(cfg.root).expanduser()
    classes = check_folder_layout(root, ("train", "val") if train else ("val",))
    size = cfg.image_size
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.PILToTensor()])
    test_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                  transforms.PILToTensor()])
    splits = [datasets.ImageFolder(root / "train", transform=train_tf) if train else None,
              datasets.ImageFolder(root / "val", transform=test_tf)]
    if cfg.verify_images:
        for split in filter(None, splits):
            _drop_unreadable(split, skip=cfg.skip_bad_images)
    return FolderData(*splits, classes)


def check_folder_layout(root, splits=("train", "val")):
    """Validate root/train/<class>/* and root/val/<class>/* before any training; return the class names."""
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist; set dataset.root to a folder holding train/ and val/")
    found = {}
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"{folder} is missing; dataset=folder expects {root}/train/<class>/*.jpg and "
                            f"{root}/val/<class>/*.jpg")
        _check_no_folder_read_twice(folder)
        classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not classes:
            raise UserError(f"{folder} has no class folders; put each class's images in {folder}/<class>/")
        for c in classes:
            if not any(f.name.lower().endswith(IMAGE_EXTENSIONS) for f in os.scandir(folder / c) if f.is_file()):
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
    would count images many times and under the wrong class. Refuse any folder reached twice."""
    seen = {}
    for path, _, _ in os.walk(folder, followlinks=True):
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"{path} is a link to {seen[real]}, which is read already (a link loop or a second "
                            f"copy of a folder would count its images again, under another class); remove the link")
        seen[real] = path


def _drop_unreadable(split, skip):
    from PIL import Image

    def readable(path):
        try:
            with Image.open(path) as im:
                im.convert("RGB")  # decodes the whole image: truncated files fail here, not mid-epoch
            return True
        except Exception:
            return False

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        ok = list(pool.map(readable, [p for p, _ in split.samples]))
    bad = [p for (p, _), good in zip(split.samples, ok) if not good]
    if bad and len(bad) == len(split.samples):
        raise UserError(f"none of the {len(bad)} images in {split.root} can be read (e.g. {bad[0]}); check that "
                        f"the folder holds images, not e.g. unfinished downloads")
    if bad and not skip:
        raise UserError(f"cannot read image {bad[0]} ({len(bad)} unreadable in {split.root}); fix or remove it, "
                        f"or set dataset.skip_bad_images=true to leave such files out")
    if bad:
        split.samples = [s for s, good in zip(split.samples, ok) if good]
        split.targets = [t for _, t in split.samples]
        split.imgs = split.samples
        split.skipped = bad


def report_skipped_images(data):
    """Log how many unreadable images dataset.skip_bad_images=true left out, per split."""
    for name in ("train", "test"):
        bad = getattr(getattr(data, name, None), "skipped", None)
        if bad:
            log.warning("left out %d unreadable image(s) of the %s split (dataset.skip_bad_images=true), e.g. %s",
                        len(bad), name, bad[0])


def dataset_config(stored, overrides):
    """The dataset config for evaluating a checkpoint: its own, with the non-null `overrides` on top.
    Naming another dataset starts from that dataset's config file in configs/dataset/."""
    from hydra import compose
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(stored)
    if overrides.get("name") and overrides["name"] != cfg.name:
        try:
            cfg = compose(config_name="train", overrides=[f"dataset={overrides['name']}"]).dataset
        except Exception:
            raise UserError(f"unknown dataset.name={overrides['name']}; choose one of the configs in configs/dataset/") from None
    if "download" in cfg:  # a checkpoint is data from strangers: its config never decides to fetch and write files
        cfg.download = False
    cfg = OmegaConf.merge(cfg, {k: v for k, v in overrides.items() if v is not None and k != "name"})
    return cfg
