"""The device-resident loader: deterministic, replayable from any step, sharded exactly, augmenting correctly."""
import pytest
import torch

from experiment.errors import UserError
from experiment.loaders import DeviceLoader, normalize

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

    from experiment.loaders import checkpoint_test_loader

    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / c / "0.png")
    dataset = {"name": "folder", "root": str(tmp_path), "image_size": 8, "eval_batch_size": 2, "num_workers": 0,
               "verify_images": True, "skip_bad_images": False, "mean": [0.5] * 3, "std": [0.5] * 3}
    ckpt = {"config": {"dataset": dataset}, "num_classes": 2, "classes": ["cat", "dog"]}
    cfg, classes, _ = checkpoint_test_loader(ckpt, "x.pt", {}, device="cpu")
    assert classes == ["cat", "dog"]
    with pytest.raises(UserError, match="x.pt was trained on classes that folder names otherwise .*ant/cat, bee/dog"):
        checkpoint_test_loader({**ckpt, "classes": ["ant", "bee"]}, "x.pt", {}, device="cpu")
