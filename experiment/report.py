"""Compare baseline and AC runs over seeds: per-model summary and paired AC − baseline difference.

    python -m experiment.report PATH [PATH ...] [--out DIR]

PATH is a run directory or a sweep directory (searched recursively for metrics.json). Runs are compared only
within one recipe (every config value but the model choice and the seed, see `recipe`); others are reported
apart, with the keys that differ, and unfinished runs are named. Writes report.md, report.csv and
val_acc1_curves.png into DIR (default: the first PATH) and prints the Markdown; DIR/tensorboard/ gets the
report in TensorBoard (see `write_tensorboard`): its text, a verdict figure per AC model, and per arm the mean
over seeds with its 95% band. Where runs kept checkpoints/best.pt, it also draws kernel_skeleton_<dataset>.png:
the kernel skeleton of each model after fusion (of its lowest seed), baseline and AC side by side.

The figures are drawn by experiment/figures.py; this module is the statistics and the command line.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from experiment.errors import UserError
from experiment.tracking import VERDICT_GROUP, VERDICT_NUMBERS_GROUP, baseline_of, tensorboard_url

log = logging.getLogger(__name__)

METRICS = ("best_acc1", "final_acc1", "test_acc1")
REQUIRED_KEYS = ("model", "dataset", "seed", "best_acc1", "final_acc1")  # runs older than test_acc1 still load
METRIC_NAMES = {"best_acc1": "best top-1", "final_acc1": "final top-1", "test_acc1": "test top-1 of best.pt"}
# Per-epoch series of the runs' histories that the sweep's TensorBoard runs average over seeds.
CURVES = ("val_acc1", "val_loss")
# A directory holding one of these but no metrics.json is a run that has not finished (yet).
RUN_DIR_MARKERS = ("checkpoints", "config.yaml")


def model_order(model: str) -> tuple[str, bool]:
    # Each baseline directly followed by its AC model.
    return (baseline_of(model) or model, baseline_of(model) is not None)


def _walk(path: Path) -> tuple[list[Path], list[Path]]:
    """The metrics.json files below ``path`` and the run directories there that have none yet (unfinished)."""
    if path.is_file():
        if path.name != "metrics.json":
            raise ValueError(f"{path} is a file; pass a run directory, a sweep directory or a metrics.json file.")
        return [path], []
    found, unfinished = [], []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        if "metrics.json" in filenames:
            found.append(Path(dirpath, "metrics.json"))
        elif any(marker in dirnames or marker in filenames for marker in RUN_DIR_MARKERS):
            unfinished.append(Path(dirpath))
    return found, unfinished


def unfinished_runs(paths) -> list[dict]:
    """Run directories below ``paths`` without a metrics.json (unfinished or failed): ``dir`` and, where its
    config.yaml says, ``model`` and ``seed``, so that a report can name what it did not count."""
    found = []
    for path in map(Path, paths):
        for run_dir in _walk(path)[1] if path.is_dir() else []:
            try:
                config = _read_config(run_dir / "config.yaml") or {}
            except ValueError:
                config = {}
            model = config.get("model")
            found.append({"dir": str(run_dir), "model": model.get("name") if isinstance(model, dict) else None,
                          "seed": config.get("seed")})
    return found


def _read_config(path: Path) -> dict | None:
    """A run's config.yaml as plain data (None when there is none). Read with yaml.safe_load, never through
    OmegaConf: an interpolation in a stored config is text here, not code that runs."""
    import yaml

    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path} is not readable YAML ({str(e).splitlines()[0]}); re-run that run or remove "
                         "its directory.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a mapping of config values; re-run that run or remove its directory.")
    return config


def _stored_config(run_dir: Path) -> dict | None:
    """The config stored in a run's checkpoints/last.pt (else best.pt), as plain containers; None when there
    is none or it cannot be read (that run's recipe is then unknown)."""
    from experiment.checkpoint import load_checkpoint

    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            try:
                return load_checkpoint(path)["config"]
            except UserError as e:
                log.warning("%s has no config.yaml and its checkpoint cannot be read (%s): its recipe is unknown",
                            run_dir, e)
                return None
    return None


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# What a config holds beside its recipe: the arm (which network, with the options only that arm has), the seed,
# and where and how the run ran, which does not change what it learns. Everything else must match for two runs
# to be compared.
ARM_KEYS = ("model.name", "model.arch", "model.bn", "model.ac", "model.gamma_init")
NOT_RECIPE = ("seed", "resume", "trainer.device", "trainer.progress", "trainer.log_every", "trainer.save_every",
              "trainer.compile", "trainer.compile_mode", "trainer.channels_last", "dataset.download",
              "dataset.num_workers", "dataset.verify_images", "dataset.eval_batch_size", "dataset.cache",
              "dataset.cache_dir", "dataset.cache_max_gb")  # decoded and streamed folders serve the same views


def recipe(run_dir: Path, run: dict) -> dict | None:
    """The recipe of a run: its config.yaml flattened (``"optimizer.lr": 0.1``), less `ARM_KEYS` and
    `NOT_RECIPE`; None without a config.yaml. A downloaded dataset is its name, wherever its root is; a folder
    dataset is its class list when metrics.json names one, else its root. Without a config.yaml, the config
    its checkpoint stores is read instead."""
    config = _read_config(run_dir / "config.yaml")
    if config is None:
        config = _stored_config(run_dir)
    if config is None:
        return None
    flat = {k: v for k, v in _flatten(config).items() if k not in ARM_KEYS and k not in NOT_RECIPE}
    if flat.get("dataset.name") != "folder":
        flat.pop("dataset.root", None)
    elif isinstance(run.get("classes"), list):
        flat.pop("dataset.root", None)
        flat["dataset.classes"] = run["classes"]
    return flat


# Names from metrics.json end up in table cells and directory names: letters, digits and _ . + - only.
NAME = re.compile(r"[A-Za-z0-9_.+-]{1,100}")


def _check_run(file: Path, run) -> None:
    """One line for a metrics.json that is valid JSON but not what train.py writes."""
    fix = "re-run that run or remove its directory."
    if not isinstance(run, dict):
        raise ValueError(f"{file} holds a JSON {type(run).__name__}, not the object train.py writes; {fix}")
    missing = [key for key in REQUIRED_KEYS if key not in run]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}; pass only run directories written by train.py.")
    for key in ("model", "dataset"):
        value = run[key]
        if not isinstance(value, str) or not NAME.fullmatch(value) or not value.strip("."):
            raise ValueError(f"{file} has {key}={value!r}, not a name (letters, digits, _ . + -); {fix}")
    if isinstance(run["seed"], bool) or not isinstance(run["seed"], int):
        raise ValueError(f"{file} has seed={run['seed']!r}, not an integer; {fix}")
    # A null, NaN or infinite accuracy (an edited or foreign file) would turn means, intervals and the verdict
    # into blanks and "+nan": refuse it. Only test_acc1 may be absent (older runs).
    for key in METRICS:
        value = run.get(key, 0.0)
        if not _is_number(value):
            raise ValueError(f"{file} has {key}={value}, not a finite accuracy; {fix}")
    history = run.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(h, dict) and isinstance(h.get("epoch"), int) and not isinstance(h["epoch"], bool)
            and all(h.get(curve) is None or _is_number(h[curve]) for curve in CURVES) for h in history):
        raise ValueError(f"{file} has a history that is not a list of epoch records (an integer epoch, finite "
                         f"{' and '.join(CURVES)}); {fix}")
    if not isinstance(run.get("selected_on", ""), str):
        raise ValueError(f"{file} has selected_on={run['selected_on']!r}, not val or test; {fix}")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def load_runs(paths) -> list[dict]:
    """Every metrics.json under ``paths`` as a dict, plus ``"dir"`` (the run directory), ``"recipe"`` (see
    `recipe`) and ``"group"``: the dataset's name, with ``#2``, ``#3``... for runs of another recipe on a dataset
    of the same name. Only runs of one group are compared."""
    runs, seen_files = [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path} does not exist; pass a run directory holding metrics.json or a sweep directory "
                             "above such runs.")
        files, unfinished = _walk(path)
        for run_dir in unfinished:
            log.warning("skipping %s: no metrics.json yet (run unfinished or failed)", run_dir)
        if not files:
            raise ValueError(f"no metrics.json found under {path}; pass a finished run directory or a sweep directory "
                             "that holds finished runs.")
        for file in files:
            if file.resolve() in seen_files:  # a run dir given again inside a sweep dir given too
                continue
            seen_files.add(file.resolve())
            try:
                run = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{file} is not valid JSON ({e}); re-run that run or remove its directory.") from None
            _check_run(file, run)
            run["dir"] = str(file.parent)
            run["recipe"] = recipe(file.parent, run)
            runs.append(run)
    _assign_groups(runs)
    owner = {}
    for run in runs:
        key = (run["group"], run["model"], run["seed"])
        if key in owner:
            raise ValueError(f"{owner[key]} and {run['dir']} are both {key[1]} seed {key[2]} on {key[0]}; "
                             "pass only one of them so that seeds pair unambiguously.")
        owner[key] = run["dir"]
    return runs


