"""experiment/data.py: image-folder layout checks and unreadable images, each a UserError that says what to do;
the device-resident loader: deterministic, replayable from any step, sharded exactly, augmenting correctly."""
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT
from experiment.data import DeviceLoader, holdout_split, load_dataset, normalize, report_skipped_images
from experiment.errors import UserError


def png(path, size=12, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def image_tree(root, train=("cat", "dog"), val=("cat", "dog"), per_class=2):
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            for i in range(per_class):
                png(root / split / c / f"{i}.png", seed=i)
    return root


def folder_cfg(root, **extra):
    """The folder dataset streamed (cache off) unless `extra` says otherwise: the decoded path has its own tests."""
    cfg = OmegaConf.load(ROOT / "configs/dataset/folder.yaml")
    cfg.root, cfg.image_size, cfg.num_workers, cfg.cache = str(root), 16, 0, "off"
    return OmegaConf.merge(cfg, extra)


CACHED = {"cache": "auto"}


def test_good_tree_loads(tmp_path, caplog):
    data = load_dataset(folder_cfg(image_tree(tmp_path)))
    assert data.classes == ["cat", "dog"] and len(data.train) == 4 and len(data.test) == 4
    report_skipped_images(data)
    assert "unreadable" not in caplog.text


def test_missing_root(tmp_path):
    with pytest.raises(UserError, match=r"dataset root .*nonexistent does not exist; set dataset.root"):
        load_dataset(folder_cfg(tmp_path / "nonexistent"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tmp_path, split):
    image_tree(tmp_path)
    for f in (tmp_path / split).rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / split).rglob("*"), reverse=True):
        d.rmdir()
    (tmp_path / split).rmdir()
    with pytest.raises(UserError, match=rf"{split} is missing; dataset=folder expects .*/train/<class>/\*\.jpg"):
        load_dataset(folder_cfg(tmp_path))


def test_split_without_class_folders(tmp_path):
    image_tree(tmp_path)
    png(tmp_path / "loose" / "a.png")
    for f in (tmp_path / "val").rglob("*.png"):
        f.rename(tmp_path / "loose" / f"{f.parent.name}{f.name}")
    for d in (tmp_path / "val").iterdir():
        d.rmdir()
    with pytest.raises(UserError, match=r"val has no class folders; put each class's images in .*val/<class>/"):
        load_dataset(folder_cfg(tmp_path))


def test_empty_class_folder(tmp_path):
    image_tree(tmp_path)
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"class folder .*train/emu holds no images .*add images or remove the folder"):
        load_dataset(folder_cfg(tmp_path))


def test_different_class_lists(tmp_path):
    image_tree(tmp_path, train=("cat", "dog", "emu"), val=("cat", "dog", "fox"))
    with pytest.raises(UserError, match=r"different classes \(only in train: \['emu'\], only in val: \['fox'\]\)"):
        load_dataset(folder_cfg(tmp_path))


def corrupt(tmp_path):
    """A tree with one file of random bytes and one truncated PNG."""
    image_tree(tmp_path, per_class=3)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    truncated = png(tmp_path / "val" / "cat" / "truncated.png", size=64)
    truncated.write_bytes(truncated.read_bytes()[:200])
    return bad, truncated


def test_unreadable_image_is_named(tmp_path):
    bad, _ = corrupt(tmp_path)
    with pytest.raises(UserError, match=rf"cannot read image {bad} \(1 unreadable in .*train\).*skip_bad_images=true"):
        load_dataset(folder_cfg(tmp_path))


def test_truncated_image_is_found_before_training(tmp_path):
    _, truncated = corrupt(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.unlink()
    with pytest.raises(UserError, match=rf"cannot read image {truncated}"):
        load_dataset(folder_cfg(tmp_path))


def test_skip_bad_images_leaves_them_out_and_reports_them(tmp_path, caplog):
    bad, truncated = corrupt(tmp_path)
    data = load_dataset(folder_cfg(tmp_path, skip_bad_images=True))
    assert len(data.train) == 6 and len(data.test) == 6
    report_skipped_images(data)
    assert f"left out 1 unreadable image(s) of the train split (dataset.skip_bad_images=true), e.g. {bad}" in caplog.text
    assert f"left out 1 unreadable image(s) of the test split (dataset.skip_bad_images=true), e.g. {truncated}" in caplog.text
    assert all(path != str(bad) for path, _ in data.train.samples)
    image, label = data.train[0]  # what remains still loads
    assert image.shape == (3, 16, 16)


def test_evaluation_needs_and_reads_only_the_val_split(tmp_path):
    root = image_tree(tmp_path)
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not an image")  # in the split evaluation does not read
    data = load_dataset(folder_cfg(root), train=False)
    assert data.train is None and len(data.test) == 4 and data.classes == ["cat", "dog"]
    with pytest.raises(UserError, match="cannot read image"):
        load_dataset(folder_cfg(root))


# ---------------------------------------------------------------------------------------------------------------
# dataset.val_split: a validation split held out of the training images

def digits_cfg(**extra):
    return OmegaConf.merge(OmegaConf.load(ROOT / "configs/dataset/digits.yaml"), extra)


def test_holdout_is_stratified_disjoint_and_complete():
    labels = torch.arange(10).repeat_interleave(torch.arange(10, 20))  # class c has 10 + c images
    train, val = holdout_split(labels, 0.2)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val]).tolist() == [round(0.2 * (10 + c)) for c in range(10)]


