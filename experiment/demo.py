"""The Quickstart's offline experiment, the whole way on a CPU: `python -m experiment.demo`.

Trains AlexNet and AlexNetAC on the digits data for each seed, fuses the AC model, evaluates trained and
fused side by side, and prints the comparison report: the same commands a user runs, one after another.
"""
import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*command):
    print("\n$ " + " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per model each")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per run")
    parser.add_argument("--out", type=Path, help="sweep directory (default: outputs/demo/<time>)")
    args = parser.parse_args(argv)
    out = (args.out or ROOT / "outputs/demo" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    try:
        # best.pt is picked on 287 held-out training images, so the test split scores it without bias
        run("train.py", "-m", "experiment=digits_demo", "dataset.val_split=0.2", "model=alexnet,alexnet_ac",
            f"seed={args.seeds}", f"trainer.epochs={args.epochs}", "trainer.progress=false", f"hydra.sweep.dir={out}")
        ac_runs = sorted(out.glob("*_alexnet_ac_digits_seed*"))
        for run_dir in ac_runs:
            best = run_dir / "checkpoints/best.pt"
            run("fuse.py", f"ckpt={best}")
            run("eval.py", f"ckpt={best}", f"compare={best.with_name('best_deploy.pt')}", "device=cpu")
        run("-m", "experiment.report", str(out), "--out", str(out))
    except subprocess.CalledProcessError as e:
        print(f"error: the demo step `{' '.join(map(str, e.cmd[1:]))}` failed (exit {e.returncode}); see above",
              file=sys.stderr)
        return 1
    print("\ntest top-1 of best.pt per seed (%; best.pt picked on the held-out split), and the AC model after fusion:")
    print(f"{'seed':>4}  {'alexnet':>8}  {'alexnet_ac':>10}  {'fused AC':>8}  {'predictions changed by fusion':>29}")
    for ac in ac_runs:
        seed = ac.name.rsplit("seed", 1)[1]
        base = json.loads(next(out.glob(f"*_alexnet_digits_seed{seed}/metrics.json")).read_text())["test_acc1"]
        fused = json.loads((ac / "checkpoints/best.eval.json").read_text())
        print(f"{seed:>4}  {base:8.2f}  {fused['acc1']:10.2f}  {fused['acc1'] + fused['compare']['acc1_difference']:8.2f}"
              f"  {fused['compare']['differing_predictions']:>29}")
    from experiment.tracking import tensorboard_url  # here: it imports torch, which the demo itself never needs

    print(f"\neverything is in {out} (report.md, report.csv, val_acc1_curves.png); tensorboard --logdir {out} "
          f"--host 127.0.0.1, then open {tensorboard_url(['alexnet', 'alexnet_ac'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
