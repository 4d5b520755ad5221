"""Compare baseline and AC runs over seeds: per-model summary and paired AC − baseline difference.

    python -m experiment.report PATH [PATH ...] [--out DIR]

PATH is a run directory or a sweep directory (searched recursively for metrics.json). Writes
report.md, report.csv and val_acc1_curves.png into DIR (default: the first PATH) and prints the
Markdown; DIR/tensorboard/<dataset>/<model>/ gets TensorBoard runs with the mean over seeds per epoch and
the paired AC − baseline difference, each with its 95% band (see `write_tensorboard`). Where runs kept
checkpoints/best.pt, it also draws kernel_skeleton_<dataset>.png: the kernel skeleton of each model after
fusion (of its lowest seed), baseline and AC side by side.

The figures (confusion matrix, kernel skeleton, validation curves) are built as bare
``matplotlib.figure.Figure`` objects on an Agg canvas instead of through pyplot: nothing switches the global
backend (a user's notebook keeps its own), nothing needs a display, and no figure is left registered in
pyplot's global list, so saved figures need no close. matplotlib and torch are imported inside the functions,
so importing this module stays cheap (the report reads JSON only and never needs torch).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from experiment.errors import UserError

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


log = logging.getLogger(__name__)

METRICS = ("best_acc1", "final_acc1", "test_acc1")
REQUIRED_KEYS = ("model", "dataset", "seed", "best_acc1", "final_acc1")  # runs older than test_acc1 still load
METRIC_NAMES = {"best_acc1": "best top-1", "final_acc1": "final top-1", "test_acc1": "test top-1 of best.pt"}
# A directory holding one of these but no metrics.json is a run that has not finished (yet).
RUN_DIR_MARKERS = ("checkpoints", "config.yaml")


def baseline_of(model: str) -> str | None:
    """Baseline name of an AC model ('alexnet_ac_imagenet' -> 'alexnet_imagenet', 'resnet18_ac' -> 'resnet18');
    None for others."""
    head, marker, tail = model.partition("_ac")
    return head + tail if head and marker and tail[:1] in ("", "_") else None


def _model_order(model: str) -> tuple[str, bool]:
    # Each baseline directly followed by its AC model.
    return (baseline_of(model) or model, baseline_of(model) is not None)


def _metrics_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.name != "metrics.json":
            raise ValueError(f"{path} is a file; pass a run directory, a sweep directory or a metrics.json file.")
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        if "metrics.json" in filenames:
            found.append(Path(dirpath, "metrics.json"))
        elif any(marker in dirnames or marker in filenames for marker in RUN_DIR_MARKERS):
            log.warning("skipping %s: no metrics.json yet (run unfinished or failed)", dirpath)
    return found


def load_runs(paths) -> list[dict]:
    """Every metrics.json under ``paths`` as a dict, plus ``"dir"``, the run directory."""
    runs, seen_files, owner = [], set(), {}
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path} does not exist; pass a run directory holding metrics.json or a sweep directory above such runs.")
        files = _metrics_files(path)
        if not files:
            raise ValueError(f"no metrics.json found under {path}; pass a finished run directory or a sweep directory that holds finished runs.")
        for file in files:
            if file.resolve() in seen_files:  # a run dir given again inside a sweep dir given too
                continue
            seen_files.add(file.resolve())
            try:
                run = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON ({e}); re-run that run or remove its directory.") from None
            missing = [key for key in REQUIRED_KEYS if key not in run]
            if missing:
                raise ValueError(f"{file} lacks {', '.join(missing)}; pass only run directories written by train.py.")
            # A null, NaN or infinite accuracy (an edited or foreign file) would turn means, intervals and the
            # verdict into blanks and "+nan": refuse it. Only test_acc1 may be absent (older runs).
            for key in METRICS:
                value = run.get(key, 0.0)  # absent: test_acc1 of an older run
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{file} has {key}={value}, not a finite accuracy; re-run that run or remove "
                                     "its directory.")
            run["dir"] = str(file.parent)
            key = (run["dataset"], run["model"], run["seed"])
            if key in owner:
                raise ValueError(f"{owner[key]} and {run['dir']} are both {key[1]} seed {key[2]} on {key[0]}; "
                                 "pass only one of them so that seeds pair unambiguously.")
            owner[key] = run["dir"]
            runs.append(run)
    return runs


def _mean_std(values) -> tuple[float, float, float]:
    """Mean, sample std (ddof=1) and half the width of the 95% Student-t confidence interval of the mean; the
    std and the interval of fewer than two values are undefined, so NaN."""
    values = np.asarray(values, dtype=float)
    n = values.size
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    std = float(values.std(ddof=1))
    return mean, std, stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)


def _by_group(runs) -> dict[str, dict[str, dict[int, dict]]]:
    """dataset -> model -> seed -> run."""
    groups = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        groups[run["dataset"]][run["model"]][run["seed"]] = run
    return groups


def _value(run: dict, metric: str) -> float:
    value = run.get(metric)
    return math.nan if value is None else value


def unselected_metric(runs) -> str:
    """The metric a verdict may be read on: one that was not used to pick the checkpoint it scores. With a
    validation split (`selected_on: val` in every run) that is the test top-1 of best.pt; without one, best.pt
    was picked on the test split itself, so only the final epoch's test top-1 is unbiased."""
    return "test_acc1" if runs and all(r.get("selected_on") == "val" for r in runs) else "final_acc1"


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (dataset, model): seeds, mean and sample std of best and final top-1."""
    rows = []
    for dataset, models in sorted(_by_group(runs).items()):
        for model in sorted(models, key=_model_order):
            seeds = models[model]
            row = {"dataset": dataset, "model": model, "n_seeds": len(seeds), "seeds": sorted(seeds)}
            for metric in METRICS:
                row[f"{metric}_mean"], row[f"{metric}_std"], _ = _mean_std([_value(r, metric) for r in seeds.values()])
            rows.append(row)
    return rows


def paired_differences(runs: list[dict]) -> list[dict]:
    """Per dataset and AC model whose baseline was run too: AC − baseline over the seeds both arms have.

    For each metric: mean and sample std of the per-seed differences and the 95% Student-t confidence
    interval of the mean (NaN with fewer than two pairs). Seeds run in one arm only are listed, not paired.
    """
    rows = []
    for dataset, models in sorted(_by_group(runs).items()):
        for model in sorted(models, key=_model_order):
            baseline = baseline_of(model)
            if baseline not in models:
                continue
            ac_runs, base_runs = models[model], models[baseline]
            paired = sorted(ac_runs.keys() & base_runs.keys())
            n = len(paired)
            row = {"dataset": dataset, "model": model, "baseline": baseline, "n_pairs": n, "paired_seeds": paired,
                   "unpaired_ac_seeds": sorted(ac_runs.keys() - base_runs.keys()),
                   "unpaired_baseline_seeds": sorted(base_runs.keys() - ac_runs.keys()),
                   "verdict_metric": unselected_metric([*ac_runs.values(), *base_runs.values()])}
            for metric in METRICS:
                mean, sd, half = _mean_std([_value(ac_runs[s], metric) - _value(base_runs[s], metric) for s in paired])
                row.update({f"{metric}_diff_mean": mean, f"{metric}_diff_std": sd,
                            f"{metric}_ci_low": mean - half, f"{metric}_ci_high": mean + half})
            rows.append(row)
    return rows


def verdict(pair: dict, metric: str | None = None) -> str:
    """One line saying whether the paired difference in ``metric`` (default: the pair's unselected metric,
    see `unselected_metric`) is shown to be non-zero."""
    metric = metric or pair["verdict_metric"]
    n, mean = pair["n_pairs"], pair[f"{metric}_diff_mean"]
    if n == 0:
        return "no seed was run in both arms: nothing to compare"
    change = f"{'gain' if mean >= 0 else 'loss'} {mean:+.2f} points"
    if n == 1:
        return f"{change} over 1 seed: no confidence interval from one pair, run more seeds"
    low, high = pair[f"{metric}_ci_low"], pair[f"{metric}_ci_high"]
    return (f"{change}, 95% CI [{low:+.2f}, {high:+.2f}] over {n} seeds: "
            + ("excludes 0" if low > 0 or high < 0 else "includes 0: not shown to be real"))


def _fmt(value: float, signed: bool = False) -> str:
    return "" if math.isnan(value) else f"{value:+.2f}" if signed else f"{value:.2f}"


def _mean_pm_std(mean: float, std: float, signed: bool = False) -> str:
    return _fmt(mean, signed) + ("" if math.isnan(std) else f" ± {std:.2f}")


def _ci(pair: dict, metric: str) -> str:
    low, high = pair[f"{metric}_ci_low"], pair[f"{metric}_ci_high"]
    return "n/a" if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"


def _seeds(seeds) -> str:
    return " ".join(map(str, seeds))


def render_markdown(summary: list[dict], pairs: list[dict]) -> str:
    """The report: per-model table, paired-difference table, one verdict line per AC model and dataset."""
    names = [METRIC_NAMES[m] for m in METRICS]
    lines = ["# AlexNet vs AlexNet-AC", "",
             "## Per-model summary", "",
             "Top-1 accuracy (%), mean ± sample std over seeds. Best and final top-1 are measured on the split "
             "that scored each epoch (the validation split where runs hold one out, else the test split); test "
             "top-1 of best.pt is measured on the test split.", "",
             f"| dataset | model | seeds | {' | '.join(names)} |",
             "|---|---|---:|" + "---:|" * len(METRICS)]
    for row in summary:
        lines.append(f"| {row['dataset']} | {row['model']} | {row['n_seeds']} | "
                     + " | ".join(_mean_pm_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS) + " |")
    lines += ["", "## Paired difference, AC − baseline", ""]
    if not pairs:
        lines.append("No AC model has baseline runs on the same dataset: nothing to pair.")
        return "\n".join(lines) + "\n"
    lines += ["Percentage points, per seed run in both arms: mean ± sample std of the differences, "
              "95% Student-t confidence interval of the mean.", "",
              "| dataset | AC model | baseline | pairs | " + " | ".join(f"Δ {n} | 95% CI" for n in names)
              + " | unpaired seeds |",
              "|---|---|---|---:|" + "---:|---:|" * len(METRICS) + "---|"]
    for p in pairs:
        unpaired = "; ".join(f"{name}: {_seeds(seeds)}" for name, seeds in
                             ((p["model"], p["unpaired_ac_seeds"]), (p["baseline"], p["unpaired_baseline_seeds"]))
                             if seeds) or "none"
        lines.append(f"| {p['dataset']} | {p['model']} | {p['baseline']} | {p['n_pairs']} | "
                     + " | ".join(f"{_mean_pm_std(p[f'{m}_diff_mean'], p[f'{m}_diff_std'], signed=True)} | "
                                  f"{_ci(p, m)}" for m in METRICS) + f" | {unpaired} |")
    lines += ["", "## Verdict", "",
              "Read on a number that was not selected on the data it is scored on: the test top-1 of best.pt "
              "when best.pt was picked on a validation split (dataset.val_split > 0), else the final epoch's "
              "top-1 (best.pt was then picked on the test split itself, which flatters both arms).", ""]
    lines += [f"- {p['dataset']}, {p['model']} vs {p['baseline']}, {METRIC_NAMES[p['verdict_metric']]}: {verdict(p)}"
              for p in pairs]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["dataset", "model", "n_seeds", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
               "baseline", "n_pairs", "paired_seeds", "unpaired_ac_seeds", "unpaired_baseline_seeds", "verdict_metric",
               *(f"{m}_{s}" for m in METRICS for s in ("diff_mean", "diff_std", "ci_low", "ci_high"))]


def write_csv(summary: list[dict], pairs: list[dict], path) -> Path:
    """One row per (dataset, model); AC rows also carry the paired columns. 2 decimals, NaN blank."""
    by_key = {(p["dataset"], p["model"]): p for p in pairs}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        for row in summary:
            merged = {**row, **by_key.get((row["dataset"], row["model"]), {})}
            writer.writerow({key: _seeds(value) if isinstance(value, list) else _fmt(value) if isinstance(value, float)
                             else value for key, value in merged.items()})
    return Path(path)


def write_report(runs: list[dict], out) -> str:
    """Write report.md, report.csv, val_acc1_curves.png and the TensorBoard runs into ``out``; return the Markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, pairs = summarize(runs), paired_differences(runs)
    markdown = render_markdown(summary, pairs)
    (out / "report.md").write_text(markdown)
    write_csv(summary, pairs, out / "report.csv")
    save_curves(runs, out / "val_acc1_curves.png")
    save_skeletons(runs, out)
    write_tensorboard(runs, out)
    return markdown


