"""model=torchvision through every entry point: train both arms, fuse the AC run, compare, report."""
import json

import pytest
import torch
import torchvision

from conftest import run_script
from experiment.report import main as report_main


@pytest.mark.slow  # about 2-4 minutes on two shared CPU cores
def test_resnet18_baseline_and_ac_train_fuse_compare_and_pair_in_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", "model=torchvision", "model.arch=resnet18", "model.ac=false,true", "dataset=digits",
               "trainer.epochs=1", "trainer.device=cpu", "trainer.progress=false", f"hydra.sweep.dir={sweep}",
               timeout=600)
    ac_run = sweep / "1_resnet18_ac_digits_seed0"
    assert json.loads((ac_run / "metrics.json").read_text())["model"] == "resnet18_ac"
    assert json.loads((sweep / "0_resnet18_digits_seed0/metrics.json").read_text())["model"] == "resnet18"

    best = ac_run / "checkpoints/best.pt"
    run_script("fuse.py", f"ckpt={best}")
    deploy = torch.load(best.with_name("best_deploy.pt"), weights_only=True)
    torchvision.models.resnet18(num_classes=10).load_state_dict(deploy["model"], strict=True)

    out = tmp_path / "compare.json"
    run_script("eval.py", f"ckpt={best}", f"compare={best.with_name('best_deploy.pt')}", f"out={out}")
    assert json.loads(out.read_text())["compare"]["differing_predictions"] == 0

    assert report_main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report/report.md").read_text()
    assert "| digits | resnet18_ac | resnet18 | 1 |" in report
    assert (tmp_path / "report/kernel_skeleton_digits.png").is_file()