def test_holdout_depends_on_the_labels_only():
    labels = torch.arange(5).repeat(30)
    torch.manual_seed(1)
    first = holdout_split(labels, 0.1)[1]
    torch.manual_seed(2)  # another run seed does not move the split
    assert torch.equal(holdout_split(labels, 0.1)[1], first)
    assert not torch.equal(holdout_split(labels.roll(1), 0.1)[1], first)


@pytest.mark.parametrize("fraction, says", [(1.0, r"in \[0, 1\)"), (-0.1, r"in \[0, 1\)"), ("0.2", r"in \[0, 1\)"),
                                            (0.01, "leaves some class without|holds out 0")])
def test_holdout_refuses_unusable_fractions(fraction, says):
    with pytest.raises(UserError, match=says):
        holdout_split(torch.arange(3).repeat(10), fraction)


def test_digits_validation_images_leave_the_training_set_and_the_test_set_alone():
    full, split = load_dataset(digits_cfg()), load_dataset(digits_cfg(val_split=0.2))
    assert not full.has_val and split.has_val
    assert len(split.val_labels) == 287 and len(split.train_labels) + len(split.val_labels) == len(full.train_labels)
    assert torch.equal(split.test_images, full.test_images)
    flat = lambda images: {bytes(x.flatten().tolist()) for x in images}  # noqa: E731
    assert flat(split.val_images).isdisjoint(flat(split.train_images))
    assert flat(split.val_images) | flat(split.train_images) == flat(full.train_images)
    assert load_dataset(digits_cfg(val_split=0.2), train=False).val_labels is None  # eval.py scores the test split


def test_folder_validation_split_is_read_like_the_test_split(tmp_path):
    root = image_tree(tmp_path, per_class=5)
    data = load_dataset(folder_cfg(root, val_split=0.4))
    assert len(data.train) == 6 and len(data.val) == 4 and len(data.test) == 10
    assert {p for p, _ in data.train.samples}.isdisjoint(p for p, _ in data.val.samples)
    assert sorted(data.val.targets) == [0, 0, 1, 1]
    assert data.val.transform is data.test.transform and data.train.transform is not data.test.transform


@pytest.mark.parametrize("link_to", ["parent", "other class"])
def test_a_folder_link_that_would_read_images_twice_is_refused(tmp_path, link_to):
    root = image_tree(tmp_path / "data")
    target = root / "train" if link_to == "parent" else root / "train" / "dog"
    (root / "train" / "cat" / "more").symlink_to(target, target_is_directory=True)
    with pytest.raises(UserError, match="cat/more is a link to .*remove the link"):
        load_dataset(folder_cfg(root))


@pytest.mark.parametrize("link_first", [True, False])
def test_the_link_is_named_whichever_of_it_and_its_target_is_walked_first(tmp_path, monkeypatch, link_first):
    walk = os.walk

    def ordered(top, **options):  # the file system's order decides which is met first: both orders are tried
        for path, folders, files in walk(top, **options):
            folders.sort(key=lambda f: (f != "kitty") if link_first else (f == "kitty"))
            yield path, folders, files

    monkeypatch.setattr(os, "walk", ordered)
    root = image_tree(tmp_path / "data")
    (root / "train" / "kitty").symlink_to("cat", target_is_directory=True)
    with pytest.raises(UserError, match=r"train/kitty is a link to \S*train/cat, which is read already.*remove"):
        load_dataset(folder_cfg(root))


def test_a_hidden_folder_link_is_not_read_so_not_refused(tmp_path):
    root = image_tree(tmp_path / "data")
    (root / "train" / ".cat_alias").symlink_to("cat", target_is_directory=True)
    (root / "train" / "cat" / ".loop").symlink_to(root / "train", target_is_directory=True)
    assert len(load_dataset(folder_cfg(root)).train) == 4


def test_a_file_link_still_counts_once(tmp_path):
    root = image_tree(tmp_path / "data")
    (root / "train" / "cat" / "linked.png").symlink_to(root / "train" / "dog" / "0.png")
    assert len(load_dataset(folder_cfg(root)).train) == 5


