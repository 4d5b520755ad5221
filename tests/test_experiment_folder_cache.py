"""experiment/folder_cache.py and the decoded-folder path of experiment/data.py: an image folder decoded once into a
cache outside the dataset folder, reused while its files are unchanged and rebuilt when one changes, read as data;
served from the device with the streamed path's augmentation (RandomResizedCrop + flip, resize + centre crop)."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, read_metrics, run_main
from experiment import folder_cache
from experiment.data import (DecodedFolder, FolderData, ResizedCropLoader, build_loaders, build_test_loader,
                             load_dataset, random_resized_crop_boxes, report_skipped_images, resample)
from experiment.errors import UserError
from test_experiment_data import folder_cfg

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def photo(rng, height, width):
    """A smooth image with some noise, closer to a photograph than pure noise (which no two resamplers agree on)."""
    coarse = rng.integers(0, 256, (max(height // 6, 2), max(width // 6, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int64)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


def folder(root, classes=("cat", "dog", "fox"), per_class=6, sizes=((36, 36),), seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                Image.fromarray(photo(rng, h, w)).save(root / split / c / f"{i}.png")
    return root


def cached_cfg(root, cache_dir, **extra):
    return folder_cfg(root, **{"cache": "auto", "cache_dir": str(cache_dir), "image_size": 32, **extra})


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images decoded (not read from a cache file)."""
    count = [0]
    decode = folder_cache._decode

    def counting(samples, *args):
        count[0] += len(samples)
        return decode(samples, *args)

    monkeypatch.setattr(folder_cache, "_decode", counting)
    return count


def test_a_folder_is_decoded_once_outside_itself_and_reused(tmp_path, decodes):
    root = folder(tmp_path / "data")
    before = sorted(p for p in root.rglob("*"))
    data = load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert isinstance(data, DecodedFolder) and data.classes == ["cat", "dog", "fox"]
    assert data.train.images.shape == (18, 3, 36, 36) and data.train.images.dtype == torch.uint8  # native size
    assert data.train.views.shape == data.test.views.shape == (18, 3, 32, 32) and data.test.images is None
    assert data.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and len(data.test) == 18
    assert decodes[0] == 36 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert sorted(p for p in root.rglob("*")) == before  # nothing written into the dataset folder
    again = load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert decodes[0] == 36 and torch.equal(again.train.images, data.train.images)  # read, not decoded
    first = np.array(Image.open(root / "train" / "cat" / "0.png"))
    assert torch.equal(data.train.images[0], torch.from_numpy(first).permute(2, 0, 1))


@pytest.mark.parametrize("change", ["edit", "add", "remove"])
def test_a_changed_added_or_removed_file_rebuilds_the_cache(tmp_path, decodes, change):
    root = folder(tmp_path / "data")
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    target = root / "train" / "dog" / "1.png"
    if change == "edit":
        Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(target)
    elif change == "add":
        Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(root / "train" / "dog" / "new.png")
    else:
        target.unlink()
    before = sorted((tmp_path / "cache").glob("*.pt"))
    (tmp_path / "cache" / "notes.pt").write_text("a file of the user's, which no cleaning may touch")
    data = load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert decodes[0] == 36 + len(data.train)  # the train split again, the unchanged val split from its cache
    assert len(data.train) == {"edit": 18, "add": 19, "remove": 17}[change]
    after = sorted((tmp_path / "cache").glob("*-*.pt"))
    assert len(after) == 2 and len(set(after) & set(before)) == 1  # the train split's old version is gone
    assert (tmp_path / "cache" / "notes.pt").is_file()
    if change == "edit":
        assert data.train.images[7].sum() == 0