def save_skeletons(runs: list[dict], out) -> list[Path]:
    """kernel_skeleton_<dataset>.png per dataset whose runs kept a best.pt: one row per model (lowest seed)."""
    from experiment.checkpoint import load_checkpoint
    from experiment.models import model_from_checkpoint
    from nets import fuse_model

    written = []
    for dataset, models in _by_group(runs).items():
        skeletons = {}
        for model in sorted(models, key=_model_order):
            with_ckpt = [r for _, r in sorted(models[model].items()) if (Path(r["dir"]) / "checkpoints/best.pt").is_file()]
            if with_ckpt:
                path = Path(with_ckpt[0]["dir"]) / "checkpoints/best.pt"
                fused = fuse_model(model_from_checkpoint(load_checkpoint(path), path))
                skeletons[f"{model} (fused)" if baseline_of(model) else model] = kernel_skeleton(fused)
        if any(skeletons.values()):  # none for networks without square KxK convs (K > 1)
            written.append(save_kernel_skeleton(skeletons, Path(out) / f"kernel_skeleton_{dataset}.png"))
    return written


TENSORBOARD_DIR = "tensorboard"
# Per-epoch series of the runs' histories that the sweep's TensorBoard runs average over seeds.
CURVES = ("val_acc1", "val_loss")
MEAN_GROUP, DIFF_GROUP = "mean_over_seeds", "ac_minus_baseline"