def test_a_split_with_no_readable_image_is_refused_even_when_skipping(tmp_path):
    root = image_tree(tmp_path)
    for p in (root / "val").rglob("*.png"):
        p.write_bytes(b"not an image")
    with pytest.raises(UserError, match="none of the 4 images in .*val can be read"):
        load_dataset(folder_cfg(root, skip_bad_images=True), train=False)


def test_a_checkpoints_config_never_turns_a_download_on():
    from experiment.data import dataset_config

    stored = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/dataset/cifar10.yaml"))
    stored.update(download=True, root="/somewhere/the/checkpoint/chose")
    assert dataset_config(stored, {"name": None, "download": None}, ROOT / "configs/dataset").download is False
    assert dataset_config(stored, {"name": None, "download": True}, ROOT / "configs/dataset").download is True  # the user's own choice


N, C, H, W = 24, 3, 6, 5
MEAN, STD = (0.5, 0.25, 0.0), (0.5, 0.5, 1.0)


@pytest.fixture
def images():
    return torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def loader(images, train=True, batch=8, rank=0, world=1, **kw):
    labels = torch.arange(N)  # label i marks image i, so a batch tells which images it holds
    return DeviceLoader(images, labels, batch, train=train, mean=MEAN, std=STD, device="cpu", seed=7, rank=rank,
                        world_size=world, **kw)


def batches(ld, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in ld.epoch(epoch, start)]


def test_an_epoch_is_a_permutation_fixed_by_seed_and_epoch(images):
    ld = loader(images)
    first = batches(ld)
    assert len(first) == len(ld) == 3
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(N))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, batches(ld)))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, batches(ld, epoch=1)))


def test_full_batches_only_when_training():
    ld = DeviceLoader(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long), 4,
                      train=True, mean=MEAN, std=STD, device="cpu")
    assert len(ld) == 2 and all(len(y) == 4 for _, y in ld.epoch(0))


def test_replay_from_a_step_equals_the_rest_of_the_epoch(images):
    ld = loader(images)
    whole, tail = batches(ld, epoch=3), batches(ld, epoch=3, start=1)
    assert len(tail) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[1:], tail))


def test_ranks_split_each_global_batch(images):
    single = batches(loader(images))
    ranks = [batches(loader(images, rank=r, world=2)) for r in range(2)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)


def test_evaluation_counts_every_sample_once_across_ranks(images):
    seen = [y for r in range(5) for _, y in batches(loader(images, train=False, rank=r, world=5))]
    assert sorted(torch.cat(seen).tolist()) == list(range(N))
    assert batches(loader(images, train=False, rank=N, world=N + 1)) == []  # a rank with no test sample: no batch
    x, y = batches(loader(images, train=False, batch=N))[0]
    assert torch.equal(x, normalize(images, MEAN, STD)) and torch.equal(y, torch.arange(N))


def test_augmentation_is_a_flip_and_a_shifted_window_of_the_zero_padded_image(images):
    pad = 2
    ld = loader(images, crop_padding=pad, hflip=True)
    shifts_seen, flips_seen = set(), set()
    for x, y in ld.epoch(0):
        raw = x * torch.tensor(STD).view(1, -1, 1, 1) * 255 + torch.tensor(MEAN).view(1, -1, 1, 1) * 255
        raw = raw.round().to(torch.uint8)
        for img, i in zip(raw, y.tolist()):
            padded = torch.nn.functional.pad(images[i], (pad, pad, pad, pad))
            matches = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (0, 1)
                       if torch.equal(img, (lambda w: w.flip(2) if flip else w)(padded[:, dy:dy + H, dx:dx + W]))]
            assert matches, f"image {i} is no crop of its padded original"
            shifts_seen.add(matches[0][:2])
            flips_seen.add(matches[0][2])
    assert len(shifts_seen) > 3 and flips_seen == {0, 1}


def test_normalize_matches_the_formula(images):
    x = normalize(images, MEAN, STD)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
    torch.testing.assert_close(x, expected)


def test_batch_mistakes_are_user_errors(images):
    with pytest.raises(UserError, match="larger than the 24 training samples"):
        loader(images, batch=25)
    with pytest.raises(UserError, match="does not divide by the 3 processes"):
        loader(images, batch=8, world=3)


