"""fuse.py on checkpoints trained in this test session."""
import onnx
import pytest
import torch

from conftest import run_main, run_script
from nets import AlexNet


@pytest.mark.parametrize("model", ["alexnet", "alexnet_ac"])
def test_fuse_writes_a_deploy_checkpoint_that_loads_into_plain_alexnet(trained_runs, model, tmp_path):
    out = tmp_path / f"{model}_deploy.pt"
    proc = run_main("fuse.py", f"ckpt={trained_runs[model] / 'checkpoints/best.pt'}", f"out={out}")
    assert "random input" in proc.stdout and "test batch" in proc.stdout and "parameters" in proc.stdout
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["deploy"] is True and ckpt["config"]["model"]["arch"] == "AlexNet"
    cfg = ckpt["config"]["model"]
    fresh = AlexNet(num_classes=10, bn=False, layout=cfg["layout"], width=cfg["width"],
                    classifier_width=cfg["classifier_width"], dropout=cfg["dropout"])
    fresh.load_state_dict(ckpt["model"], strict=True)


def test_fuse_defaults_to_stem_deploy_beside_the_input_and_skips_deploy_checkpoints(trained_runs, tmp_path):
    src = tmp_path / "best.pt"
    src.write_bytes((trained_runs["alexnet_ac"] / "checkpoints/best.pt").read_bytes())
    run_main("fuse.py", f"ckpt={src}")
    deploy = tmp_path / "best_deploy.pt"
    assert deploy.is_file()
    before = deploy.stat().st_mtime_ns
    proc = run_main("fuse.py", f"ckpt={deploy}")
    assert "nothing to fuse" in proc.stdout
    assert deploy.stat().st_mtime_ns == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best_deploy.pt"]


def test_fuse_exits_non_zero_and_writes_nothing_above_tolerance(trained_runs, tmp_path):
    out = tmp_path / "deploy.pt"
    # No fusion is exact to 1e-12 in float32: the check must refuse it.
    proc = run_script("fuse.py", f"ckpt={trained_runs['alexnet_ac'] / 'checkpoints/best.pt'}", f"out={out}",
                      "tolerance=1e-12", check=False)  # a real process: its exit status
    assert proc.returncode == 1 and "NOT exact" in proc.stdout + proc.stderr
    assert not out.exists()


def test_onnx_export_is_checked_against_pytorch(trained_runs, tmp_path):
    out = tmp_path / "deploy.pt"
    proc = run_main("fuse.py", f"ckpt={trained_runs['alexnet_ac'] / 'checkpoints/last.pt'}", f"out={out}", "onnx=true")
    assert "onnx, test batch" in proc.stdout
    graph = onnx.load(str(tmp_path / "deploy.onnx")).graph
    assert graph.input[0].name == "images" and graph.output[0].name == "logits"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch dimension
    assert not any(node.op_type == "BatchNormalization" for node in graph.node)


def test_out_equal_to_the_input_is_refused_and_the_input_kept(trained_runs, tmp_path):
    ckpt = trained_runs["alexnet_ac"] / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    (tmp_path / "alias.pt").symlink_to(ckpt)
    for out in (ckpt, tmp_path / "alias.pt"):
        proc = run_main("fuse.py", f"ckpt={ckpt}", f"out={out}", check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: out={out} would overwrite the input")
    assert ckpt.read_bytes() == before


def test_a_failed_check_keeps_the_earlier_verified_onnx_export(trained_runs, tmp_path):
    ckpt, out = trained_runs["alexnet_ac"] / "checkpoints" / "best.pt", tmp_path / "deploy.pt"
    run_main("fuse.py", f"ckpt={ckpt}", f"out={out}", "onnx=true")
    exported = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = run_main("fuse.py", f"ckpt={ckpt}", f"out={out}", "onnx=true", "tolerance=1e-12", check=False)
    assert proc.returncode == 1 and "NOT exact" in proc.stdout + proc.stderr
    assert "deploy.onnx" in exported and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == exported


@pytest.mark.parametrize("option", ["onnx=maybe", "ckpt=5", "out=5"])
def test_a_bad_option_is_one_line_and_writes_nothing(trained_runs, tmp_path, option):
    """onnx=maybe was read as true and exported the ONNX file; ckpt=5 and out=5 were TypeError tracebacks."""
    proc = run_main("fuse.py", f"ckpt={trained_runs['alexnet_ac'] / 'checkpoints/best.pt'}",
                    f"out={tmp_path / 'deploy.pt'}", option, check=False)
    key = option.split("=")[0]
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {key}=") and "is not valid" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())