def test_a_file_replaced_keeping_its_size_and_modification_time_rebuilds_the_cache(tmp_path, decodes):
    """`rsync -a`, `cp -p` and `tar x` set a replaced file's modification time back; its status-change time they
    cannot, and the cache key holds it."""
    root = folder(tmp_path / "data")
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    target = root / "train" / "dog" / "1.png"
    st = target.stat()
    target.write_bytes(target.read_bytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert decodes[0] == 36 + 18  # the train split decoded again


def test_a_cache_file_over_a_lowered_memory_budget_is_not_used(tmp_path, decodes):
    root = folder(tmp_path / "data")
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    # 100 kB: the train split's test views (55 kB) fit, with its 36-px images for crops (125 kB) it does not
    data = load_dataset(cached_cfg(root, tmp_path / "cache", cache_max_gb=1e-4))
    assert isinstance(data, FolderData) and not isinstance(data, DecodedFolder) and decodes[0] == 36


@pytest.mark.parametrize("tamper", ["labels", "sizes"])
def test_a_cache_file_that_does_not_match_its_folder_is_decoded_again(tmp_path, decodes, caplog, tamper):
    """Shapes right, contents wrong (a damaged file, or one planted in a shared cache folder under the right name):
    labels other than the folder's would train on wrong classes, a size of 0 would make the crop boxes nan."""
    root = folder(tmp_path / "data")
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    for path in (tmp_path / "cache").glob("*.pt"):
        stored = torch.load(path, weights_only=True)
        if tamper == "labels":
            stored["labels"] = stored["labels"].flip(0)
        else:
            stored["sizes"] = torch.zeros_like(stored["sizes"])
        torch.save(stored, path)
    data = load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert decodes[0] == 72 and "ignoring the unusable decoded-image cache" in caplog.text
    assert data.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and bool((data.train.sizes > 0).all())


def test_another_resolution_is_another_cache(tmp_path, decodes):
    root = folder(tmp_path / "data")
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    load_dataset(cached_cfg(root, tmp_path / "cache", image_size=24))
    assert decodes[0] == 72 and len(list((tmp_path / "cache").glob("*.pt"))) == 4


def test_a_cache_file_of_the_previous_format_is_neither_read_nor_kept(tmp_path, decodes, monkeypatch):
    root = folder(tmp_path / "data")
    monkeypatch.setattr(folder_cache, "FORMAT", 1)
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    old = sorted((tmp_path / "cache").glob("*.pt"))
    monkeypatch.setattr(folder_cache, "FORMAT", 2)
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    new = sorted((tmp_path / "cache").glob("*.pt"))
    assert decodes[0] == 72 and len(new) == 2 and not set(new) & set(old)  # other names; the old files replaced


def test_a_damaged_cache_file_is_decoded_again(tmp_path, decodes, caplog):
    root = folder(tmp_path / "data")
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    for path in (tmp_path / "cache").glob("*.pt"):
        path.write_bytes(b"not a cache")
    data = load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert decodes[0] == 72 and len(data.train) == 18 and "ignoring the unusable decoded-image cache" in caplog.text


def test_a_cache_file_is_loaded_as_data_only(tmp_path, decodes, caplog):
    """A cache folder may be shared: a file that would run code when unpickled is refused, not run."""
    root = folder(tmp_path / "data")
    load_dataset(cached_cfg(root, tmp_path / "cache"))

    class Payload:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('%s').touch()" % (tmp_path / "ran"),))

    for path in (tmp_path / "cache").glob("*.pt"):
        torch.save({"images": Payload()}, path)
    load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert not (tmp_path / "ran").exists() and decodes[0] == 72


@pytest.mark.parametrize("cache_dir", ["a_file", "a_file/cache"])
def test_a_cache_folder_that_is_a_file_costs_speed_only_and_is_named(tmp_path, caplog, cache_dir):
    """The warning used to advise freeing disk space or fixing permissions."""
    root = folder(tmp_path / "data")
    (tmp_path / "a_file").write_text("x")
    data = load_dataset(cached_cfg(root, tmp_path / cache_dir))
    assert isinstance(data, DecodedFolder) and len(data.train) == 18 and (tmp_path / "a_file").read_text() == "x"
    assert (f"could not use the decoded-image cache folder {tmp_path / cache_dir}: {tmp_path / 'a_file'} is a file, "
            "not a folder; training goes on without it") in caplog.text and "set dataset.cache_dir" in caplog.text
    assert "disk space" not in caplog.text


def test_a_cache_that_cannot_be_written_costs_speed_only(tmp_path, caplog, monkeypatch):
    def full_disk(obj, f):
        raise OSError(28, "No space left on device")

    root = folder(tmp_path / "data")
    monkeypatch.setattr(folder_cache.torch, "save", full_disk)
    data = load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert isinstance(data, DecodedFolder) and len(data.train) == 18
    assert "could not write the decoded-image cache" in caplog.text and "Free disk space" in caplog.text


def test_temporaries_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    """A process killed while writing a cache file leaves its temporary file; the next write removes it, and
    only it: not a live writer's, not the user's own files."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    name = f"{'a' * 16}-{'b' * 64}.pt"
    stale = [cache / f".{name}.{dead}.x1y2z3.tmp", cache / ".0123456789abcdef.k2_9m0qz.tmp"]  # this, first format
    kept = [cache / f".{name}.{os.getpid()}.x1y2z3.tmp", cache / ".notes.tmp", cache / f".{name}.tmp"]
    for path in stale + kept:
        path.write_text("x")
    load_dataset(cached_cfg(folder(tmp_path / "data"), cache))
    assert [p for p in stale + kept if p.exists()] == kept


def test_cache_files_take_the_umask_mode_as_checkpoints_do(tmp_path):
    """A cache folder shared by a group is shared as any file its users write: not private (0600) files."""
    mask = os.umask(0o022)
    try:
        load_dataset(cached_cfg(folder(tmp_path / "data"), tmp_path / "cache"))
    finally:
        os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "cache").glob("*.pt")} == {0o644}


def test_default_cache_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = folder(tmp_path / "data")
    load_dataset(folder_cfg(root, cache="auto", image_size=32))
    assert len(list((tmp_path / "xdg" / "alexnet-ac" / "folders").glob("*.pt"))) == 2


def test_a_folder_over_the_memory_budget_or_with_the_cache_off_streams(tmp_path):
    root = folder(tmp_path / "data")
    for streamed in (load_dataset(cached_cfg(root, tmp_path / "cache", cache_max_gb=1e-6)),
                     load_dataset(cached_cfg(root, tmp_path / "cache", cache="off"))):
        assert isinstance(streamed, FolderData) and not isinstance(streamed, DecodedFolder)
    assert not (tmp_path / "cache").exists()


def test_images_of_mixed_sizes_are_stored_at_one_side_with_their_original_sizes(tmp_path):
    root = folder(tmp_path / "data", sizes=((40, 56), (48, 64), (20, 20)))
    data = load_dataset(cached_cfg(root, tmp_path / "cache"))
    assert data.train.images.shape[-2:] == (64, 64)  # the largest original side (below the 114 the crops could use)
    assert data.train.sizes[:3].tolist() == [[40, 56], [48, 64], [20, 20]]
    assert folder_cache.stored_side(32) == math.ceil(32 / math.sqrt(0.08)) == 114


def test_the_decode_finds_unreadable_images(tmp_path, caplog):
    root = folder(tmp_path / "data")
    bad = root / "train" / "dog" / "2.png"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"cannot read image {bad} \(1 unreadable in .*train\).*skip_bad_images=true"):
        load_dataset(cached_cfg(root, tmp_path / "cache"))
    for val_split in (0, 0.2):  # the cache knows it too; so does a training split with images held out of it
        caplog.clear()
        data = load_dataset(cached_cfg(root, tmp_path / "cache", skip_bad_images=True, val_split=val_split))
        assert len(data.train) + (len(data.val) if data.has_val else 0) == 17
        report_skipped_images(data)
        assert f"left out 1 unreadable image(s) of the train split (dataset.skip_bad_images=true), e.g. {bad}" \
            in caplog.text


def test_a_validation_split_is_held_out_of_the_decoded_training_images(tmp_path):
    root = folder(tmp_path / "data", per_class=5)
    data = load_dataset(cached_cfg(root, tmp_path / "cache", val_split=0.4))
    assert len(data.train) == 9 and len(data.val) == 6 and len(data.test) == 15
    assert sorted(data.val.labels.tolist()) == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------------------------------------------------------
# The augmentation, computed on the device, against torchvision's on PIL images

@pytest.mark.parametrize("height, width", [(32, 32), (30, 50), (90, 20)])
def test_crop_boxes_follow_random_resized_crop_get_params(height, width):
    from torchvision.transforms import RandomResizedCrop

    n = 6000
    torch.manual_seed(0)
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(n)], dtype=torch.float64)
    ours = random_resized_crop_boxes(torch.tensor([[height, width]] * n), torch.Generator().manual_seed(1)).double()
    assert ((ours[:, :2] >= 0) & (ours[:, :2] + ours[:, 2:] <= torch.tensor([height, width]))).all()
    assert (ours == ours.round()).all()  # whole pixels, as get_params gives

    def statistics(boxes):
        top, left, h, w = boxes.unbind(1)
        return {"scale": h * w / (height * width), "log ratio": torch.log(w / h),
                "centre y": (top + h / 2) / height, "centre x": (left + w / 2) / width}

    for name, a in statistics(ours).items():
        b = statistics(theirs)[name]
        error = 4 * math.sqrt((a.var() + b.var()) / n) + 1e-9
        assert abs(a.mean() - b.mean()) < error, (name, a.mean(), b.mean())
        assert abs(a.std() - b.std()) < 2 * error + 0.02 * b.std(), (name, a.std(), b.std())
    whole = lambda boxes: (boxes[:, 2:] == torch.tensor([height, width])).all(1).double().mean()  # noqa: E731
    assert abs(whole(ours) - whole(theirs)) < 0.02  # how often the fallback (whole image) is taken


@pytest.mark.parametrize("sizes, stored", [(((36, 36),), (36, 36)), (((40, 56), (48, 64), (30, 26)), (64, 64)),
                                           (((130, 150),), (114, 114))],
                         ids=["one size", "mixed sizes", "one size larger than the crops use"])
@pytest.mark.parametrize("split", ["test", "val"])
def test_the_test_view_equals_the_streamed_one(tmp_path, sizes, stored, split):
    """The test split's views and those of the validation images held out of the training split, whether the
    training split stores its images as they are or resized (mixed sizes; larger than the crops can use)."""
    root = folder(tmp_path / "data", per_class=4, sizes=sizes)
    cfg = cached_cfg(root, tmp_path / "cache", val_split=0.5)
    decoded = load_dataset(cfg, train=split == "val")
    streamed = load_dataset(cached_cfg(root, tmp_path / "cache", val_split=0.5, cache="off"), train=split == "val")
    assert isinstance(decoded, DecodedFolder) and not isinstance(streamed, DecodedFolder)
    if split == "val":
        assert decoded.train.images.shape[-2:] == stored  # as they are, or resized for the crops
    ours = build_test_loader(decoded, cfg, device="cpu", split=split).images
    theirs = torch.stack([image for image, _ in getattr(streamed, split)])
    assert ours.shape == theirs.shape == ((12 if split == "test" else 6), 3, 32, 32)
    difference = (ours.float() - theirs.float()).abs().mean()  # in grey levels
    assert difference < 1 and torch.equal(ours, theirs), difference  # the same PIL operations, at decode time


def test_a_crop_resized_on_the_device_equals_pils():
    from torchvision.transforms import functional as TF

    image = photo(np.random.default_rng(3), 48, 64)
    stored = torch.from_numpy(image).permute(2, 0, 1)[None]
    for top, left, h, w in [(0, 0, 48, 64), (5, 9, 20, 30), (10, 3, 37, 50), (2, 2, 12, 9), (0, 0, 32, 32)]:
        theirs = TF.pil_to_tensor(TF.resized_crop(Image.fromarray(image), top, left, h, w, [32, 32]))
        t, l_, hh, ww = (torch.tensor([float(v)]) for v in (top, left, h, w))
        ours = resample(stored, (t, t + hh), (l_, l_ + ww), 32)[0]
        assert (ours.float() - theirs.float()).abs().mean() < 1, (top, left, h, w)
        assert (ours.float() - theirs.float()).abs().max() <= 2, (top, left, h, w)
    assert torch.equal(ours, stored[0, :, :32, :32])  # a crop at its own size is the pixels themselves


def loader(tmp_path, seed=7, rank=0, world=1, batch=6):
    root = folder(tmp_path / "data", sizes=((36, 36), (40, 30)))
    data = load_dataset(cached_cfg(root, tmp_path / "cache"))
    return ResizedCropLoader(data.train, batch, size=32, mean=MEAN, std=STD, device="cpu", seed=seed, rank=rank,
                             world_size=world)


def batches(ld, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in ld.epoch(epoch, start)]


def test_the_seed_fixes_the_crops_and_a_replay_from_any_step_matches(tmp_path):
    ld = loader(tmp_path)
    first = batches(ld)
    assert len(first) == 3 and first[0][0].shape == (6, 3, 32, 32)
    assert sorted(torch.cat([y for _, y in first]).tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, batches(ld)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[1:], batches(ld, start=1)))
    assert not torch.equal(first[0][0], batches(ld, epoch=1)[0][0])
    ranks = [batches(ResizedCropLoader(ld_data, 6, size=32, mean=MEAN, std=STD, device="cpu", seed=7, rank=r,
                                       world_size=2)) for r in range(2) for ld_data in [_split(ld)]]
    for step, (x, _) in enumerate(first):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)


def _split(ld):
    return folder_cache.DecodedSplit(ld.images, None, ld.original_sizes, ld.labels, "x")


def test_build_loaders_serves_a_decoded_folder_from_the_device(tmp_path):
    root = folder(tmp_path / "data")
    cfg = cached_cfg(root, tmp_path / "cache", batch_size=6, eval_batch_size=5)
    train, test = build_loaders(load_dataset(cfg), cfg, device="cpu", seed=0)
    assert isinstance(train, ResizedCropLoader) and len(train) == 3 and not hasattr(test, "loader")
    assert [len(y) for _, y in test.epoch(0)] == [5, 5, 5, 3]


# ---------------------------------------------------------------------------------------------------------------
# End to end: training on a folder, decoded or streamed, resumed exactly

# streamed: each sample's crop and flip drawn in a DataLoader worker, whose own random stream a resumed run restarts
@pytest.mark.parametrize("streamed", [False, True], ids=["decoded", "streamed"])
def test_a_run_on_a_folder_resumes_exactly(tmp_path, streamed):
    from test_train import stretch_to, without_timing

    root = folder(tmp_path / "data", per_class=8)
    common = [*TINY, "dataset=folder", f"dataset.root={root}", "dataset.image_size=32", "dataset.batch_size=4",
              "dataset.eval_batch_size=6", f"dataset.cache_dir={tmp_path / 'cache'}", "model=alexnet_ac",
              "scheduler=multistep", "scheduler.milestones=[]",
              *(["dataset.cache=off", "dataset.num_workers=2"] if streamed else [])]
    run_main("train.py", *common, "trainer.epochs=3", f"hydra.run.dir={tmp_path / 'straight'}")
    run_main("train.py", *common, "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'resumed'}")
    stretch_to(tmp_path / "resumed/checkpoints/last.pt", 3)
    proc = run_main("train.py", f"resume={tmp_path / 'resumed/checkpoints/last.pt'}")
    assert "resumed from" in proc.stdout and "epoch 3/3" in proc.stdout
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert without_timing(resumed["history"]) == without_timing(straight["history"])
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == (0 if streamed else 2)  # three runs, one decode