def test_a_checkpoint_of_other_class_names_is_refused_at_evaluation(tmp_path):
    from PIL import Image

    from experiment.data import checkpoint_test_loader

    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / c / "0.png")
    dataset = {"name": "folder", "root": str(tmp_path), "image_size": 8, "eval_batch_size": 2, "num_workers": 0,
               "verify_images": True, "skip_bad_images": False, "mean": [0.5] * 3, "std": [0.5] * 3}
    ckpt = {"config": {"dataset": dataset}, "num_classes": 2, "classes": ["cat", "dog"]}
    cfg, classes, _ = checkpoint_test_loader(ckpt, "x.pt", {}, device="cpu", config_dir=ROOT / "configs/dataset")
    assert classes == ["cat", "dog"]
    with pytest.raises(UserError, match="x.pt was trained on classes that folder names otherwise .*ant/cat, bee/dog"):
        checkpoint_test_loader({**ckpt, "classes": ["ant", "bee"]}, "x.pt", {}, device="cpu",
                               config_dir=ROOT / "configs/dataset")


# ---------------------------------------------------------------------------------------------------------------
# Images are what they claim: 16-bit images scaled, hidden folders and files left out, a bad file mid-epoch named

@pytest.mark.parametrize("cache", ["off", "auto"])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path, cache):
    root = image_tree(tmp_path / "data")
    levels = np.arange(256, dtype=np.uint16).repeat(16).reshape(64, 64)  # every 8-bit level, as 16-bit
    Image.fromarray(levels * 257).save(root / "train" / "cat" / "0.png")  # PIL reads it back as mode I;16
    assert Image.open(root / "train" / "cat" / "0.png").mode.startswith("I")
    data = load_dataset(folder_cfg(root, cache=cache, image_size=64, cache_dir=str(tmp_path / "cache")))
    from experiment.image_folder import read_rgb

    pixels = np.asarray(read_rgb(root / "train" / "cat" / "0.png"))
    assert (pixels == levels[..., None]).all()  # 65535 -> 255, 257 * v -> v: no level lost, none clipped
    if cache == "auto":
        assert torch.equal(data.train.images[0], torch.from_numpy(levels.astype(np.uint8)).expand(3, 64, 64))


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_hidden_folders_are_no_classes_and_hidden_files_no_images(tmp_path, cache):
    root = image_tree(tmp_path / "data")
    for split in ("train", "val"):
        png(root / split / ".ipynb_checkpoints" / "0.png")  # a hidden folder, with an image in it
        (root / split / "cat" / "._0.png").write_bytes(b"macOS resource fork, not an image")
    data = load_dataset(folder_cfg(root, cache=cache, cache_dir=str(tmp_path / "cache")))
    assert data.classes == ["cat", "dog"] and len(data.train) == 4 and len(data.test) == 4


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_images_in_a_hidden_folder_inside_a_class_are_left_out(tmp_path, cache):
    root = image_tree(tmp_path / ".datasets" / "data")  # a hidden folder above the dataset hides nothing
    png(root / "train" / "cat" / "more" / "0.png")  # a plain subfolder of a class is read, under that class
    png(root / "train" / "cat" / ".ipynb_checkpoints" / "0.png")
    png(root / "train" / "cat" / "more" / ".hidden" / "0.png")
    data = load_dataset(folder_cfg(root, cache=cache, cache_dir=str(tmp_path / "cache")))
    assert sorted(data.train.targets) == [0, 0, 0, 1, 1]
    png(root / "val" / "dog" / ".ipynb_checkpoints" / "0.png")
    for f in (root / "val" / "dog").glob("*.png"):
        f.unlink()
    with pytest.raises(UserError, match=r"class folder .*val/dog holds no images"):
        load_dataset(folder_cfg(root, cache=cache, cache_dir=str(tmp_path / "cache")))
    (root / "val" / "dog" / "nested").mkdir()
    png(root / "val" / "dog" / "nested" / "0.png")  # an image in a subfolder is one, for the check as for reading
    assert len(load_dataset(folder_cfg(root, cache=cache, cache_dir=str(tmp_path / "cache"))).test) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_met_mid_epoch_is_one_line_naming_it(tmp_path, workers):
    from experiment.data import build_loaders

    root = image_tree(tmp_path / "data", per_class=4)
    bad = root / "train" / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])
    cfg = folder_cfg(root, verify_images=False, num_workers=workers, batch_size=8)
    train, _ = build_loaders(load_dataset(cfg), cfg, device="cpu", seed=0)
    with train, pytest.raises(UserError) as caught:
        list(train.epoch(0))
    message = str(caught.value)
    assert message.startswith(f"cannot read image {bad} (") and "\n" not in message
    assert "in the middle of an epoch" in message and "dataset.verify_images=true" in message


def test_a_checkpoints_config_never_chooses_where_a_cache_is_written():
    from experiment.data import dataset_config

    stored = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/dataset/folder.yaml"))
    stored.update(root="/data", cache_dir="/somewhere/the/checkpoint/chose")
    assert dataset_config(stored, {"name": None}, ROOT / "configs/dataset").cache_dir is None  # this machine's default
