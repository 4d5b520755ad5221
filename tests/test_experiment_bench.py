"""experiment.bench: the benchmark runs end to end on CPU and measures what train.py runs."""
import json
import math

import pytest
import torch

from compiled_vs_eager import compiled_loss_curve
from experiment import bench
from nets import fuse_model

TINY = ["--device", "cpu", "--batch-sizes", "8", "--width", "0.125", "--classifier-width", "32",
        "--steps", "2", "--warmup", "1", "--repeats", "2"]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    bench.main([*TINY, "--json", str(path)])
    return json.loads(path.read_text())


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_bench_writes_json_with_all_measurements(tiny_results, capsys):
    r = tiny_results
    assert {"machine", "command", "settings", "train", "eval", "input", "ratios", "train_step_flops_per_image",
            "fused_max_abs_diff"} <= set(r)
    assert r["settings"]["device"] == "cpu" and r["settings"]["batch_sizes"] == [8]
    assert {(t["model"], t["mode"], t["batch_size"]) for t in r["train"]} == {("baseline", "eager", 8),
                                                                              ("ac", "eager", 8)}
    assert {e["model"] for e in r["eval"]} == {"ac_unfused", "ac_fused", "baseline_deploy"}
    for row in r["train"] + r["eval"] + r["input"]:
        assert _positive(row["img_per_s"]) and _positive(row["step_ms"])
        assert len(row["runs_img_per_s"]) == 2 and all(map(_positive, row["runs_img_per_s"]))
        assert row["peak_mem_bytes"] is None  # CPU: no GPU memory to report
    for row in r["train"]:
        assert _positive(row["tflops"]) and math.isfinite(row["loss"])
    assert _positive(r["input"][0]["batches_per_s"])
    for name in ("ac_over_baseline_step_time", "fused_over_deploy", "fused_over_unfused"):
        assert len(r["ratios"][name]) == 1 and _positive(r["ratios"][name][0]["ratio"])
    flops = r["train_step_flops_per_image"]
    assert _positive(flops["baseline"]) and flops["ac"] > flops["baseline"]
    assert r["fused_max_abs_diff"] < 1e-4


def test_table_shows_the_ratios(tiny_results):
    table = bench.format_table(tiny_results)
    assert "AC/baseline step time" in table and "fused/deploy" in table and "fused/unfused" in table
    assert "| ac | eager | 8 |" in table and "| ac_fused | eager | 8 |" in table


def test_quick_defaults_and_overrides():
    args = bench.parse_args(["--device", "cpu", "--quick"])
    assert (args.width, args.batch_sizes, args.image_size, args.channels_last) == (0.25, [64], 32, False)
    args = bench.parse_args(["--device", "cpu", "--quick", "--width", "0.5", "--layout", "imagenet"])
    assert (args.width, args.image_size) == (0.5, 224)
    args = bench.parse_args(["--device", "cpu"])
    assert (args.width, args.classifier_width, args.batch_sizes) == (1.0, 4096, [128, 512, 1024])


def test_bad_option_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--batch-sizes", "1"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --batch-sizes")


@pytest.mark.parametrize("sizes", ["a,b", "64,", "1.5"])
def test_batch_sizes_that_are_not_integers_say_what_is_expected(capsys, sizes):
    """It was argparse's `invalid <lambda> value`."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu", "--batch-sizes", sizes])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.endswith(
        f"error: argument --batch-sizes: expected comma-separated integers such as 128,512, not {sizes!r}")


@pytest.mark.parametrize("options, says", [
    (["--layout", "imagenet", "--image-size", "8"], "--image-size 8 is too small for the imagenet layout"),
    (["--image-size", "4"], "--image-size 4 is too small for the cifar layout"),
    (["--image-size", "0"], "--image-size 0 must be >= 1"),
    (["--width", "0"], "--width must be a finite number above 0"),
    (["--width", "inf"], "--width must be a finite number above 0"),
    (["--dropout", "nan"], "--dropout in [0, 1)"),
    (["--classifier-width", "0"], "--classifier-width >= 1"),
    (["--json", "{tmp}"], "it is a folder; pass a file name as --json="),
    (["--json", "{tmp}/file/bench.json"], "file is a file, not a folder"),
    (["--json", "{tmp}/file"], "would replace a file this tool did not write"),
])
def test_bad_options_are_one_line_before_anything_is_measured(tmp_path, capsys, monkeypatch, options, says):
    (tmp_path / "file").write_text("mine\n")
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as e:
        bench.main([*TINY, *(o.format(tmp=tmp_path) for o in options)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "mine\n"


def test_json_replaces_only_an_earlier_result(tiny_results, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(tiny_results))
    assert bench.parse_args([*TINY, "--json", str(path)]).json == path


def test_trained_ac_model_fuses_to_the_same_logits():
    """Sanity check (nets' tests prove fusion): after a few real training steps, so BN statistics are not trivial."""
    args = bench.parse_args([*TINY])
    runner = bench.TrainRunner("ac", 8, args, args.device)
    bench.measure([runner], args.repeats, args.device)
    model = runner.model
    x, _ = next(bench.fake_loader(16, 1, 32, args.device, train=False).epoch(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fuse_model(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_training_step_flops_ratio_at_full_width():
    args = bench.parse_args(["--device", "cpu"])
    flops = {k: bench.train_step_flops(bench.model_config(k, args), 32) for k in bench.MODELS}
    assert flops["ac"] / flops["baseline"] == pytest.approx(1.47, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["baseline", "ac"])
def test_compiled_model_trains_to_the_same_losses_as_eager_on_cpu(kind):
    """The fast path (torch.compile, inductor's C++ backend on CPU) follows eager's loss curve in float32."""
    eager_losses, eager = compiled_loss_curve(kind, steps=5)
    fast_losses, fast = compiled_loss_curve(kind, compile_mode="default", steps=5)
    assert fast_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
