"""train.py end to end on the offline digits data: its own `main` in this process (conftest.run_main), and the
`-m` sweep through a real `python train.py` subprocess."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from conftest import ROOT, TINY, read_metrics, run_main, run_script

TIMING = ("epoch_s", "img_per_s")


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_run_directory_holds_everything(trained_runs):
    run = trained_runs["alexnet_ac"]
    for name in ("config.yaml", "train.log", "metrics.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    metrics = read_metrics(run)
    assert {"model", "dataset", "seed", "epochs", "best_acc1", "final_acc1", "train_seconds"} <= metrics.keys()
    assert (metrics["model"], metrics["dataset"], metrics["seed"], metrics["epochs"]) == ("alexnet_ac", "digits", 0, 3)
    assert len(metrics["history"]) == 3
    # 3 epochs of the tiny AC model (branch scales 1, see conftest.trained_runs) reach ~75%; chance is 10%.
    assert metrics["best_acc1"] > 50
    assert metrics["best_acc1"] == max(h["val_acc1"] for h in metrics["history"])
    assert metrics["final_acc1"] == metrics["history"][-1]["val_acc1"]
    # no validation split: best.pt was picked on the test split, and that is its test score
    assert metrics["selected_on"] == "test" and metrics["test_acc1"] == metrics["best_acc1"]
    # the end of the log says how to compare the arms and where TensorBoard shows the verdict
    assert ("then open http://127.0.0.1:6006/?smoothing=0&runColorGroup=regex:(alexnet_ac|alexnet)"
            "&tagFilter=^verdict#timeseries") in (run / "train.log").read_text()

    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_acc1", "rng", "config"} <= ckpt.keys()
    assert ckpt["epoch"] == 3 and ckpt["step"] == 0
    assert ckpt["config"]["model"]["arch"] == "AlexNetAC"
    best = torch.load(run / "checkpoints/best.pt", weights_only=True)
    assert best["best_acc1"] == metrics["best_acc1"]


def test_validation_split_picks_best_pt_and_the_test_split_scores_it_once(tmp_path):
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, "model=alexnet_ac", "dataset.val_split=0.2", "trainer.epochs=2",
                      f"hydra.run.dir={run}")
    assert "validation split: 287 held-out training images pick best.pt" in proc.stdout
    metrics = read_metrics(run)
    assert metrics["selected_on"] == "val"
    assert metrics["best_acc1"] == max(h["val_acc1"] for h in metrics["history"])
    # the per-epoch scores are on 287 images, so multiples of 100/287; the test split has 360
    assert all(round(h["val_acc1"] * 287 / 100, 6).is_integer() for h in metrics["history"])
    evaluated = run / "best.eval.json"
    run_main("eval.py", f"ckpt={run / 'checkpoints/best.pt'}", f"out={evaluated}")
    report = json.loads(evaluated.read_text())
    assert report["num_samples"] == 360 and metrics["test_acc1"] == report["acc1"]


def test_tensorboard_tags_and_hparams_live_in_the_run_directory(trained_runs):
    run = trained_runs["alexnet"]
    events = EventAccumulator(str(run))
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/acc1", "val/loss", "val/acc1", "val/acc5", "lr", "perf/img_per_s", "perf/epoch_s"):
        assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3]
    assert set(tags["images"]) == {"images/augmented_batch", "images/kernel_skeleton"}
    for tag in ("whole_run/best_acc1", "whole_run/final_acc1", "whole_run/test_acc1"):
        assert [e.step for e in events.Scalars(tag)] == [3], tag
    assert not any(tag.startswith("hparam/") for tag in tags["scalars"])
    assert [p for p in run.iterdir() if p.is_dir()] == [run / "checkpoints"]  # no side folder for hparams
    hparams = EventAccumulator(str(run), size_guidance={"tensors": 0})
    hparams.Reload()
    plugin = hparams.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugin
    start = metadata.parse_session_start_info_plugin_data(plugin[metadata.SESSION_START_INFO_TAG])
    assert start.group_name.startswith("alexnet_digits_")


def stretch_to(checkpoint, epochs):
    """Make a finished run's last.pt look like that of a longer run stopped after its last epoch."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["trainer"]["epochs"] = epochs
    torch.save(ckpt, checkpoint)


