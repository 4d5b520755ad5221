"""experiment.report on synthetic run directories with hand-computed statistics; the report's figures are valid
PNGs (the figures themselves: test_experiment_figures.py)."""
import csv
import json
import logging
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from scipy import stats

from experiment.report import (baseline_of, load_runs, main, recipe_differences, paired_differences, render_markdown,
                               summarize, verdict, write_report)


T975_DF2 = 4.302652729749464  # Student t 97.5% quantile, 2 degrees of freedom (n = 3 pairs)
REPO = Path(__file__).resolve().parents[1]


def write_run(root, name, model, seed, best, final=None, dataset="cifar10", epochs=3, test=None):
    """A run's metrics.json; with `test`, its best.pt was picked on a validation split and scored `test`."""
    run_dir = Path(root, name)
    run_dir.mkdir(parents=True)
    final = best - 0.5 if final is None else final
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc1": 50.0 + e, "val_loss": 1.2 / e,
                "val_acc1": final - (epochs - e), "val_acc5": 99.0, "lr": 0.1, "epoch_s": 1.0, "img_per_s": 1e4}
               for e in range(1, epochs + 1)]
    metrics = {"model": model, "dataset": dataset, "seed": seed, "epochs": epochs, "best_acc1": best,
               "final_acc1": final, "train_seconds": 3.0, "img_per_s": 1e4, "history": history}
    if test is not None:
        metrics.update(test_acc1=test, selected_on="val")
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


# Three seeds per arm; AC − baseline best_acc1 differences are 0.4, 0.6, 0.5.
BASE_BEST = {0: 90.0, 1: 90.2, 2: 89.9}
AC_BEST = {0: 90.4, 1: 90.8, 2: 90.4}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2026-11-27" / "12-00-00"
    for seed, best in BASE_BEST.items():
        write_run(root, f"{seed}_alexnet_seed{seed}", "alexnet", seed, best)
    for seed, best in AC_BEST.items():
        write_run(root, f"{3 + seed}_alexnet_ac_seed{seed}", "alexnet_ac", seed, best, final=best)
    write_run(root, "6_alexnet_ac_seed7", "alexnet_ac", 7, 91.0)  # AC arm only: reported, not paired
    return tmp_path / "multirun"


def test_baseline_of():
    assert baseline_of("alexnet_ac") == "alexnet"
    assert baseline_of("alexnet_ac_imagenet") == "alexnet_imagenet"
    assert baseline_of("alexnet") is None
    assert baseline_of("alexnet_imagenet") is None
    assert baseline_of("alexnet_acme") is None
    assert baseline_of("resnet18_ac") == "resnet18"
    assert baseline_of("mobilenet_v2_ac") == "mobilenet_v2"
    assert baseline_of("resnet18") is None and baseline_of("_ac") is None


def test_load_runs_finds_nested_runs_and_notes_unfinished(sweep, caplog):
    unfinished = sweep / "2026-11-27" / "12-00-00" / "7_alexnet_seed9"
    (unfinished / "checkpoints").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        runs = load_runs([sweep])
    assert len(runs) == 7
    assert {Path(r["dir"]).name for r in runs} >= {"0_alexnet_seed0", "6_alexnet_ac_seed7"}
    assert "7_alexnet_seed9" in caplog.text and "no metrics.json" in caplog.text


def test_load_runs_same_run_twice_is_loaded_once(sweep):
    one_run = next(sweep.rglob("0_alexnet_seed0"))
    assert len(load_runs([sweep, one_run])) == 7