def _mean_band(values) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval (low, high); with one value the band has no width."""
    mean, _, half = _mean_std(values)
    half = half if len(values) > 1 else 0.0
    return mean, mean - half, mean + half


def _per_epoch(runs, curve) -> dict[int, dict[int, float]]:
    """epoch -> seed -> value of ``curve`` in the runs' metrics.json histories (``runs``: seed -> run)."""
    table = defaultdict(dict)
    for seed, run in runs.items():
        for record in run.get("history", []):
            if record.get(curve) is not None:
                table[record["epoch"]][seed] = record[curve]
    return table


def sweep_series(runs: list[dict]) -> dict[tuple[str, str], dict[str, list[tuple[int, float, float, float]]]]:
    """(dataset, model) -> tag -> [(epoch, mean, low, high)]: per epoch the mean over seeds of each of
    `CURVES` (tag ``mean_over_seeds/<curve>``) and, for an AC model whose baseline ran, the paired
    difference AC − baseline over the seeds both have at that epoch (tag ``ac_minus_baseline/<curve>``)."""
    series = {}
    for dataset, models in sorted(_by_group(runs).items()):
        for model in sorted(models, key=_model_order):
            tags = {}
            for curve in CURVES:
                own = _per_epoch(models[model], curve)
                tags[f"{MEAN_GROUP}/{curve}"] = [(e, *_mean_band(list(own[e].values()))) for e in sorted(own)]
                if baseline_of(model) in models:
                    base = _per_epoch(models[baseline_of(model)], curve)
                    diffs = {e: [own[e][s] - base[e][s] for s in sorted(own[e].keys() & base[e].keys())]
                             for e in sorted(own.keys() & base.keys())}
                    tags[f"{DIFF_GROUP}/{curve}"] = [(e, *_mean_band(d)) for e, d in diffs.items() if d]
            series[(dataset, model)] = {tag: points for tag, points in tags.items() if points}
    return series