def test_same_seed_gives_identical_metrics_and_resume_continues_exactly(tmp_path):
    # A constant learning rate (multistep without milestones) makes a 2-epoch run the prefix of a 3-epoch one,
    # so its last.pt is what a 3-epoch run leaves after epoch 2.
    common = [*TINY, "model=alexnet_ac", "scheduler=multistep", "scheduler.milestones=[]"]
    run_main("train.py", *common, "trainer.epochs=3", f"hydra.run.dir={tmp_path / 'straight'}")
    run_main("train.py", *common, "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'resumed'}")
    stretch_to(tmp_path / "resumed/checkpoints/last.pt", 3)
    proc = run_main("train.py", f"resume={tmp_path / 'resumed/checkpoints/last.pt'}")
    assert "resumed from" in proc.stdout and "epoch 3/3" in proc.stdout and "epoch 2/3" not in proc.stdout

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert without_timing(resumed["history"]) == without_timing(straight["history"])
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_gives_one_directory_per_job(tmp_path):
    proc = run_script("train.py", "-m", *TINY, "model=alexnet,alexnet_ac", "trainer.epochs=1",
                      f"hydra.sweep.dir={tmp_path}")
    runs = sorted(p.parent.name for p in tmp_path.glob("*/metrics.json"))
    assert runs == ["0_alexnet_digits_seed0", "1_alexnet_ac_digits_seed0"], proc.stdout


def write_image_tree(root, classes=("cat", "dog", "fox"), per_class=4, size=36):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_trains_on_an_image_folder(tmp_path):
    write_image_tree(tmp_path / "data")
    run_main("train.py", *TINY, "dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.image_size=32",
               "dataset.num_workers=0", "dataset.batch_size=4", "dataset.eval_batch_size=5", "trainer.epochs=1",
               f"hydra.run.dir={tmp_path / 'run'}")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["dataset"] == "folder" and len(metrics["history"]) == 1
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert ckpt["classes"] == ["cat", "dog", "fox"] and ckpt["num_classes"] == 3


def write_cifar10(root, n_train_per_batch=6, n_test=7):
    """Files in CIFAR-10's own format: pickled dicts of uint8 rows (3072 = 3x32x32, channel-major)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": n_train_per_batch for i in range(1, 6)} | {"test_batch": n_test}
    for name, n in batches.items():
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    with open(folder / "test_batch", "rb") as f:
        return pickle.load(f)


def test_cifar_code_path_reads_cifar_format_files(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    from torchvision.datasets import CIFAR10

    from experiment.data import load_dataset

    test_batch = write_cifar10(tmp_path)
    # the fabricated files have other md5 sums than the real ones: bypass the integrity check, here only
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5: True)
    monkeypatch.setattr(CIFAR10, "download", lambda self: None)
    cfg = OmegaConf.load(ROOT / "configs/dataset/cifar10.yaml")
    cfg.root, cfg.download = str(tmp_path), True
    data = load_dataset(cfg)
    assert data.train_images.shape == (30, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (7, 3, 32, 32)
    expected = torch.from_numpy(test_batch["data"]).view(7, 3, 32, 32)
    assert torch.equal(data.test_images, expected)
    assert data.test_labels.tolist() == test_batch["labels"]
    assert data.classes == [f"class{i}" for i in range(10)]


def test_cifar_without_network_says_what_to_do(tmp_path, monkeypatch):
    import urllib.error

    from omegaconf import OmegaConf
    from torchvision.datasets import CIFAR10

    from experiment.data import load_dataset
    from experiment.errors import UserError

    def offline(self):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(CIFAR10, "download", offline)
    cfg = OmegaConf.load(ROOT / "configs/dataset/cifar10.yaml")
    cfg.root = str(tmp_path)
    with pytest.raises(UserError, match="cifar-10-python.tar.gz.*dataset=digits"):
        load_dataset(cfg)
    cfg.download = False
    with pytest.raises(UserError, match="not found"):
        load_dataset(cfg)
