"""Where a sweep's time goes: `python -m experiment.sweep_bench` runs a short `train.py -m` sweep on a generated
image folder and prints how much of its wall time was training.

It generates (once; reused while present) a folder of `--images` PNGs of `--size` pixels in `--classes` classes,
nine tenths under train/ and one tenth under val/, then runs

    python train.py -m experiment=tiny dataset=folder dataset.root=<folder> dataset.image_size=<size>
        seed=0,...,<jobs-1> trainer.epochs=<epochs> hydra.sweep.dir=<out>/sweep [extra overrides]

from `--repo` (default: this checkout; point it at another checkout to measure that code), timestamping every
line the sweep prints and counting its child processes every 0.25 s. It prints:
  - each job's time from its launch (Hydra's `#k : ...` line) to its first training step (the line train.py logs
    right after set-up, just before step 1);
  - the time from the sweep's last line to the process's exit;
  - the busy fraction: the jobs' training seconds (metrics.json `train_seconds`) over the sweep's wall seconds;
  - the most child processes (DataLoader workers) the sweep process had at once, and how many it had at the end.

    python -m experiment.sweep_bench                         # 10,000 32-px PNGs, 3 jobs of 1 epoch, CPU
    python -m experiment.sweep_bench --jobs 4 --epochs 8 --device cuda --json sweep.json
    python -m experiment.sweep_bench --repo /path/to/other/checkout   # the same sweep on other code
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from experiment.errors import UserError, exit_on_user_error
from experiment.run_dir import check_outputs, is_json_with_keys
from experiment.tracking import write_json

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = re.compile(r"\[HYDRA\]\s+#(\d+) : ")
READY = re.compile(r"training steps per epoch")  # logged at the end of set-up, right before the first step


def child_processes(pid=None):
    """Ids of the live (not yet reaped) child processes of `pid` (default: this process), from Linux's /proc."""
    pid = pid or os.getpid()
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(set(map(int, children)))


def make_folder(root, images, size, classes, seed=0):
    """An image folder of `images` random smooth PNGs (unless `root` already holds this very one)."""
    marker = root / "sweep_bench.json"
    spec = {"images": images, "size": size, "classes": classes, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not a folder this benchmark made with these options; pass another "
                        f"--data (or delete it)")
    rng = np.random.default_rng(seed)
    for i in range(images):
        split = "val" if i % 10 == 9 else "train"
        folder = root / split / f"class{(i // 10) % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
    marker.write_text(json.dumps(spec))
    return root


def run_sweep(repo, folder, out, jobs, epochs, size, device, extra):
    """Run the sweep; return its command, timeline [(seconds since start, line)], exit seconds, status and child
    process counts."""
    command = [sys.executable, str(repo / "train.py"), "-m", "experiment=tiny", "dataset=folder",
               f"dataset.root={folder}", f"dataset.image_size={size}", f"seed={','.join(map(str, range(jobs)))}",
               f"trainer.epochs={epochs}", f"trainer.device={device}", f"hydra.sweep.dir={out / 'sweep'}", *extra]
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=repo, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    counts, done = [], threading.Event()

    def sample():
        while not done.is_set():
            try:
                counts.append(len(child_processes(proc.pid)))
            except OSError:  # the process has ended
                return
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = [(time.monotonic() - start, line.rstrip("\n")) for line in proc.stdout]
    status = proc.wait()
    exited = time.monotonic() - start
    done.set()
    sampler.join()
    return command, lines, exited, status, counts


def summarise(lines, exited, status, counts, sweep_dir):
    launches, ready = {}, {}
    job = None
    for t, line in lines:
        if m := LAUNCH.search(line):
            job = int(m.group(1))
            launches[job] = t
        elif READY.search(line) and job is not None and job not in ready:
            ready[job] = t
    train_seconds = [json.loads(p.read_text())["train_seconds"] for p in sorted(sweep_dir.glob("*/metrics.json"))]
    last_line = lines[-1][0] if lines else 0.0
    return {"exit_status": status, "wall_s": exited,
            "launch_to_first_step_s": {j: ready[j] - launches[j] for j in sorted(ready)},
            "last_line_to_exit_s": exited - last_line,
            "train_s": sum(train_seconds), "jobs_finished": len(train_seconds),
            "busy_fraction": sum(train_seconds) / exited if exited else 0.0,
            "max_child_processes": max(counts, default=0), "child_processes_at_end": counts[-1] if counts else 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--size", type=int, default=32, help="image side in pixels, and dataset.image_size")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--jobs", type=int, default=3, help="jobs of the sweep (seeds 0..jobs-1)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data", type=Path, help="the generated folder (default outputs/sweep_bench/<images>x<size>)")
    p.add_argument("--out", type=Path, help="sweep output (default outputs/sweep_bench/runs/<time>)")
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose train.py runs (default: this one)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. dataset.cache=off")
    args = p.parse_args(argv)
    for name in ("images", "size", "classes", "jobs", "epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}={getattr(args, name)} must be at least 1")
    if args.size < 8:
        raise UserError(f"--size={args.size} is too small for experiment=tiny's network; use 8 or more")
    if not (args.repo / "train.py").is_file():
        raise UserError(f"--repo {args.repo} holds no train.py; point it at a checkout of this repository")
    if args.json:  # checked now, not after minutes of sweeping; only results this benchmark wrote are replaced
        args.json, = check_outputs([args.json], [], option="--json", replaceable=lambda path: is_json_with_keys(
            path, {"launch_to_first_step_s", "last_line_to_exit_s", "busy_fraction"}))
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    bench = ROOT / "outputs" / "sweep_bench"
    folder = make_folder((args.data or bench / f"{args.images}x{args.size}").resolve(), args.images, args.size,
                         args.classes)
    out = (args.out or bench / "runs" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")).resolve()
    command, lines, exited, status, counts = run_sweep(args.repo.resolve(), folder, out, args.jobs, args.epochs,
                                                       args.size, args.device, args.overrides)
    result = summarise(lines, exited, status, counts, out / "sweep")
    result.update(command=" ".join(command), machine=f"{platform.node()}, {os.cpu_count()} CPUs",
                  torch=torch.__version__, date=datetime.date.today().isoformat(), images=args.images,
                  size=args.size, jobs=args.jobs, epochs=args.epochs)
    for j, seconds in result["launch_to_first_step_s"].items():
        print(f"job {j}: launch to first training step {seconds:.1f} s")
    print(f"last line to process exit: {result['last_line_to_exit_s']:.1f} s")
    print(f"busy fraction: {result['busy_fraction']:.1%} ({result['train_s']:.1f} s training of {exited:.1f} s wall, "
          f"{result['jobs_finished']} of {args.jobs} jobs finished, exit status {status})")
    print(f"child processes: at most {result['max_child_processes']}, at the end {result['child_processes_at_end']}")
    if status:
        print("the sweep failed; its last lines:\n" + "\n".join(line for _, line in lines[-15:]))
    if args.json:
        write_json(args.json, result)
    sys.exit(1 if status else 0)


if __name__ == "__main__":
    main()
