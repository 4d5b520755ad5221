"""experiment/datasets.py: image-folder layout checks and unreadable images, each a UserError that says what to do."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT
from experiment.datasets import holdout_split, load_dataset, report_skipped_images
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
    cfg = OmegaConf.load(ROOT / "configs/dataset/folder.yaml")
    cfg.root, cfg.image_size, cfg.num_workers = str(root), 16, 0
    return OmegaConf.merge(cfg, extra)


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
    from experiment.datasets import dataset_config

    stored = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/dataset/cifar10.yaml"))
    stored.update(download=True, root="/somewhere/the/checkpoint/chose")
    assert dataset_config(stored, {"name": None, "download": None}).download is False
    assert dataset_config(stored, {"name": None, "download": True}).download is True  # the user's own choice
