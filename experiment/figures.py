"""The figures: a checkpoint's confusion matrix (eval.py), the kernel skeleton of a fused model (train.py's
TensorBoard, the report), and the report's validation curves and verdict figures (experiment/report.py).

They are built as bare ``matplotlib.figure.Figure`` objects on an Agg canvas instead of through pyplot: nothing
switches the global backend (a user's notebook keeps its own), nothing needs a display, and no figure is left
registered in pyplot's global list, so saved figures need no close. matplotlib and torch are imported inside
the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from experiment.report import (BANDS_NOTE, METRIC_NAMES, band_points, ci_text, mean_std, metric_value, model_order,
                               paired_differences, per_epoch, run_label, runs_by_group, value_bounds, verdict_line)
from experiment.tracking import baseline_of

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


def save_skeletons(runs: list[dict], out) -> list[Path]:
    """kernel_skeleton_<dataset>.png per dataset whose runs kept a best.pt: one row per model (lowest seed)."""
    from experiment.checkpoint import load_checkpoint
    from experiment.models import model_from_checkpoint
    from nets import fuse_model

    written = []
    for dataset, models in runs_by_group(runs).items():
        skeletons = {}
        for model in sorted(models, key=model_order):
            best = [Path(run["dir"], "checkpoints/best.pt") for _, run in sorted(models[model].items())]
            path = next((p for p in best if p.is_file()), None)
            if path:
                fused = fuse_model(model_from_checkpoint(load_checkpoint(path), path))
                skeletons[f"{model} (fused)" if baseline_of(model) else model] = kernel_skeleton(fused)
        if any(skeletons.values()):  # none for networks without square KxK convs (K > 1)
            written.append(save_kernel_skeleton(skeletons, Path(out) / f"kernel_skeleton_{dataset}.png"))
    return written


def pixels(fig: Figure) -> np.ndarray:
    """The figure drawn as an (H, W, 3) uint8 array for ``add_image``."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def verdict_figures(runs: list[dict], unfinished=()) -> dict[str, Figure]:
    """``"<group> <ac> vs <baseline>"`` -> `verdict_figure`, for every AC model with a baseline in its group."""
    groups, figures = runs_by_group(runs), {}
    for pair in paired_differences(runs):
        models = groups[pair["dataset"]]
        not_counted = [u for u in unfinished if u.get("model") in (pair["model"], pair["baseline"])]
        figures[f"{pair['dataset']} {pair['model']} vs {pair['baseline']}"] = verdict_figure(
            pair, models[pair["baseline"]], models[pair["model"]], not_counted)
    return figures


def verdict_figure(pair: dict, baseline_runs: dict, ac_runs: dict, unfinished=()) -> Figure:
    """The report's verdict for one AC model, drawn: each arm's validation top-1 per epoch (mean over seeds and
    its 95% band; the legend gives n and the arm's mean of the verdict metric) and the paired difference AC −
    baseline in the verdict metric (each pair, and the mean with the 95% CI of report.md), titled with the
    verdict. Bands are clipped to possible values; one seed gets none ("one seed: no interval").

    Wide, short and in large type: TensorBoard's Time Series shows an image card about 450 pixels wide, and the
    figure must read there."""
    import textwrap

    from matplotlib.ticker import MaxNLocator

    metric = pair["verdict_metric"]
    fig = _new_figure(figsize=(12.0, 5.4), dpi=75, layout="constrained")
    curves, diff_axes = fig.subplots(1, 2, width_ratios=[1.6, 1.0])
    for ax in (curves, diff_axes):
        ax.tick_params(labelsize=15)
    for model, seeds, colour in ((pair["baseline"], baseline_runs, "tab:blue"), (pair["model"], ac_runs, "tab:orange")):
        table = per_epoch(seeds, "val_acc1")
        bands = band_points([(e, list(table[e].values())) for e in sorted(table)], value_bounds("val_acc1"))
        arm_mean = mean_std([metric_value(r, metric) for r in seeds.values()])[0]
        label = f"{model} (n={len(seeds)}): {arm_mean:.2f}" + ("" if len(seeds) > 1 else ", one seed: no interval")
        if bands[""]:
            curves.plot(*zip(*bands[""]), color=colour, linewidth=2.5, label=label)
        if bands["_low"]:
            (epochs, low), (_, high) = zip(*bands["_low"]), zip(*bands["_high"])
            curves.fill_between(epochs, low, high, color=colour, alpha=0.25, linewidth=0)
    curves.set_title("validation top-1 per epoch, 95% band", fontsize=17)
    curves.set_xlabel("epoch", fontsize=16)
    curves.set_ylabel("top-1 (%)", fontsize=16)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.legend(title=f"{METRIC_NAMES[metric]}:", fontsize=15, title_fontsize=15, loc="lower right")

    n, mean = pair["n_pairs"], pair[f"{metric}_diff_mean"]
    diffs = [metric_value(ac_runs[s], metric) - metric_value(baseline_runs[s], metric) for s in pair["paired_seeds"]]
    diff_axes.axhline(0.0, color="grey", linewidth=1.5)
    if n:
        diff_axes.scatter([0] * n, diffs, color="black", alpha=0.5, s=60)
        if n > 1:
            low, high = pair[f"{metric}_ci_low"], pair[f"{metric}_ci_high"]
            diff_axes.errorbar([0], [mean], yerr=[[mean - low], [high - mean]], fmt="_", color="black",
                               markersize=40, capsize=14, linewidth=3)
        else:
            diff_axes.plot([0], [mean], "_", color="black", markersize=40)
        label = f"{mean:+.2f}\n" + (f"95% CI\n{ci_text(pair, metric)}" if n > 1 else "one seed:\nno interval")
        diff_axes.annotate(label, (0, mean), xytext=(28, 0), textcoords="offset points", va="center", fontsize=17)
    diff_axes.set_xticks([0], [f"n={n} pairs"], fontsize=15)
    diff_axes.set_title("AC − baseline, paired", fontsize=17)
    diff_axes.set_ylabel("points", fontsize=16)
    diff_axes.set_xlim(-0.5, 1.6)

    notes = [BANDS_NOTE]
    if unfinished:
        notes.append("Not counted, no metrics.json (unfinished): "
                     + ", ".join(Path(u["dir"]).name + run_label(u) for u in unfinished))
    fig.suptitle(textwrap.fill(verdict_line(pair), 80), fontsize=18, fontweight="bold")
    fig.supxlabel("\n".join(textwrap.fill(note, 130) for note in notes), fontsize=11)
    return fig


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
    groups = runs_by_group(runs)
    datasets = sorted(groups)

    fig = _new_figure(figsize=(5.0 * max(len(datasets), 1), 3.8), layout="constrained")
    axes = fig.subplots(1, max(len(datasets), 1), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        ax.set(title=dataset, xlabel="epoch", ylabel="validation top-1 (%)")
        tables = {model: per_epoch(seeds, "val_acc1") for model, seeds in sorted(groups[dataset].items())}
        tables = {model: table for model, table in tables.items() if table}  # epoch -> seed -> val_acc1
        if not tables:
            ax.text(0.5, 0.5, "no per-epoch history", ha="center", va="center", transform=ax.transAxes)
            continue
        for model, table in tables.items():
            epochs = sorted(table)
            mean, std, _ = np.array([mean_std(list(table[e].values())) for e in epochs]).T
            seeds = set().union(*table.values())  # those with a history
            (line,) = ax.plot(epochs, mean, label=f"{model} (n={len(seeds)})")
            ax.fill_between(epochs, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100), color=line.get_color(),
                            alpha=0.2, linewidth=0)  # clipped to possible accuracies
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