def _recipe_key(run: dict) -> str:
    # Without a config.yaml only metrics.json's epochs are known: such runs are compared on that alone.
    known = run["recipe"] if run["recipe"] is not None else {"unknown recipe, epochs": run.get("epochs")}
    return json.dumps(known, sort_keys=True, default=str)


def _assign_groups(runs: list[dict]) -> None:
    indices = defaultdict(dict)  # dataset -> recipe key -> its index, in the order first seen
    for run in runs:
        seen = indices[run["dataset"]]
        index = seen.setdefault(_recipe_key(run), len(seen))
        run["group"] = run["dataset"] if index == 0 else f"{run['dataset']}#{index + 1}"


def recipe_differences(runs: list[dict]) -> list[str]:
    """One line per group that shares its dataset's name with the first group of it but not its recipe,
    naming the keys that differ (at most 8)."""
    first, lines, seen = {}, [], set()
    for run in runs:
        first.setdefault(run["dataset"], run)
        if run["group"] in seen or run["group"] == run["dataset"]:
            continue
        seen.add(run["group"])
        other = first[run["dataset"]]
        if (run["recipe"] is None) != (other["recipe"] is None):
            which = run if run["recipe"] is None else other
            lines.append(f"{run['group']} is not compared with {other['group']}: {which['dir']} has no config.yaml, "
                         "so its recipe is unknown")
            continue
        mine, theirs = json.loads(_recipe_key(run)), json.loads(_recipe_key(other))
        keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k, "absent") != theirs.get(k, "absent"))
        shown = ", ".join(f"{k} ({_short(theirs.get(k, 'absent'))} vs {_short(mine.get(k, 'absent'))})"
                          for k in keys[:8])
        lines.append(f"{run['group']} is not compared with {other['group']}: different {shown}"
                     + (f" and {len(keys) - 8} more" if len(keys) > 8 else ""))
    return lines


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def mean_std(values) -> tuple[float, float, float]:
    """Mean, sample std (ddof=1) and half the width of the 95% Student-t confidence interval of the mean; the
    std and the interval of fewer than two values are undefined, so NaN."""
    values = np.asarray(values, dtype=float)
    n = values.size
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    std = float(values.std(ddof=1))
    return mean, std, stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)


