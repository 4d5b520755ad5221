"""eval.py on trained and fused checkpoints: the fused model keeps the trained model's accuracy exactly."""
import json
import os

import pytest
from PIL import Image

from conftest import run_main, run_script


def test_eval_reports_and_trained_equals_fused(trained_runs, tmp_path):
    best = trained_runs["alexnet_ac"] / "checkpoints/best.pt"
    deploy = tmp_path / "deploy.pt"
    run_main("fuse.py", f"ckpt={best}", f"out={deploy}")
    out = tmp_path / "trained.eval.json"
    proc = run_main("eval.py", f"ckpt={best}", f"compare={deploy}", f"out={out}")
    report = json.loads(out.read_text())
    assert {"acc1", "acc5", "loss", "num_samples", "per_class_acc1", "img_per_s"} <= report.keys()
    assert report["num_samples"] == 360 and len(report["per_class_acc1"]) == 10
    metrics = json.loads((trained_runs["alexnet_ac"] / "metrics.json").read_text())
    assert abs(report["acc1"] - metrics["best_acc1"]) < 1e-9  # the same split and model as at training time
    assert report["compare"]["acc1_difference"] == 0 and report["compare"]["differing_predictions"] == 0
    assert "0 of 360 predictions differ" in proc.stdout
    png = tmp_path / "trained.confusion.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100

    deploy_report = tmp_path / "deploy.eval.json"
    run_main("eval.py", f"ckpt={deploy}")
    assert json.loads(deploy_report.read_text())["acc1"] == report["acc1"]


def test_fused_model_changes_no_prediction_on_cifar_sized_random_images(trained_runs, tmp_path):
    # 10,000 random 32x32 images: far from the training data, full of near-ties, where a fold error would show
    best = trained_runs["alexnet_ac"] / "checkpoints/best.pt"
    deploy = tmp_path / "deploy.pt"
    run_main("fuse.py", f"ckpt={best}", f"out={deploy}")
    out = tmp_path / "fake.eval.json"
    run_main("eval.py", f"ckpt={best}", f"compare={deploy}", "dataset.name=fake", f"out={out}")
    report = json.loads(out.read_text())
    assert report["dataset"] == "fake" and report["num_samples"] == 10000
    assert report["compare"]["acc1_difference"] == 0 and report["compare"]["differing_predictions"] == 0


def test_bad_ckpt_values_end_in_one_clear_line(tmp_path):
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    for script in ("eval.py", "fuse.py"):
        for ckpt, says in ((tmp_path / "missing.pt", "does not exist"), (not_ckpt, "not a readable PyTorch checkpoint")):
            # a real process for a missing file (its exit status and stderr), the entry point's main otherwise
            proc = (run_script if ckpt.name == "missing.pt" else run_main)(script, f"ckpt={ckpt}", check=False)
            assert proc.returncode == 2
            assert proc.stderr.strip().startswith("error:") and says in proc.stderr
            assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("option", ["amp=maybe", "compare=true", "out=5"])
def test_a_bad_option_is_one_line_and_writes_nothing(trained_runs, tmp_path, option):
    """amp=maybe was read as true; compare=true and out=5 were TypeError tracebacks."""
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes((trained_runs["alexnet"] / "checkpoints/best.pt").read_bytes())
    proc = run_main("eval.py", f"ckpt={ckpt}", option, check=False)
    key = option.split("=")[0]
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {key}=") and "is not valid" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_out_equal_to_the_checkpoint_is_refused_also_as_a_hard_link(trained_runs, tmp_path):
    ckpt = trained_runs["alexnet"] / "checkpoints" / "best.pt"
    before = ckpt.read_bytes()
    os.link(ckpt, tmp_path / "same.pt")
    for out in (ckpt, tmp_path / "same.pt"):
        proc = run_main("eval.py", f"ckpt={ckpt}", f"out={out}", check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: out={out} would overwrite the input")
    assert ckpt.read_bytes() == before


def test_a_class_left_without_test_images_is_reported_as_having_none(tmp_path):
    """dataset.skip_bad_images can leave a class of the test split empty: its top-1 is not 0%, it is unknown."""
    import numpy as np

    from conftest import TINY

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog", "fox"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    run_main("train.py", *TINY, "dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.image_size=32",
             "dataset.batch_size=4", "dataset.eval_batch_size=5", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    for image in (tmp_path / "data" / "val" / "fox").iterdir():
        image.write_bytes(b"not an image any more")
    out = tmp_path / "eval.json"
    proc = run_main("eval.py", f"ckpt={tmp_path / 'run/checkpoints/best.pt'}", "dataset.skip_bad_images=true",
                    f"out={out}")
    report = json.loads(out.read_text())
    assert report["per_class_acc1"]["fox"] is None and report["num_samples"] == 8
    assert all(isinstance(report["per_class_acc1"][c], float) for c in ("cat", "dog"))
    assert "fox no images" in proc.stdout
