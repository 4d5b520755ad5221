"""Figures for runs and models: confusion matrix, kernel skeleton, validation curves.

Figures are built as bare ``matplotlib.figure.Figure`` objects on an Agg canvas instead of through
pyplot: nothing switches the global backend (a user's notebook keeps its own), nothing needs a
display, and no figure is left registered in pyplot's global list, so saved figures need no close.
matplotlib and torch are imported inside the functions, so importing this module stays cheap (the
report CLI reads JSON only and never needs torch).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


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
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
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
        if not isinstance(module, torch.nn.Conv2d):
            continue
        kh, kw = module.kernel_size
        if kh != kw or kh == 1:
            continue
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
            ax.set_xticks([])
            ax.set_yticks([])
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
        ax.set_title(dataset)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation top-1 (%)")
        if not curves[dataset]:
            ax.text(0.5, 0.5, "no per-epoch history", ha="center", va="center", transform=ax.transAxes)
            continue
        for model, seeds in sorted(curves[dataset].items()):
            epochs = sorted(set().union(*seeds))
            values = [[s[e] for s in seeds if e in s] for e in epochs]
            mean = np.array([np.mean(v) for v in values])
            std = np.array([np.std(v, ddof=1) if len(v) > 1 else math.nan for v in values])
            (line,) = ax.plot(epochs, mean, label=f"{model} (n={len(seeds)})")
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