def runs_by_group(runs) -> dict[str, dict[str, dict[int, dict]]]:
    """group (the dataset, see `load_runs`) -> model -> seed -> run."""
    groups = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        groups[run.get("group", run["dataset"])][run["model"]][run["seed"]] = run
    return groups


def metric_value(run: dict, metric: str) -> float:
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
    for dataset, models in sorted(runs_by_group(runs).items()):
        for model in sorted(models, key=model_order):
            seeds = models[model]
            row = {"dataset": dataset, "model": model, "n_seeds": len(seeds), "seeds": sorted(seeds)}
            for metric in METRICS:
                values = [metric_value(r, metric) for r in seeds.values()]
                row[f"{metric}_mean"], row[f"{metric}_std"], _ = mean_std(values)
            rows.append(row)
    return rows


def paired_differences(runs: list[dict]) -> list[dict]:
    """Per dataset and AC model whose baseline was run too: AC − baseline over the seeds both arms have.

    For each metric: mean and sample std of the per-seed differences and the 95% Student-t confidence
    interval of the mean (NaN with fewer than two pairs). Seeds run in one arm only are listed, not paired.
    """
    rows = []
    for dataset, models in sorted(runs_by_group(runs).items()):
        for model in sorted(models, key=model_order):
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
                mean, sd, half = mean_std([metric_value(ac_runs[s], metric) - metric_value(base_runs[s], metric)
                                           for s in paired])
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
        return f"{change} over 1 seed (one seed: no interval): run more seeds"
    low, high = pair[f"{metric}_ci_low"], pair[f"{metric}_ci_high"]
    return (f"{change}, 95% CI [{low:+.2f}, {high:+.2f}] over {n} seeds: "
            + ("excludes 0" if low > 0 or high < 0 else "includes 0: not shown to be real"))


