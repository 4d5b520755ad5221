"""GPU session check for issue 6 (training speed): fills in the "measured here" column of BENCHMARKS.md.

    python tests/gpu_check.py --out "${OUT:-bench_gpu}"        # about 5 minutes on one H100, hard cap --budget-s

Not collected by pytest (the name does not start with test_). Runs stages in priority order, each in its own
process with the time that is left, and skips what no longer fits; everything lands in --out:
  bench_eager        python -m experiment.bench --quick --device cuda   (batches 128/512/1024, bf16, channels_last)
  trainpy_*          python train.py dataset=fake, 2 epochs, batch 128: the end-to-end img/s of the second epoch
  bench_cudagraphs   the bench with --compile --compile-mode reduce-overhead at batches 128 and 512
  loss_check         compiled (default mode) vs eager losses over 10 steps, float32, on CUDA
  bench_224          --layout imagenet at 224x224, batch 128
  trainpy_compile_*  train.py with trainer.compile=true (includes compile time in epoch 1; epoch 2 is reported)
then prints the targets of the issue against what was measured, and writes summary.json and summary.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))  # run as a script from tests/: make experiment/ and nets/ importable


def stages(out):
    bench = [PY, "-m", "experiment.bench", "--device", "cuda"]
    trainpy = [PY, "train.py", "dataset=fake", "trainer.epochs=2", "trainer.progress=false", "trainer.device=cuda",
               "dataset.batch_size=128", "trainer.save_every=1000"]
    return [
        ("bench_eager", bench + ["--quick", "--json", str(out / "bench_eager.json")], 90),
        ("trainpy_alexnet_ac", trainpy + ["model=alexnet_ac", f"hydra.run.dir={out}/runs/alexnet_ac"], 60),
        ("trainpy_alexnet", trainpy + ["model=alexnet", f"hydra.run.dir={out}/runs/alexnet"], 60),
        ("bench_cudagraphs", bench + ["--batch-sizes", "128,512", "--steps", "30", "--warmup", "10", "--repeats", "3",
                                      "--compile", "--compile-mode", "reduce-overhead",
                                      "--json", str(out / "bench_cudagraphs.json")], 240),
        ("loss_check", [PY, str(Path(__file__).resolve()), "--loss-check", "--out", str(out)], 120),
        ("bench_224", bench + ["--layout", "imagenet", "--batch-sizes", "128", "--steps", "20", "--warmup", "5",
                               "--repeats", "3", "--json", str(out / "bench_224.json")], 60),
        ("trainpy_compile_alexnet_ac", trainpy + ["model=alexnet_ac", "trainer.compile=true",
                                                  f"hydra.run.dir={out}/runs/alexnet_ac_compile"], 180),
        ("trainpy_compile_alexnet", trainpy + ["model=alexnet", "trainer.compile=true",
                                               f"hydra.run.dir={out}/runs/alexnet_compile"], 180),
    ]


def loss_check(out):
    """Eager and torch.compile'd training from the same seed, float32 on CUDA: per-step losses side by side."""
    import torch

    from compiled_vs_eager import compiled_loss_curve  # beside this script

    result = {}
    for kind in ("baseline", "ac"):
        kw = dict(steps=10, batch_size=64, width=0.25, classifier_width=256, device="cuda")
        eager, _ = compiled_loss_curve(kind, **kw)
        fast, _ = compiled_loss_curve(kind, compile_mode="default", **kw)
        diff = max(abs(a - b) / abs(a) for a, b in zip(eager, fast))
        result[kind] = {"eager": eager, "compiled": fast, "max_rel_diff": diff, "ok": diff < 1e-3}
    result["torch"], result["gpu"] = torch.__version__, torch.cuda.get_device_name()
    (out / "loss_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(result[k]["ok"] for k in ("baseline", "ac")) else 1


def _load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _trainpy_img_s(out, name):
    m = _load(out / "runs" / name / "metrics.json")
    return m["history"][-1]["img_per_s"] if m and m.get("history") else None


def _rows(bench, part, **match):
    return [r for r in (bench or {}).get(part, []) if all(r.get(k) == v for k, v in match.items())]


def targets(out):
    """The issue's targets, each with what this run measured (None: not measured)."""
    eager, graphs = _load(out / "bench_eager.json"), _load(out / "bench_cudagraphs.json")

    def best(kind, bs):
        rows = _rows(eager, "train", model=kind, batch_size=bs) + _rows(graphs, "train", model=kind, batch_size=bs)
        return max(rows, key=lambda r: r["img_per_s"], default=None)

    def e2e(model):
        values = [v for v in (_trainpy_img_s(out, model), _trainpy_img_s(out, f"{model}_compile")) if v]
        return max(values, default=None)

    ac512, base512 = best("ac", 512), best("baseline", 512)
    ratio512 = base512["img_per_s"] / ac512["img_per_s"] if ac512 and base512 else None
    ev = {r["model"]: r["img_per_s"] for r in _rows(eager, "eval", batch_size=1024)}
    fused_deploy = ev["ac_fused"] / ev["baseline_deploy"] if len(ev) == 3 else None
    fused_unfused = ev["ac_fused"] / ev["ac_unfused"] if len(ev) == 3 else None
    checks = [
        ("AC end to end through train.py, batch 128 (img/s)", e2e("alexnet_ac"), lambda v: v >= 35_000, ">= 35k"),
        ("baseline end to end through train.py, batch 128 (img/s)", e2e("alexnet"), lambda v: v >= 50_000, ">= 50k"),
        ("AC train step, batch 512, best mode (img/s)", ac512 and ac512["img_per_s"], lambda v: v >= 65_000, ">= 65k"),
        ("AC/baseline step-time ratio, batch 512, best modes", ratio512, lambda v: v <= 1.6, "<= 1.6"),
        ("fused / baseline deploy inference, batch 1024", fused_deploy, lambda v: abs(v - 1) <= 0.03, "1 +- 0.03"),
        ("fused / unfused AC inference, batch 1024", fused_unfused, lambda v: v >= 1.5, ">= 1.5"),
    ]
    return [{"target": name, "goal": goal, "measured": value, "met": None if value is None else bool(test(value))}
            for name, value, test, goal in checks]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench_gpu"))
    p.add_argument("--budget-s", type=float, default=290, help="stop starting stages after this (default 290)")
    p.add_argument("--stages", help="comma-separated subset of stage names")
    p.add_argument("--loss-check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.loss_check:
        return loss_check(args.out)

    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device visible; this check is for a GPU session", file=sys.stderr)
        return 2
    start, report = time.perf_counter(), {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "date": time.strftime("%Y-%m-%d", time.gmtime()), "stages": {}}
    wanted = set(args.stages.split(",")) if args.stages else None
    for name, cmd, cap in stages(args.out):
        if wanted and name not in wanted:
            continue
        left = args.budget_s - (time.perf_counter() - start)
        if left < 20:
            report["stages"][name] = {"status": "skipped: out of time", "command": " ".join(cmd)}
            print(f"== {name}: skipped, out of time", flush=True)
            continue
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        log = args.out / f"{name}.log"
        try:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=min(cap, left)).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {min(cap, left):.0f}s"
        seconds = time.perf_counter() - t0
        report["stages"][name] = {"status": status, "seconds": round(seconds, 1), "command": " ".join(cmd)}
        tail = log.read_text(errors="replace").splitlines()[-40:]
        print(f"-- {name}: {status} in {seconds:.0f}s\n" + "\n".join(tail), flush=True)
    report["targets"] = targets(args.out)
    report["trainpy_img_per_s"] = {n: _trainpy_img_s(args.out, n) for n in
                                   ("alexnet", "alexnet_ac", "alexnet_compile", "alexnet_ac_compile")}
    (args.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{report['gpu']}, torch {report['torch']}, {report['date']}", "",
             "| target | goal | measured | met |", "|---|---|---:|---|"]
    for t in report["targets"]:
        v = t["measured"]
        shown = "not measured" if v is None else (f"{v:,.0f}" if v > 100 else f"{v:.3f}")
        lines.append(f"| {t['target']} | {t['goal']} | {shown} | {'-' if t['met'] is None else t['met']} |")
    lines += ["", f"train.py end-to-end img/s (epoch 2): {report['trainpy_img_per_s']}"]
    for name in ("bench_eager", "bench_cudagraphs", "bench_224"):
        data = _load(args.out / f"{name}.json")
        if data:
            from experiment.bench import format_table

            lines += ["", f"## {name}", "", format_table(data)]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