def tensorboard_layout() -> dict:
    """Custom-scalars layout: one margin chart (mean and 95% band) per tag of `sweep_series`; each
    (dataset, model) of the sweep is one TensorBoard run, so the arms share a chart."""
    return {"AC vs baseline: mean over seeds, 95% t band": {
        f"{group}/{curve}": ["Margin", [f"{group}/{curve}", f"{group}/{curve}_low", f"{group}/{curve}_high"]]
        for group in (MEAN_GROUP, DIFF_GROUP) for curve in CURVES}}


def write_tensorboard(runs: list[dict], out) -> Path:
    """TensorBoard runs ``out/tensorboard/<dataset>/<model>`` with `sweep_series` and, in the first of them,
    `tensorboard_layout`; event files of an earlier report there are replaced. Returns out/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter

    root = Path(out) / TENSORBOARD_DIR
    for old in root.glob("*/*/events.out.tfevents.*"):
        old.unlink()
    for index, ((dataset, model), tags) in enumerate(sweep_series(runs).items()):
        with SummaryWriter(log_dir=str(root / dataset / model)) as writer:
            if index == 0:
                writer.add_custom_scalars(tensorboard_layout())
            for tag, points in tags.items():
                for epoch, *values in points:  # mean, low, high
                    for suffix, value in zip(("", "_low", "_high"), values):
                        writer.add_scalar(tag + suffix, value, epoch)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiment.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run directories or sweep directories")
    parser.add_argument("--out", help="directory for report.md, report.csv and the curves (default: the first PATH)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="note: %(message)s", level=logging.WARNING)
    try:
        runs = load_runs(args.paths)
        first = Path(args.paths[0])
        out = Path(args.out) if args.out else first if first.is_dir() else first.parent
        markdown = write_report(runs, out)
    except (ValueError, OSError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"note: wrote report.md, report.csv, val_acc1_curves.png, any kernel_skeleton_*.png and the "
          f"mean-over-seeds TensorBoard runs ({TENSORBOARD_DIR}/) to {out}; view: tensorboard --logdir {out}",
          file=sys.stderr)
    return 0


def _new_figure(**kwargs) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    from experiment.checkpoint import atomic_write

    path = Path(path)
    return atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120,
                                                    bbox_inches="tight"), what="figure")


def save_confusion_matrix(matrix, class_names, path) -> Path:
    """Heat map of a (C, C) count matrix (rows = true class, columns = predicted) as a PNG.

    Colour is the row-normalised fraction, so rare classes are as readable as common ones; the raw
    counts are written in the cells when C <= 20 (beyond that they would not fit).
    """
    counts = matrix.detach().cpu().numpy() if hasattr(matrix, "detach") else np.asarray(matrix)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {counts.shape}, expected ({n}, {n}) for {n} class names")
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)

    side = max(4.0, 0.45 * n + 2.0)
    fig = _new_figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set(xlabel="predicted class", ylabel="true class")
    if n <= 20:
        for i, j in np.ndindex(n, n):
            ax.text(j, i, f"{counts[i, j]:g}", ha="center", va="center", fontsize=8,
                    color="white" if fractions[i, j] > 0.5 else "black")
    return _save(fig, path)


def kernel_skeleton(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Mean |weight| at each KxK kernel position of every square Conv2d with K > 1, max scaled to 1.

    Meant for a deploy (fused) model, where each ACB is one plain KxK conv: on a training-form ACB
    only its square branch would be seen. The model is only read, never modified.
    """
    import torch

    skeletons = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] == module.kernel_size[1] != 1:
            magnitude = module.weight.detach().abs().mean(dim=(0, 1)).float().cpu()
            peak = magnitude.max()
            # An all-zero layer stays all zero rather than turning into NaN.
            skeletons.append((name, magnitude / peak if peak > 0 else magnitude))
    return skeletons