def _fmt(value: float, signed: bool = False) -> str:
    return "" if math.isnan(value) else f"{value:+.2f}" if signed else f"{value:.2f}"


def _mean_pm_std(mean: float, std: float, signed: bool = False) -> str:
    return _fmt(mean, signed) + ("" if math.isnan(std) else f" ± {std:.2f}")


def ci_text(pair: dict, metric: str) -> str:
    low, high = pair[f"{metric}_ci_low"], pair[f"{metric}_ci_high"]
    if math.isnan(low):
        return "one seed: no interval" if pair["n_pairs"] == 1 else "n/a"
    return f"[{low:+.2f}, {high:+.2f}]"


def _seeds(seeds) -> str:
    return " ".join(map(str, seeds))


def render_markdown(summary: list[dict], pairs: list[dict], apart=(), unfinished=()) -> str:
    """The report: per-model table, paired-difference table, one verdict line per AC model and dataset; then
    the groups of runs not compared, with why (``apart``: `recipe_differences`), and the runs not counted
    (``unfinished``: `unfinished_runs`)."""
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
    else:
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
                                      f"{ci_text(p, m)}" for m in METRICS) + f" | {unpaired} |")
        lines += ["", "## Verdict", "",
                  "Read on a number that was not selected on the data it is scored on: the test top-1 of best.pt "
                  "when best.pt was picked on a validation split (dataset.val_split > 0), else the final epoch's "
                  "top-1 (best.pt was then picked on the test split itself, which flatters both arms).", ""]
        lines += [f"- {verdict_line(p)}" for p in pairs]
    if apart:
        lines += ["", "## Runs reported apart", "",
                  "Runs are compared only within one recipe: every config value but the model choice and the seed "
                  "(and where and how they ran). A dataset name with #2, #3... is another recipe on that dataset.", ""]
        lines += [f"- {line}" for line in apart]
    if unfinished:
        lines += ["", "## Not counted", ""]
        lines += [f"- {u['dir']}{run_label(u)}: no metrics.json (unfinished or failed)" for u in unfinished]
    return "\n".join(lines) + "\n"


def verdict_line(pair: dict) -> str:
    return (f"{pair['dataset']}, {pair['model']} vs {pair['baseline']}, {METRIC_NAMES[pair['verdict_metric']]}: "
            f"{verdict(pair)}")


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


def write_report(runs: list[dict], out, unfinished=()) -> str:
    """Write report.md, report.csv, val_acc1_curves.png and the TensorBoard runs into ``out``; return the
    Markdown. ``unfinished`` (`unfinished_runs`) are named as not counted."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, pairs = summarize(runs), paired_differences(runs)
    markdown = render_markdown(summary, pairs, recipe_differences(runs), unfinished)
    (out / "report.md").write_text(markdown)
    write_csv(summary, pairs, out / "report.csv")
    from experiment.figures import save_curves, save_skeletons  # matplotlib and torch only when drawing

    save_curves(runs, out / "val_acc1_curves.png")
    save_skeletons(runs, out)
    write_tensorboard(runs, out, markdown, unfinished)
    return markdown


TENSORBOARD_DIR = "tensorboard"
MEAN_GROUP, DIFF_GROUP = "mean_over_seeds", "ac_minus_baseline"
# The TensorBoard run that holds the report itself: its text, the verdict figures, the custom-scalars layout.
VERDICT_RUN = "verdict"
BANDS_NOTE = ("Bands and intervals: 95% Student-t interval of the mean over seeds, clipped to possible values "
              "(accuracy 0 to 100, loss 0 or more); with one seed none is drawn (one seed: no interval).")


def value_bounds(name: str) -> tuple[float, float]:
    """The values a mean of ``name`` can take: a loss is 0 or more, an accuracy 0 to 100 (percent)."""
    return (0.0, math.inf) if "loss" in name else (0.0, 100.0)


def band_points(points, bounds=(-math.inf, math.inf)) -> dict[str, list[tuple[int, float]]]:
    """``[(step, values)]`` -> ``{"": [(step, mean)], "_low": [...], "_high": [...]}``: the mean and its 95%
    Student-t interval, clipped to ``bounds``; a step with one value has a mean and no interval."""
    series = {"": [], "_low": [], "_high": []}
    for step, values in points:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            continue
        mean, _, half = mean_std(values)
        series[""].append((step, mean))
        if len(values) > 1:
            series["_low"].append((step, max(mean - half, bounds[0])))
            series["_high"].append((step, min(mean + half, bounds[1])))
    return series


def per_epoch(runs, curve) -> dict[int, dict[int, float]]:
    """epoch -> seed -> value of ``curve`` in the runs' metrics.json histories (``runs``: seed -> run)."""
    table = defaultdict(dict)
    for seed, run in runs.items():
        for record in run.get("history", []):
            if record.get(curve) is not None:
                table[record["epoch"]][seed] = record[curve]
    return table


