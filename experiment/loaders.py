"""Batches for the training loop.

`DeviceLoader` keeps a small dataset on the training device as uint8 and augments whole batches there
(random crop with padding, horizontal flip, normalisation): no per-sample Python work and no host-device
copy per step. `FolderLoader` streams an image folder through DataLoader workers. Both draw an epoch's
data order and augmentation from a generator seeded by (seed, epoch), so an epoch can be replayed from any
step: that is what makes a resumed run, even one interrupted mid-epoch, match an uninterrupted one.

Under DistributedDataParallel the configured batch size is the global one: every step takes the same
global batch as a single process would, and rank r gets its r-th slice.
"""
import torch
import torch.nn.functional as F


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


def _check_batch(batch_size, world_size, num_samples, what):
    from experiment.errors import UserError

    if batch_size % world_size:
        raise UserError(f"{what} {batch_size} does not divide by the {world_size} processes; "
                        f"it is the global batch, so pick a multiple of {world_size}")
    if batch_size > num_samples:
        raise UserError(f"{what} {batch_size} is larger than the {num_samples} training samples; "
                        f"set dataset.batch_size={min(num_samples, 128)} or smaller")


class _ShardedLoader:
    """What both loaders share: the global batch, this rank's share of it, and the normalisation."""

    def __init__(self, num_samples, batch_size, *, train, mean, std, device, seed, rank, world_size, channels_last):
        if train:
            _check_batch(batch_size, world_size, num_samples, "dataset.batch_size")
        self.train, self.batch_size, self.seed, self.num_samples = train, batch_size, seed, num_samples
        self.rank, self.world_size, self.device, self.channels_last = rank, world_size, device, channels_last
        self.mean, self.std = torch.tensor(mean, device=device), torch.tensor(std, device=device)

    def __len__(self):
        if self.train:
            return self.num_samples // self.batch_size  # full batches only: static shapes, no 1-sample BN batch
        return -(-len(self.eval_indices()) // self.batch_size)

    def eval_indices(self):
        """This rank's test samples: every world_size-th, so each is evaluated exactly once over all ranks."""
        return range(self.rank, self.num_samples, self.world_size)


class DeviceLoader(_ShardedLoader):
    def __init__(self, images, labels, batch_size, *, train, mean, std, device, crop_padding=4, hflip=True,
                 seed=0, rank=0, world_size=1, channels_last=False):
        super().__init__(len(labels), batch_size, train=train, mean=mean, std=std, device=device, seed=seed,
                         rank=rank, world_size=world_size, channels_last=channels_last)
        self.crop_padding = crop_padding if train else 0
        self.hflip = hflip and train
        p = self.crop_padding
        # Pad once, crop per batch: a crop is then a gather, with no padding work per step.
        self.images = F.pad(images, (p, p, p, p)).to(device) if p else images.to(device)
        self.labels = labels.to(device)
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
        local = self.batch_size // self.world_size
        rows = torch.arange(self.height, device=device)
        cols = torch.arange(self.width, device=device)
        for step in range(start_step, len(self)):
            sl = slice(step * self.batch_size + self.rank * local, step * self.batch_size + (self.rank + 1) * local)
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


class _EpochSampler(torch.utils.data.Sampler):
    """This rank's indices for one epoch, from `start_step` on; set `epoch`/`start_step` before iterating."""

    def __init__(self, loader):
        self.loader, self.epoch, self.start_step = loader, 0, 0

    def __iter__(self):
        ld = self.loader
        if not ld.train:
            return iter(ld.eval_indices())
        order = torch.randperm(ld.num_samples, generator=epoch_generator(ld.seed, self.epoch)).tolist()
        local = ld.batch_size // ld.world_size
        starts = (step * ld.batch_size + ld.rank * local for step in range(self.start_step, len(ld)))
        return iter([i for start in starts for i in order[start:start + local]])


class FolderLoader(_ShardedLoader):
    def __init__(self, dataset, batch_size, *, train, mean, std, device, num_workers=8, seed=0, rank=0,
                 world_size=1, channels_last=False):
        super().__init__(len(dataset), batch_size, train=train, mean=mean, std=std, device=device, seed=seed,
                         rank=rank, world_size=world_size, channels_last=channels_last)
        self.sampler = _EpochSampler(self)
        local = batch_size // world_size if train else batch_size
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=local, sampler=self.sampler, num_workers=num_workers,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed * 1000 + rank), drop_last=False)  # ranks augment differently

    def epoch(self, epoch, start_step=0):
        self.sampler.epoch, self.sampler.start_step = epoch, start_step if self.train else 0
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            yield normalize(x, self.mean, self.std, self.channels_last), y.to(self.device, non_blocking=True)


def build_loaders(data, cfg, *, device, seed, rank=0, world_size=1, channels_last=False):
    """(train loader, test loader) for what `experiment.datasets.load_dataset` returned."""
    from experiment.datasets import TensorData

    common = _loader_options(cfg, device=device, rank=rank, world_size=world_size, channels_last=channels_last)
    if isinstance(data, TensorData):
        train = DeviceLoader(data.train_images, data.train_labels, cfg.batch_size, train=True, seed=seed,
                             crop_padding=cfg.crop_padding, hflip=cfg.hflip, **common)
    else:
        train = FolderLoader(data.train, cfg.batch_size, train=True, seed=seed, num_workers=cfg.num_workers,
                             **common)
    return train, build_test_loader(data, cfg, device=device, rank=rank, world_size=world_size,
                                     channels_last=channels_last)


def build_test_loader(data, cfg, *, device, rank=0, world_size=1, channels_last=False, split="test"):
    """The test split, or with `split="val"` the held-out validation split (this rank's share of it),
    normalised like the training data."""
    from experiment.datasets import TensorData

    common = _loader_options(cfg, device=device, rank=rank, world_size=world_size, channels_last=channels_last)
    if isinstance(data, TensorData):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        return DeviceLoader(images, labels, cfg.eval_batch_size, train=False, **common)
    return FolderLoader(getattr(data, split), cfg.eval_batch_size, train=False, num_workers=cfg.num_workers,
                        **common)


def checkpoint_test_loader(ckpt, path, overrides, *, device):
    """The test split of the dataset a checkpoint was trained on, with the non-null dataset `overrides` of
    eval.py/fuse.py on top: (dataset config, class names, loader)."""
    from experiment.datasets import dataset_config, load_dataset, report_skipped_images
    from experiment.errors import UserError

    cfg = dataset_config(ckpt["config"]["dataset"], overrides)
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


def _loader_options(cfg, **placement):
    return dict(mean=tuple(cfg.mean), std=tuple(cfg.std), **placement)