def test_load_runs_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_runs([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no metrics.json found"):
        load_runs([tmp_path])
    write_run(tmp_path / "a", "r", "alexnet", 0, 90.0)
    write_run(tmp_path / "b", "r", "alexnet", 0, 91.0)
    with pytest.raises(ValueError, match=r"a[/\\]r and .*b[/\\]r are both alexnet seed 0 on cifar10"):
        load_runs([tmp_path])


def test_summarize_mean_and_sample_std(sweep):
    rows = {row["model"]: row for row in summarize(load_runs([sweep]))}
    assert list(rows) == ["alexnet", "alexnet_ac"]
    base = rows["alexnet"]
    assert base["n_seeds"] == 3 and base["seeds"] == [0, 1, 2]
    assert base["best_acc1_mean"] == pytest.approx(270.1 / 3)
    mean = 270.1 / 3
    assert base["best_acc1_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in BASE_BEST.values()) / 2))
    assert base["final_acc1_mean"] == pytest.approx(270.1 / 3 - 0.5)
    ac = rows["alexnet_ac"]
    assert ac["n_seeds"] == 4 and ac["best_acc1_mean"] == pytest.approx((90.4 + 90.8 + 90.4 + 91.0) / 4)


def test_summarize_single_run_std_is_nan(tmp_path):
    write_run(tmp_path, "r", "alexnet", 0, 90.0)
    (row,) = summarize(load_runs([tmp_path]))
    assert row["n_seeds"] == 1 and row["best_acc1_mean"] == 90.0
    assert math.isnan(row["best_acc1_std"]) and math.isnan(row["final_acc1_std"])


def test_paired_differences_by_hand(sweep):
    (pair,) = paired_differences(load_runs([sweep]))
    assert (pair["dataset"], pair["model"], pair["baseline"]) == ("cifar10", "alexnet_ac", "alexnet")
    assert pair["n_pairs"] == 3 and pair["paired_seeds"] == [0, 1, 2]
    assert pair["unpaired_ac_seeds"] == [7] and pair["unpaired_baseline_seeds"] == []
    # Differences 0.4, 0.6, 0.5: mean 0.5, sample std 0.1.
    assert pair["best_acc1_diff_mean"] == pytest.approx(0.5)
    assert pair["best_acc1_diff_std"] == pytest.approx(0.1)
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert pair["best_acc1_ci_low"] == pytest.approx(0.5 - half)
    assert pair["best_acc1_ci_high"] == pytest.approx(0.5 + half)
    # final_acc1 is best - 0.5 for the baseline and best for AC: differences 0.9, 1.1, 1.0.
    assert pair["final_acc1_diff_mean"] == pytest.approx(1.0)
    assert pair["final_acc1_diff_std"] == pytest.approx(0.1)


def test_verdict_excludes_and_includes_zero(sweep, tmp_path):
    (pair,) = paired_differences(load_runs([sweep]))
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert verdict(pair, "best_acc1") == f"gain +0.50 points, 95% CI [{0.5 - half:+.2f}, {0.5 + half:+.2f}] over 3 seeds: excludes 0"

    noisy = tmp_path / "noisy"
    for seed, (base, ac) in enumerate([(90.0, 91.0), (90.0, 89.6), (90.0, 90.2)]):
        write_run(noisy, f"b{seed}", "alexnet", seed, base)
        write_run(noisy, f"a{seed}", "alexnet_ac", seed, ac)
    (pair,) = paired_differences(load_runs([noisy]))
    assert pair["best_acc1_ci_low"] < 0 < pair["best_acc1_ci_high"]
    assert verdict(pair, "best_acc1").startswith("gain +0.27 points, 95% CI [")
    assert verdict(pair, "best_acc1").endswith("over 3 seeds: includes 0: not shown to be real")


def test_single_pair_has_no_ci(tmp_path):
    write_run(tmp_path, "b", "alexnet", 0, 90.0, dataset="digits")
    write_run(tmp_path, "a", "alexnet_ac", 0, 89.5, dataset="digits")
    runs = load_runs([tmp_path])
    (pair,) = paired_differences(runs)
    assert pair["n_pairs"] == 1 and pair["best_acc1_diff_mean"] == pytest.approx(-0.5)
    assert math.isnan(pair["best_acc1_diff_std"]) and math.isnan(pair["best_acc1_ci_low"])
    assert verdict(pair, "best_acc1") == "loss -0.50 points over 1 seed (one seed: no interval): run more seeds"
    markdown = render_markdown(summarize(runs), [pair])
    assert ("| digits | alexnet_ac | alexnet | 1 | -0.50 | one seed: no interval | -0.50 | one seed: no interval |  | "
            "one seed: no interval | none |") in markdown


def test_ac_without_common_seed_or_baseline(tmp_path):
    write_run(tmp_path, "b", "alexnet_imagenet", 0, 55.0, dataset="folder")
    write_run(tmp_path, "a", "alexnet_ac_imagenet", 1, 56.0, dataset="folder")
    write_run(tmp_path, "c", "alexnet_ac", 0, 90.0)  # no baseline on cifar10: not paired at all
    (pair,) = paired_differences(load_runs([tmp_path]))
    assert (pair["model"], pair["baseline"], pair["n_pairs"]) == ("alexnet_ac_imagenet", "alexnet_imagenet", 0)
    assert pair["unpaired_ac_seeds"] == [1] and pair["unpaired_baseline_seeds"] == [0]
    assert verdict(pair, "best_acc1") == "no seed was run in both arms: nothing to compare"


def test_write_report_files(sweep, tmp_path):
    out = tmp_path / "out"
    markdown = write_report(load_runs([sweep]), out)
    assert (out / "report.md").read_text() == markdown
    assert "| cifar10 | alexnet | 3 | 90.03 ± 0.15 | 89.53 ± 0.15 |" in markdown
    assert "| cifar10 | alexnet_ac | alexnet | 3 | +0.50 ± 0.10 | [+0.25, +0.75] | +1.00 ± 0.10 |" in markdown
    assert "alexnet_ac: 7 |" in markdown
    # no validation split: best top-1 was picked on the test split, so the verdict reads the final epoch's
    assert "- cifar10, alexnet_ac vs alexnet, final top-1: gain +1.00 points" in markdown

    with open(out / "report.csv", newline="") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"alexnet", "alexnet_ac"}
    assert rows["alexnet"]["best_acc1_mean"] == "90.03"  # 270.1 / 3, 2 decimals
    assert rows["alexnet"]["n_pairs"] == "" and rows["alexnet"]["best_acc1_diff_mean"] == ""
    ac = rows["alexnet_ac"]
    assert ac["n_pairs"] == "3" and ac["paired_seeds"] == "0 1 2" and ac["unpaired_ac_seeds"] == "7"
    assert float(ac["best_acc1_diff_mean"]) == pytest.approx(0.5)
    assert float(ac["best_acc1_ci_high"]) == pytest.approx(0.5 + T975_DF2 * 0.1 / math.sqrt(3), abs=0.005)

    png = out / "val_acc1_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.width > 200 and image.height > 200


def test_cli_prints_report(sweep, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "experiment.report", str(sweep), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| dataset | model | seeds | best top-1 | final top-1 | test top-1 of best.pt |" in result.stdout
    assert result.stdout == (out / "report.md").read_text()


def test_cli_default_out_is_first_path(sweep, capsys):
    assert main([str(sweep)]) == 0
    assert (sweep / "report.md").exists() and (sweep / "report.csv").exists()
    assert "## Paired difference" in capsys.readouterr().out


def test_cli_bad_path_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiment.report", str(tmp_path / "missing")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("out", ["{tmp}/file", "{tmp}/file/report", "/proc/report"])
def test_an_out_that_cannot_be_a_folder_is_one_line(sweep, tmp_path, capsys, out):
    """An existing file was `error: [Errno 17] File exists: ...`, /proc/report a raw [Errno 2]."""
    (tmp_path / "file").write_text("mine\n")
    out = out.format(tmp=tmp_path)
    assert main([str(sweep), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} cannot be the report's folder (") and "Errno" not in err
    assert err.strip().endswith("pass --out a folder that can be made and written") and len(err.splitlines()) == 1
    assert (tmp_path / "file").read_text() == "mine\n"


def test_report_draws_the_kernel_skeleton_of_runs_with_checkpoints(trained_runs, tmp_path):
    from PIL import Image

    from experiment.report import load_runs, write_report

    markdown = write_report(load_runs([trained_runs["alexnet"], trained_runs["alexnet_ac"]]), tmp_path)
    # two real train.py runs of one recipe (the AC arm's gamma_init is part of its model choice) are paired
    assert "| digits | alexnet_ac | alexnet | 1 |" in markdown and "reported apart" not in markdown
    with Image.open(tmp_path / "kernel_skeleton_digits.png") as im:
        assert im.format == "PNG" and im.size[1] > 400  # two rows (one row is ~250 px): baseline and AC


def scalar_series(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def history_table(root, model, curve):
    """epoch -> seed -> value, straight from the metrics.json files of ``model``'s runs."""
    table = {}
    for file in Path(root).rglob("metrics.json"):
        run = json.loads(file.read_text())
        if run["model"] == model:
            for record in run["history"]:
                table.setdefault(record["epoch"], {})[run["seed"]] = record[curve]
    return table


def test_tensorboard_mean_over_seeds_equals_the_histories_mean(sweep, tmp_path):
    write_report(load_runs([sweep]), tmp_path)
    for model, n in (("alexnet", 3), ("alexnet_ac", 4)):
        for curve in ("val_acc1", "val_loss"):
            table = history_table(sweep, model, curve)
            run_dir = tmp_path / "tensorboard" / "cifar10" / f"{model} (n={n})"
            mean = scalar_series(run_dir, f"mean_over_seeds/{curve}")
            low, high = (scalar_series(run_dir, f"mean_over_seeds/{curve}_{side}") for side in ("low", "high"))
            assert sorted(mean) == [1, 2, 3]
            for epoch, by_seed in table.items():
                values = list(by_seed.values())
                assert len(values) == n
                sd = statistics.stdev(values)
                half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
                # Event files store float32.
                assert mean[epoch] == pytest.approx(statistics.mean(values), rel=1e-6)
                assert (low[epoch], high[epoch]) == pytest.approx((statistics.mean(values) - half,
                                                                   statistics.mean(values) + half), rel=1e-6)
    band = [scalar_series(tmp_path / "tensorboard/cifar10/alexnet (n=3)", f"mean_over_seeds/val_acc1_{side}")[1]
            for side in ("low", "high")]
    assert band[1] - band[0] > 0.5  # the seeds' spread shows as a band


def test_tensorboard_paired_difference_per_epoch(sweep, tmp_path):
    write_report(load_runs([sweep]), tmp_path)
    ac, base = history_table(sweep, "alexnet_ac", "val_acc1"), history_table(sweep, "alexnet", "val_acc1")
    run_dir = tmp_path / "tensorboard/cifar10/alexnet_ac minus alexnet (n=3 pairs)"
    diff, low, high = (scalar_series(run_dir, f"ac_minus_baseline/val_acc1{side}") for side in ("", "_low", "_high"))
    for epoch in (1, 2, 3):
        pairs = [ac[epoch][s] - base[epoch][s] for s in (0, 1, 2)]  # seed 7 has no baseline run
        half = T975_DF2 * statistics.stdev(pairs) / math.sqrt(3)
        assert diff[epoch] == pytest.approx(statistics.mean(pairs), rel=1e-6)
        assert (low[epoch], high[epoch]) == pytest.approx((statistics.mean(pairs) - half,
                                                           statistics.mean(pairs) + half), rel=1e-6)
    # AC finals are 0.9, 1.1, 1.0 above the baseline's: the 3-seed paired mean is +1.0 at every epoch.
    assert diff[3] == pytest.approx(1.0, rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for arm in ("alexnet (n=3)", "alexnet_ac (n=4)"):
        events = EventAccumulator(str(tmp_path / "tensorboard/cifar10" / arm))
        events.Reload()
        assert not any(tag.startswith("ac_minus_baseline") for tag in events.Tags()["scalars"])


def test_tensorboard_layout_charts_tags_that_exist(sweep, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    write_report(load_runs([sweep]), tmp_path)
    tags, layouts = set(), []
    for run_dir in sorted({path.parent for path in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
        events.Reload()
        tags |= set(events.Tags()["scalars"])
        if "custom_scalars__config__" in events.Tags()["tensors"]:  # the tag TensorBoard's plugin reads
            layouts += [layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
                        for event in events.Tensors("custom_scalars__config__")]
    assert len(layouts) == 1  # TensorBoard appends the charts of every layout it finds: one, not one per run
    charts = [chart for category in layouts[0].category for chart in category.chart]
    assert len(charts) == 4
    for chart in charts:
        series = chart.margin.series
        assert len(series) == 1
        assert {series[0].value, series[0].lower, series[0].upper} <= tags


def test_tensorboard_rerun_replaces_its_event_files(sweep, tmp_path):
    write_report(load_runs([sweep]), tmp_path)
    write_report(load_runs([sweep]), tmp_path)
    for run in ("alexnet (n=3)", "alexnet_ac (n=4)", "alexnet_ac minus alexnet (n=3 pairs)", "../verdict"):
        assert len(list((tmp_path / "tensorboard/cifar10" / run).glob("events.out.tfevents.*"))) == 1
    assert len(scalar_series(tmp_path / "tensorboard/cifar10/alexnet (n=3)", "mean_over_seeds/val_acc1")) == 3
    # one more seed: the arm's run is renamed, and the old one leaves no directory behind
    write_run(next(sweep.rglob("12-00-00")), "8_alexnet_seed7", "alexnet", 7, 90.1)
    write_report(load_runs([sweep]), tmp_path)
    assert sorted(p.name for p in (tmp_path / "tensorboard/cifar10").iterdir()) == [
        "alexnet (n=4)", "alexnet_ac (n=4)", "alexnet_ac minus alexnet (n=4 pairs)"]


def test_tensorboard_single_seed_draws_no_interval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_run(tmp_path / "sweep", "0_alexnet_seed0", "alexnet", 0, 90.0)
    write_run(tmp_path / "sweep", "1_alexnet_ac_seed0", "alexnet_ac", 0, 91.0)
    markdown = write_report(load_runs([tmp_path / "sweep"]), tmp_path / "out")
    assert "gain +1.00 points over 1 seed (one seed: no interval)" in markdown
    for run in ("alexnet (n=1)", "alexnet_ac (n=1)", "alexnet_ac minus alexnet (n=1 pairs)"):
        events = EventAccumulator(str(tmp_path / "out/tensorboard/cifar10" / run))
        events.Reload()
        tags = events.Tags()["scalars"]
        assert tags and not [tag for tag in tags if tag.endswith(("_low", "_high"))]
    assert scalar_series(tmp_path / "out/tensorboard/cifar10/alexnet (n=1)", "mean_over_seeds/val_acc1") \
        == {1: 87.5, 2: 88.5, 3: 89.5}
    assert scalar_series(tmp_path / "out/tensorboard/cifar10/alexnet_ac minus alexnet (n=1 pairs)",
                         "verdict_numbers/ac_minus_baseline_final_acc1") == {3: 1.0}


def test_verdict_reads_the_test_score_of_a_checkpoint_picked_on_a_validation_split(tmp_path):
    # best (on val) favours AC by 1 point, final by 2, test by 0.3, 0.1, 0.2: the verdict must read test
    for seed, test in enumerate((90.0, 90.2, 90.1)):
        write_run(tmp_path, f"b{seed}", "alexnet", seed, 91.0, final=89.0, test=test)
        write_run(tmp_path, f"a{seed}", "alexnet_ac", seed, 92.0, final=91.0, test=test + 0.3 - 0.1 * seed)
    runs = load_runs([tmp_path])
    (pair,) = paired_differences(runs)
    assert pair["verdict_metric"] == "test_acc1"
    assert pair["test_acc1_diff_mean"] == pytest.approx(0.2) and pair["test_acc1_diff_std"] == pytest.approx(0.1)
    assert verdict(pair) == verdict(pair, "test_acc1") and verdict(pair).startswith("gain +0.20 points, 95% CI [")
    markdown = render_markdown(summarize(runs), [pair])
    assert "- cifar10, alexnet_ac vs alexnet, test top-1 of best.pt: gain +0.20 points" in markdown
    assert "| cifar10 | alexnet | 3 | 91.00 ± 0.00 | 89.00 ± 0.00 | 90.10 ± 0.10 |" in markdown  # every metric stays in the table


def test_one_run_selected_on_test_sends_the_verdict_to_the_final_epoch(tmp_path):
    for seed in range(2):
        write_run(tmp_path, f"b{seed}", "alexnet", seed, 91.0, final=89.0, test=90.0)
        write_run(tmp_path, f"a{seed}", "alexnet_ac", seed, 92.0, final=89.5, test=None if seed else 90.5)
    (pair,) = paired_differences(load_runs([tmp_path]))
    assert pair["verdict_metric"] == "final_acc1" and verdict(pair).startswith("gain +0.50 points")


@pytest.mark.parametrize("value", [None, float("nan"), float("inf"), "99"])
def test_a_run_without_a_finite_accuracy_is_named_not_averaged(sweep, value):
    bad = next(sweep.rglob("0_alexnet_seed0")) / "metrics.json"
    metrics = json.loads(bad.read_text())
    metrics["best_acc1"] = value
    bad.write_text(json.dumps(metrics))  # json writes NaN and Infinity, as Python's json.dumps does
    with pytest.raises(ValueError, match=f"{bad} has best_acc1={value}, not a finite accuracy"):
        load_runs([sweep])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_side=100):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.width >= min_side and image.height >= min_side


def events_of(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_verdict_is_the_reports_number(tmp_path):
    # best (on val) and the per-epoch curves favour AC; test top-1 of best.pt, the verdict's metric, does not
    for seed, (base, ac) in enumerate([(90.0, 89.4), (90.4, 90.1), (89.8, 89.6)]):
        write_run(tmp_path / "sweep", f"b{seed}", "alexnet", seed, 91.0, test=base)
        write_run(tmp_path / "sweep", f"a{seed}", "alexnet_ac", seed, 93.0, test=ac)
    runs = load_runs([tmp_path / "sweep"])
    markdown = write_report(runs, tmp_path / "out")
    (pair,) = paired_differences(runs)
    diffs = [-0.6, -0.3, -0.2]
    half = T975_DF2 * statistics.stdev(diffs) / math.sqrt(3)
    mean = statistics.mean(diffs)
    line = f"test top-1 of best.pt: loss {mean:+.2f} points, 95% CI [{mean - half:+.2f}, {mean + half:+.2f}] over 3 seeds"
    assert line in markdown
    diff_run = tmp_path / "out/tensorboard/cifar10/alexnet_ac minus alexnet (n=3 pairs)"
    for side, value in (("", mean), ("_low", mean - half), ("_high", mean + half)):
        assert scalar_series(diff_run, f"verdict_numbers/ac_minus_baseline_test_acc1{side}") == {3: pytest.approx(value, rel=1e-5)}
    for model, tests in (("alexnet", [90.0, 90.4, 89.8]), ("alexnet_ac", [89.4, 90.1, 89.6])):
        arm = tmp_path / f"out/tensorboard/cifar10/{model} (n=3)"
        arm_half = T975_DF2 * statistics.stdev(tests) / math.sqrt(3)
        assert scalar_series(arm, "verdict_numbers/test_acc1") == {3: pytest.approx(statistics.mean(tests), rel=1e-6)}
        assert scalar_series(arm, "verdict_numbers/test_acc1_high") == {3: pytest.approx(statistics.mean(tests) + arm_half,
                                                                                 rel=1e-6)}
        assert not [tag for tag in events_of(arm).Tags()["scalars"] if "best_acc1" in tag]

    verdict_run = events_of(tmp_path / "out/tensorboard/verdict")
    (text,) = verdict_run.Tensors("verdict/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert shown.startswith(markdown) and line in shown  # the verdict and both tables, as markdown
    assert "| cifar10 | alexnet_ac | alexnet | 3 |" in shown and "clipped to possible values" in shown
    (tag,) = verdict_run.Tags()["images"]
    assert tag == "verdict/cifar10 alexnet_ac vs alexnet"
    (image,) = verdict_run.Images(tag)
    assert image.width >= 900 and 2 < image.width / image.height < 3


def test_verdict_figure_draws_the_reports_numbers(tmp_path):
    from experiment.figures import verdict_figures

    for seed, (base, ac) in enumerate([(90.0, 89.4), (90.4, 90.1), (89.8, 89.6)]):
        write_run(tmp_path, f"b{seed}", "alexnet", seed, 91.0, test=base)
        write_run(tmp_path, f"a{seed}", "alexnet_ac", seed, 93.0, test=ac)
    runs = load_runs([tmp_path])
    (pair,) = paired_differences(runs)
    ((name, fig),) = verdict_figures(runs, [{"dir": "/x/7_alexnet_ac_seed3", "model": "alexnet_ac", "seed": 3}]).items()
    assert name == "cifar10 alexnet_ac vs alexnet"
    # the report's verdict line, word for word
    assert fig._suptitle.get_text().replace("\n", " ") == \
        f"cifar10, alexnet_ac vs alexnet, test top-1 of best.pt: {verdict(pair)}"
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert f"{pair['test_acc1_diff_mean']:+.2f}\n95% CI\n[{pair['test_acc1_ci_low']:+.2f}, {pair['test_acc1_ci_high']:+.2f}]" in texts
    curves, diff_axes = fig.axes[:2]
    # each arm with its n and its mean of the verdict metric, as in the per-model table
    assert [line.get_label() for line in curves.lines] == ["alexnet (n=3): 90.07", "alexnet_ac (n=3): 89.70"]
    assert curves.get_legend().get_title().get_text() == "test top-1 of best.pt:"
    assert len(curves.collections) == 2  # one band per arm
    (error_bar,) = diff_axes.containers
    low, high = sorted(cap.get_ydata()[0] for cap in error_bar.lines[1])  # the interval's two caps
    assert (low, high) == pytest.approx((pair["test_acc1_ci_low"], pair["test_acc1_ci_high"]))
    footer = fig._supxlabel.get_text()
    assert "clipped to possible values" in footer and "7_alexnet_ac_seed3 (alexnet_ac seed 3)" in footer.replace("\n", " ")


def test_tensorboard_bands_are_possible_values(tmp_path):
    # three seeds near 100% with one far off: the raw t interval would reach above 100 and below 0 loss
    for seed, (acc, loss) in enumerate([(99.9, 0.01), (99.8, 0.02), (60.0, 3.0)]):
        run_dir = write_run(tmp_path / "sweep", f"r{seed}", "alexnet", seed, acc, final=acc, test=acc)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["history"] = [{"epoch": 1, "val_acc1": acc, "val_loss": loss}]
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    write_report(load_runs([tmp_path / "sweep"]), tmp_path / "out")
    arm = tmp_path / "out/tensorboard/cifar10/alexnet (n=3)"
    assert scalar_series(arm, "mean_over_seeds/val_acc1_high") == {1: 100.0}
    assert scalar_series(arm, "verdict_numbers/test_acc1_high") == {1: 100.0}
    assert scalar_series(arm, "mean_over_seeds/val_loss_low") == {1: 0.0}
    accs = [99.9, 99.8, 60.0]
    assert scalar_series(arm, "mean_over_seeds/val_acc1_low")[1] == pytest.approx(
        statistics.mean(accs) - T975_DF2 * statistics.stdev(accs) / math.sqrt(3), rel=1e-6)


def test_unfinished_runs_are_named_in_the_report_and_tensorboard(sweep, tmp_path):
    unfinished = next(sweep.rglob("12-00-00")) / "9_alexnet_ac_seed9"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 9\nmodel:\n  name: alexnet_ac\n")
    assert main([str(sweep), "--out", str(tmp_path)]) == 0
    line = f"- {unfinished} (alexnet_ac seed 9): no metrics.json (unfinished or failed)"
    assert line in (tmp_path / "report.md").read_text()
    (text,) = events_of(tmp_path / "tensorboard/verdict").Tensors("verdict/text_summary")
    assert line in text.tensor_proto.string_val[0].decode()


def write_config(run_dir, model, seed, dataset="cifar10", root="data", lr=0.1, epochs=3, width=0.25, device="cpu"):
    """A config.yaml as train.py saves it (resolved), for the recipe checks."""
    ac = baseline_of(model) is not None
    model_section = (f"  name: {model}\n  arch: {'AlexNetAC' if ac else 'AlexNet'}\n  width: {width}\n"
                     + ("  gamma_init: 1.0\n" if ac else "  bn: true\n"))
    (Path(run_dir) / "config.yaml").write_text(
        f"seed: {seed}\nresume: null\nmodel:\n{model_section}dataset:\n  name: {dataset}\n  root: {root}\n"
        f"  batch_size: 64\n  eval_batch_size: 512\noptimizer:\n  lr: {lr}\ntrainer:\n  epochs: {epochs}\n"
        f"  device: {device}\n")


def recipe_sweep(root, base_options, ac_options, seeds=(0, 1), dataset="cifar10"):
    for seed in seeds:
        # named as a sweep names its jobs: the baseline's first, so its recipe is the dataset's first group
        write_config(write_run(root, f"{seed}_alexnet_seed{seed}", "alexnet", seed, 90.0 + seed, dataset=dataset),
                     "alexnet", seed, dataset=dataset, **base_options)
        write_config(write_run(root, f"{len(seeds) + seed}_alexnet_ac_seed{seed}", "alexnet_ac", seed, 90.5 + seed,
                               dataset=dataset), "alexnet_ac", seed, dataset=dataset, **ac_options)
    return load_runs([root])


def test_arms_of_one_recipe_pair_whatever_the_device_or_data_root(tmp_path):
    runs = recipe_sweep(tmp_path, {"device": "cpu", "root": "/a"}, {"device": "cuda", "root": "/b"})
    (pair,) = paired_differences(runs)
    assert pair["n_pairs"] == 2 and {run["group"] for run in runs} == {"cifar10"}
    assert "reported apart" not in render_markdown(summarize(runs), [pair])


@pytest.mark.parametrize("base, ac, named", [
    ({"epochs": 3}, {"epochs": 5}, "trainer.epochs (3 vs 5)"),
    ({"lr": 0.1}, {"lr": 0.05}, "optimizer.lr (0.1 vs 0.05)"),
    ({"width": 0.25}, {"width": 0.5}, "model.width (0.25 vs 0.5)"),
])
def test_arms_of_different_recipes_are_reported_apart(tmp_path, base, ac, named):
    runs = recipe_sweep(tmp_path, base, ac)
    assert paired_differences(runs) == []
    markdown = write_report(runs, tmp_path / "out")
    assert "| cifar10 | alexnet | 2 |" in markdown and "| cifar10#2 | alexnet_ac | 2 |" in markdown
    assert f"- cifar10#2 is not compared with cifar10: different {named}" in markdown
    assert "## Verdict" not in markdown
    assert sorted(p.name for p in (tmp_path / "out/tensorboard").iterdir()) == ["cifar10", "cifar10#2", "verdict"]


def test_folder_runs_pair_whether_their_images_were_decoded_into_a_cache_or_streamed(tmp_path):
    recipe_sweep(tmp_path, {"root": "/data/pets"}, {"root": "/data/pets"}, dataset="folder")
    for config in tmp_path.glob("*_alexnet_ac_seed*/config.yaml"):  # one arm streamed, the other (absent keys) not
        config.write_text(config.read_text().replace(
            "  batch_size: 64\n", "  batch_size: 64\n  cache: 'off'\n  cache_dir: /scratch\n  cache_max_gb: 1.0\n"))
    (pair,) = paired_differences(load_runs([tmp_path]))
    assert pair["n_pairs"] == 2


def test_folder_datasets_pair_only_on_the_same_root(tmp_path):
    same = recipe_sweep(tmp_path / "same", {"root": "/data/pets"}, {"root": "/data/pets"}, dataset="folder")
    assert paired_differences(same)[0]["n_pairs"] == 2
    apart = recipe_sweep(tmp_path / "apart", {"root": "/data/pets"}, {"root": "/data/cars"}, dataset="folder")
    assert paired_differences(apart) == []
    assert recipe_differences(apart) == ["folder#2 is not compared with folder: different dataset.root "
                                         "(/data/pets vs /data/cars)"]


def test_folder_datasets_with_the_same_class_list_pair_wherever_they_are(tmp_path):
    root = tmp_path / "sweep"
    for name, model, folder, classes in (("b", "alexnet", "/a/pets", ["cat", "dog"]),
                                          ("a", "alexnet_ac", "/b/pets", ["cat", "dog"]),
                                          ("c", "alexnet_ac", "/c/four", ["a", "b", "c", "d"])):
        run_dir = write_run(root, name, model, 0 if name != "c" else 1, 90.0, dataset="folder")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        (run_dir / "metrics.json").write_text(json.dumps({**metrics, "classes": classes}))
        write_config(run_dir, model, 0, dataset="folder", root=folder)
    runs = load_runs([root])
    (pair,) = paired_differences(runs)
    assert pair["n_pairs"] == 1 and pair["unpaired_ac_seeds"] == []
    (line,) = recipe_differences(runs)
    assert line.startswith("folder#2 is not compared with folder: different dataset.classes")


def test_a_stored_config_is_read_as_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_20", "leaked")
    runs = recipe_sweep(tmp_path, {"lr": "${oc.env:SECRET_20}"}, {"lr": "${oc.env:SECRET_20}"})
    assert runs[0]["recipe"]["optimizer.lr"] == "${oc.env:SECRET_20}"
    assert paired_differences(runs)[0]["n_pairs"] == 2
    other = recipe_sweep(tmp_path / "x", {"lr": "${oc.env:SECRET_20}"}, {"lr": 0.1})
    assert "leaked" not in "".join(recipe_differences(other)) and "${oc.env:SECRET_20}" in recipe_differences(other)[0]


def test_runs_without_config_pair_on_epochs_only(tmp_path):
    write_run(tmp_path, "0_alexnet_seed0", "alexnet", 0, 90.0, epochs=3)
    write_run(tmp_path, "1_alexnet_ac_seed0", "alexnet_ac", 0, 91.0, epochs=5)
    runs = load_runs([tmp_path])
    assert paired_differences(runs) == []
    assert recipe_differences(runs) == ["cifar10#2 is not compared with cifar10: different unknown recipe, epochs "
                                        "(3 vs 5)"]


@pytest.mark.parametrize("key, value", [("model", "../../x"), ("dataset", "/an/absolute/path"), ("model", ".."),
                                        ("model", 5), ("dataset", ""), ("seed", [0]), ("seed", True),
                                        ("history", "x"), ("history", [{"epoch": "1"}]),
                                        ("history", [{"epoch": 1, "val_acc1": "9"}]), ("selected_on", 1)])
def test_malformed_metrics_are_one_line_and_nothing_is_written(sweep, tmp_path, key, value, capsys):
    bad = next(sweep.rglob("0_alexnet_seed0")) / "metrics.json"
    bad.write_text(json.dumps({**json.loads(bad.read_text()), key: value}))
    out = tmp_path / "deep" / "out"
    assert main([str(sweep), "--out", str(out)]) == 2  # the process exits with it: test_cli_bad_path_is_one_line_error
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad} has ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["multirun"]


@pytest.mark.parametrize("document", ["null", '"a string"', "[1, 2]", "3"])
def test_metrics_that_are_not_an_object_are_one_line(sweep, document, capsys):
    bad = next(sweep.rglob("0_alexnet_seed0")) / "metrics.json"
    bad.write_text(document)
    assert main([str(sweep)]) == 2
    assert capsys.readouterr().err == f"error: {bad} holds a JSON {type(json.loads(document)).__name__}, not the " \
                                      "object train.py writes; re-run that run or remove its directory.\n"


def test_a_config_that_is_not_a_mapping_is_one_line(sweep, capsys):
    config = next(sweep.rglob("0_alexnet_seed0")) / "config.yaml"
    config.write_text("- just\n- a list\n")
    assert main([str(sweep)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {config} is not a mapping of config values")


@pytest.mark.slow
def test_the_printed_address_opens_on_the_verdict_in_a_real_browser(sweep, tmp_path, capsys):
    """Chromium, driven over the DevTools protocol (tests/tensorboard_browser.py), opens the address the report
    prints on TensorBoard serving the report: the verdict figure is on the first screen, before any chart."""
    import tensorboard_browser as browser  # tests/ is on sys.path under pytest

    if not browser.chromium():
        pytest.skip("no chromium (Debian: apt-get install -y chromium)")
    assert main([str(sweep), "--out", str(tmp_path)]) == 0
    url = capsys.readouterr().err.rsplit("then open ", 1)[1].strip()
    assert url.startswith("http://127.0.0.1:6006/")
    with browser.tensorboard(tmp_path) as base:
        shown = browser.first_screen(url.replace("http://127.0.0.1:6006", base))
    titles = shown["titles"]
    assert "verdict/cifar10 alexnet_ac vs alexnet" in titles
    first_card = next(t for t in titles if t.startswith("verdict"))
    assert first_card == "verdict/cifar10 alexnet_ac vs alexnet"  # the figure leads, then verdict_numbers/...
    (image,) = shown["images"]
    assert "imageData" in image["src"] and image["width"] == 900 and image["top"] < 600 and image["shownWidth"] > 300
    assert "smoothing=0" in shown["url"] and "runColorGroup" in shown["url"]


def test_a_run_without_config_yaml_has_the_recipe_its_checkpoint_stores(trained_runs, tmp_path):
    import shutil

    copy = Path(shutil.copytree(trained_runs["alexnet_ac"], tmp_path / "run"))
    (copy / "config.yaml").unlink()
    (run,), (original,) = load_runs([copy]), load_runs([trained_runs["alexnet_ac"]])
    assert original["recipe"]["trainer.epochs"] == 3 and "model.width" in original["recipe"]
    assert run["recipe"] == original["recipe"]


def test_an_epoch_without_a_score_is_left_out_not_averaged(tmp_path):
    run_dir = write_run(tmp_path / "sweep", "r0", "alexnet", 0, 90.0)
    write_run(tmp_path / "sweep", "r1", "alexnet", 1, 91.0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["history"][1]["val_acc1"] = None  # epoch 2 not evaluated (or a null written by hand)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    write_report(load_runs([tmp_path / "sweep"]), tmp_path / "out")
    arm = tmp_path / "out/tensorboard/cifar10/alexnet (n=2)"
    assert scalar_series(arm, "mean_over_seeds/val_acc1") == pytest.approx({1: 88.0, 2: 89.5, 3: 90.0})
    assert sorted(scalar_series(arm, "mean_over_seeds/val_acc1_low")) == [1, 3]  # one value at epoch 2: no interval
    assert_png(tmp_path / "out/val_acc1_curves.png")