def _last_epoch(runs) -> int:
    return max((h["epoch"] for run in runs for h in run.get("history", [])), default=0)


def _verdict_metrics(group: str, models: dict, pairs: list[dict]) -> dict[str, str]:
    """model -> the metric its mean is read on: its pair's verdict metric, else its own `unselected_metric`."""
    metric = {m: unselected_metric(list(seeds.values())) for m, seeds in models.items()}
    for p in pairs:
        if p["dataset"] == group:
            metric[p["model"]] = metric[p["baseline"]] = p["verdict_metric"]
    return metric


def sweep_series(runs: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """TensorBoard run name -> tag -> [(step, value)].

    Per group and model, run ``<group>/<model> (n=<seeds>)``: per epoch the mean over seeds of each of `CURVES`
    (``mean_over_seeds/<curve>``), and at the last epoch the mean of the verdict's metric
    (``verdict_numbers/<metric>``, see `paired_differences`). Per AC model whose baseline ran, run
    ``<group>/<ac> minus <baseline> (n=<pairs> pairs)``: per epoch the paired difference over the seeds both
    arms have at that epoch (``ac_minus_baseline/<curve>``), and the verdict's paired difference
    (``verdict_numbers/ac_minus_baseline_<metric>``, the very numbers of report.md). Every mean over two or more values
    has ``_low`` and ``_high``, its 95% interval, a mean's clipped to the possible values (`value_bounds`); a single
    value has none."""
    pairs = paired_differences(runs)
    series = {}
    for group, models in sorted(runs_by_group(runs).items()):
        metric = _verdict_metrics(group, models, pairs)
        for model in sorted(models, key=model_order):
            seeds = models[model]
            tags = {}
            for curve in CURVES:
                table = per_epoch(seeds, curve)
                tags[f"{MEAN_GROUP}/{curve}"] = band_points(
                    [(e, list(table[e].values())) for e in sorted(table)], value_bounds(curve))
            tags[f"{VERDICT_NUMBERS_GROUP}/{metric[model]}"] = band_points(
                [(_last_epoch(seeds.values()), [metric_value(r, metric[model]) for r in seeds.values()])], (0.0, 100.0))
            series[f"{group}/{model} (n={len(seeds)})"] = _flat_tags(tags)
        for p in (p for p in pairs if p["dataset"] == group and p["n_pairs"]):
            ac, base, paired = models[p["model"]], models[p["baseline"]], p["paired_seeds"]
            tags = {}
            for curve in CURVES:
                own, other = per_epoch(ac, curve), per_epoch(base, curve)
                tags[f"{DIFF_GROUP}/{curve}"] = band_points(
                    [(e, [own[e][s] - other[e][s] for s in paired if s in own[e] and s in other[e]])
                     for e in sorted(own.keys() & other.keys())])
            m, step = p["verdict_metric"], _last_epoch([*ac.values(), *base.values()])
            tags[f"{VERDICT_NUMBERS_GROUP}/{DIFF_GROUP}_{m}"] = {
                "": [(step, p[f"{m}_diff_mean"])],
                "_low": [(step, p[f"{m}_ci_low"])] if p["n_pairs"] > 1 else [],
                "_high": [(step, p[f"{m}_ci_high"])] if p["n_pairs"] > 1 else []}
            series[f"{group}/{p['model']} minus {p['baseline']} (n={p['n_pairs']} pairs)"] = _flat_tags(tags)
    return series


def _flat_tags(tags: dict[str, dict[str, list]]) -> dict[str, list[tuple[int, float]]]:
    return {tag + suffix: points for tag, bands in tags.items() for suffix, points in bands.items() if points}


def tensorboard_layout() -> dict:
    """Custom-scalars layout: one margin chart (mean and 95% band) per per-epoch tag of `sweep_series`; each
    arm is one TensorBoard run, so the arms share a chart."""
    return {"AC vs baseline: mean over seeds, 95% t band": {
        f"{group}/{curve}": ["Margin", [f"{group}/{curve}", f"{group}/{curve}_low", f"{group}/{curve}_high"]]
        for group in (MEAN_GROUP, DIFF_GROUP) for curve in CURVES}}


def _inside(root: Path, name: str) -> Path:
    """root/name, refused unless it stays below root (names are checked in `load_runs`; this is the last guard)."""
    if ".." in Path(name).parts or Path(name).is_absolute():
        raise ValueError(f"refusing to write TensorBoard run {name!r} outside {root}")
    return root / name


def write_tensorboard(runs: list[dict], out, markdown: str = "", unfinished=()) -> Path:
    """TensorBoard runs under ``out/tensorboard``: the arms and differences of `sweep_series`, and run
    `VERDICT_RUN` with the report (``markdown``, TEXT tab), a `verdict_figure` per paired AC model (IMAGES, and
    Time Series under ``verdict/``, before the ``verdict_numbers/`` of `sweep_series`) and `tensorboard_layout`.
    Event files of an earlier report there are replaced. Returns out/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter

    from experiment.figures import pixels, verdict_figures

    root = Path(out) / TENSORBOARD_DIR
    # only where this function writes: the verdict run at depth 1, the arms and differences at depth 2
    for old in sorted([*root.glob("*/events.out.tfevents.*"), *root.glob("*/*/events.out.tfevents.*")]):
        old.unlink()
        for parent in old.parents:  # an arm whose n changed leaves no empty run directory behind
            if parent == root or any(parent.iterdir()):
                break
            parent.rmdir()
    with SummaryWriter(log_dir=str(_inside(root, VERDICT_RUN))) as writer:
        writer.add_custom_scalars(tensorboard_layout())
        if markdown:
            writer.add_text(VERDICT_GROUP, markdown + "\n" + BANDS_NOTE + "\n")
        for name, fig in verdict_figures(runs, unfinished).items():
            writer.add_image(f"{VERDICT_GROUP}/{name}", pixels(fig), 0, dataformats="HWC")
    for name, tags in sweep_series(runs).items():
        with SummaryWriter(log_dir=str(_inside(root, name))) as writer:
            for tag, points in tags.items():
                for step, value in points:
                    writer.add_scalar(tag, value, step)
    return root


def run_label(run: dict) -> str:
    """" (alexnet_ac seed 3)" for an unfinished run whose config.yaml says so, else ""."""
    what = " ".join(str(v) for v in (run.get("model"), run.get("seed") is not None and f"seed {run['seed']}") if v)
    return f" ({what})" if what else ""


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
        from experiment.run_dir import make_folder

        why = make_folder(out)  # made now: one line, not the [Errno ...] of the first file the report writes there
        if why:
            raise UserError(f"--out {out} cannot be the report's folder ({why}); pass --out a folder that can be "
                            "made and written")
        markdown = write_report(runs, out, unfinished_runs(args.paths))
    except (ValueError, OSError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"note: wrote report.md, report.csv, val_acc1_curves.png, any kernel_skeleton_*.png and the TensorBoard "
          f"runs ({TENSORBOARD_DIR}/) to {out}; view: tensorboard --logdir {out} --host 127.0.0.1, then open "
          f"{tensorboard_url(run['model'] for run in runs)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