def _spread(layers: list, count: int) -> list:
    """`count` layers evenly spread from the first to the last (all of them when there are no more)."""
    if len(layers) <= count:
        return layers
    return [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]


def kernel_skeleton_figure(skeletons: dict[str, list[tuple[str, torch.Tensor]]], max_layers: int = 16,
                           layers_per_row: int | None = None) -> Figure:
    """One row per model label, one heat map per layer, one colour scale 0..1 for all of them.

    A deep network (DenseNet-121 has 58 3x3 convs) shows `max_layers` of its layers, evenly spread.
    With ``layers_per_row`` each model's layers wrap onto rows of that many, at a larger type size: a
    compact figure whose labels stay readable when TensorBoard shrinks it to its card width.

    The returned Figure can be saved or passed to TensorBoard's ``SummaryWriter.add_figure``.
    """
    skeletons = {label: _spread(layers, max_layers) for label, layers in skeletons.items()}
    layers = max((len(layers) for layers in skeletons.values()), default=0)
    if not skeletons or layers == 0:
        raise ValueError("no kernel skeletons to draw: pass at least one model with a square KxK conv (K > 1)")
    cols = min(layers, layers_per_row or layers)
    rows_per_model = math.ceil(layers / cols)
    rows = len(skeletons) * rows_per_model
    font = 8 if layers_per_row is None else 11
    fig = _new_figure(figsize=(1.8 * cols + 1.2, 1.9 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for index, (label, model_layers) in enumerate(skeletons.items()):
        model_axes = axes[index * rows_per_model:(index + 1) * rows_per_model].flat
        for ax, (layer, skeleton) in zip(model_axes, model_layers):
            image = ax.imshow(np.asarray(skeleton), cmap="magma", vmin=0.0, vmax=1.0)
            ax.set_title(layer, fontsize=font)
            ax.set_axis_on()
            ax.set(xticks=[], yticks=[])
        axes[index * rows_per_model, 0].set_ylabel(label, fontsize=font + 1)
    colorbar = fig.colorbar(image, ax=axes, shrink=0.8)
    colorbar.ax.tick_params(labelsize=font)
    colorbar.set_label("mean |w|, layer max = 1", fontsize=font)
    return fig


def save_kernel_skeleton(skeletons: dict[str, list[tuple[str, torch.Tensor]]], path) -> Path:
    """Write ``kernel_skeleton_figure(skeletons)`` as a PNG and return the path."""
    return _save(kernel_skeleton_figure(skeletons), path)


def save_curves(runs: list[dict], path) -> Path:
    """Validation top-1 per epoch: mean line and ±1 std band per (dataset, model), one panel per dataset.

    ``runs`` are metrics.json dicts. Epochs are aligned by number, so a run with fewer epochs only
    contributes where it has data; the band needs two runs (sample std) and is absent otherwise.
    """
    curves = defaultdict(lambda: defaultdict(list))  # dataset -> model -> [{epoch: val_acc1}]
    for run in runs:
        points = {h["epoch"]: h["val_acc1"] for h in run.get("history", []) if "val_acc1" in h}
        if points:
            curves[run["dataset"]][run["model"]].append(points)
    datasets = sorted({run["dataset"] for run in runs})

    fig = _new_figure(figsize=(5.0 * max(len(datasets), 1), 3.8), layout="constrained")
    axes = fig.subplots(1, max(len(datasets), 1), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        ax.set(title=dataset, xlabel="epoch", ylabel="validation top-1 (%)")
        if not curves[dataset]:
            ax.text(0.5, 0.5, "no per-epoch history", ha="center", va="center", transform=ax.transAxes)
            continue
        for model, seeds in sorted(curves[dataset].items()):
            epochs = sorted(set().union(*seeds))
            values = [[s[e] for s in seeds if e in s] for e in epochs]
            mean, std, _ = np.array([_mean_std(v) for v in values]).T
            (line,) = ax.plot(epochs, mean, label=f"{model} (n={len(seeds)})")
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
