"""Training and inference speed of AlexNet (BN baseline) versus AlexNetAC: `python -m experiment.bench`.

Everything runs through the library code train.py uses: the models come from `experiment.models.build_model`,
the batches from `experiment.data.DeviceLoader` over fake uint8 images (random crop, flip and normalisation
on the device, as for CIFAR), the optimizer and schedule from `experiment.optim` with the defaults in
configs/optimizer/sgd.yaml and configs/scheduler/cosine.yaml, and every training step is a step of
`experiment.training.train_one_epoch`, so the step measured is the step train.py runs (data pipeline included).

Measured, each the median of `--repeats` timed runs after `--warmup` steps:
  train    images/s of a training step (forward, backward, SGD, schedule, running loss/accuracy sums) for the
           baseline and AC, eager and, with --compile, `torch.compile(model, mode=--compile-mode)`
  eval     images/s of an inference forward pass of the unfused AC model, the fused one (`nets.fuse_model`)
           and the baseline's deploy form `AlexNet(bn=False)`; eager, and compiled with --compile-eval
  input    images/s of the DeviceLoader alone
plus the training-step FLOPs of both models (torch.utils.flop_counter), the peak GPU memory of each
measurement on CUDA, and the ratios AC/baseline step time, fused/deploy and fused/unfused inference.

    python -m experiment.bench --quick                      # < 2 min on 2 CPU cores, small sizes
    python -m experiment.bench --quick --device cuda        # real sizes, batches 128/512/1024
    python -m experiment.bench --device cuda --compile --compile-mode reduce-overhead --json bench.json
"""
import argparse
import contextlib
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from experiment.config import COMPILE_MODES
from experiment.distributed import select_device
from experiment.data import DeviceLoader
from experiment.errors import UserError, exit_on_user_error, first_line
from experiment.evaluation import autocast_context
from experiment.models import build_model, logit_difference
from experiment.optim import build_optimizer, build_scheduler
from experiment.run_dir import check_outputs, is_json_with_keys
from experiment.tracking import write_json
from experiment.training import train_one_epoch
from nets import fuse_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {"baseline": "AlexNet", "ac": "AlexNetAC"}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
NUM_CLASSES = 10
MEAN, STD = (0.5, 0.5, 0.5), (0.29, 0.29, 0.29)  # configs/dataset/fake.yaml
CROP_PADDING = 4
EVAL_STEPS_FACTOR = 3  # an inference pass costs about a third of a training step: time 3x as many

# --quick: small sizes on a CPU (< 2 min on 2 cores), the real sizes on a GPU (< 3 min on one H100, eager).
QUICK = {
    "cpu": dict(width=0.25, classifier_width=512, batch_sizes=[64], steps=5, warmup=2, repeats=3),
    "cuda": dict(width=1.0, classifier_width=4096, batch_sizes=[128, 512, 1024], steps=30, warmup=10, repeats=3),
}
FULL = dict(width=1.0, classifier_width=4096, batch_sizes=[128, 512, 1024], steps=50, warmup=10, repeats=5)


def model_config(kind, args):
    cfg = {"name": f"bench_{kind}", "arch": MODELS[kind], "layout": args.layout, "width": args.width,
           "classifier_width": args.classifier_width, "dropout": args.dropout}
    return cfg | ({"bn": True} if kind == "baseline" else {})


def training_config():
    """The optimizer, schedule and trainer defaults train.py starts from."""
    return (OmegaConf.load(CONFIGS / "optimizer" / "sgd.yaml"), OmegaConf.load(CONFIGS / "scheduler" / "cosine.yaml"),
            OmegaConf.load(CONFIGS / "trainer" / "default.yaml"))


def fake_loader(batch_size, num_batches, image_size, device, *, train=True, channels_last=False, seed=0):
    """A DeviceLoader over `num_batches` batches of random uint8 images and labels."""
    g = torch.Generator().manual_seed(seed)
    n = batch_size * num_batches
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return DeviceLoader(images, labels, batch_size, train=train, mean=MEAN, std=STD, device=device,
                        crop_padding=CROP_PADDING, hflip=True, seed=seed, channels_last=channels_last)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device):
    _sync(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _compiled(model, mode):
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def _mode_name(compile_mode):
    return f"compile:{compile_mode}" if compile_mode else "eager"


class TrainRunner:
    """One model's training steps through `train_one_epoch`, as train.py runs them: `warm()` builds everything
    and runs the warm-up steps (compilation happens there); each `run()` is one epoch of `steps` timed steps,
    timed by train_one_epoch's own clock (it synchronises the GPU before reading it)."""

    def __init__(self, kind, batch_size, args, device, compile_mode=None):
        self.kind, self.batch_size, self.args, self.device = kind, batch_size, args, device
        self.compile_mode = compile_mode
        self.epoch = 0

    def warm(self):
        args, device = self.args, self.device
        optimizer_cfg, scheduler_cfg, trainer_cfg = training_config()
        self.num_batches = max(args.steps, args.warmup)
        self.loader = fake_loader(self.batch_size, self.num_batches, args.image_size, device,
                                  channels_last=args.channels_last, seed=args.seed)
        torch.manual_seed(args.seed)
        self.model = build_model(model_config(self.kind, args), NUM_CLASSES).to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, optimizer_cfg)
        self.scheduler = build_scheduler(self.optimizer, scheduler_cfg, args.repeats + 2, self.num_batches)
        self.fast = _compiled(self.model, self.compile_mode) if self.compile_mode else self.model
        self.step = dict(device=device, amp=args.amp, label_smoothing=trainer_cfg.label_smoothing,
                         log_every=trainer_cfg.log_every)
        if args.warmup:
            self._epoch(args.warmup)

    def _epoch(self, steps):
        totals, _ = train_one_epoch(self.fast, self.loader, self.optimizer, self.scheduler, epoch=self.epoch,
                                    start_step=self.num_batches - steps, **self.step)
        self.epoch += 1
        self.loss = totals.loss_sum / totals.count
        return totals.count / totals.seconds

    def run(self):
        return self._epoch(self.args.steps)

    def result(self):
        return {"model": self.kind, "mode": _mode_name(self.compile_mode), "loss": self.loss}


class EvalRunner:
    """Inference images/s of a model (eval mode, no autograd, autocast as in training) on one fixed batch;
    a timed run is EVAL_STEPS_FACTOR * steps forward passes."""

    def __init__(self, name, model, batch_size, args, device, compile_mode=None):
        self.name, self.model, self.batch_size, self.args, self.device = name, model, batch_size, args, device
        self.compile_mode = compile_mode
        tensors = [*model.parameters(), *model.buffers()]
        self.owned_bytes = sum(t.numel() * t.element_size() for t in tensors)  # built before warm(): add them

    def warm(self):
        self.model.eval()
        self.x, _ = next(fake_loader(self.batch_size, 1, self.args.image_size, self.device, train=False,
                                     channels_last=self.args.channels_last, seed=self.args.seed).epoch(0))
        self.fast = _compiled(self.model, self.compile_mode) if self.compile_mode else self.model
        self._forward(self.args.warmup)

    def _forward(self, n):
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast_context(self.device, self.args.amp):
            for _ in range(n):
                self.fast(self.x)
        _sync(self.device)
        return n * self.batch_size / (time.perf_counter() - t0)

    def run(self):
        return self._forward(EVAL_STEPS_FACTOR * self.args.steps)

    def result(self):
        return {"model": self.name, "mode": _mode_name(self.compile_mode)}


def measure(runners, repeats, device):
    """Warm every runner, then time them in turns (A B C A B C ...), so a slow spell of a shared machine or a
    clock change hits all of them alike, and report the median per runner. On CUDA, each runner's peak
    memory is its own footprint: what it keeps allocated (weights, gradients, optimizer state, data) plus its
    peak during its timed runs, without what the other runners keep."""
    cuda = device.type == "cuda"
    resident, warmup_s = {}, {}
    for r in runners:
        before = _allocated(device)
        t0 = time.perf_counter()
        r.warm()
        warmup_s[r] = time.perf_counter() - t0
        resident[r] = _allocated(device) - before + getattr(r, "owned_bytes", 0)
    per_run, peak = {r: [] for r in runners}, {r: 0 for r in runners}
    for _ in range(repeats):
        for r in runners:
            start = _allocated(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            per_run[r].append(r.run())
            if cuda:
                peak[r] = max(peak[r], torch.cuda.max_memory_allocated(device) - start + resident[r])
    return [_summary(per_run[r], r.batch_size, {**r.result(), "warmup_s": warmup_s[r],
                                                "peak_mem_bytes": peak[r] if cuda else None})
            for r in runners]


def _measure_group(section, runners, repeats, device, compile_mode, log):
    """`measure` from fresh compile caches, logging a line per result. Interleaved, except under CUDA graphs
    (reduce-overhead, max-autotune): there each model is measured alone, so no two models' graphs alternate in
    the same CUDA-graph tree."""
    torch._dynamo.reset()  # fresh compile caches per group: no recompile limit, nothing reused
    groups = [[r] for r in runners] if compile_mode in CUDA_GRAPH_MODES else [runners]
    rows = [row for group in groups for row in measure(group, repeats, device)]
    for r in rows:
        log(f"{section:<6} {r['model']:<16} {r['mode']:<10} batch {r['batch_size']:>5}: {r['img_per_s']:>10,.0f} img/s")
    return rows


def _summary(per_run, batch_size, extra):
    img_s = statistics.median(per_run)
    return {"batch_size": batch_size, "img_per_s": img_s, "step_ms": 1e3 * batch_size / img_s,
            "runs_img_per_s": per_run, **extra}


def bench_input(batch_size, args, device):
    """Images/s of the training DeviceLoader alone (crop, flip, normalisation of whole batches)."""
    start = _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader = fake_loader(batch_size, args.steps, args.image_size, device, channels_last=args.channels_last,
                         seed=args.seed)

    def epoch(e):
        t0 = time.perf_counter()
        for x, y in loader.epoch(e):
            pass
        _sync(device)
        return len(loader) * batch_size / (time.perf_counter() - t0)

    epoch(0)
    per_run = [epoch(e + 1) for e in range(args.repeats)]
    peak = torch.cuda.max_memory_allocated(device) - start if device.type == "cuda" else None
    result = _summary(per_run, batch_size, {"peak_mem_bytes": peak})
    result["batches_per_s"] = result["img_per_s"] / batch_size
    return result


def train_step_flops(model_cfg, image_size):
    """FLOPs of one training step (forward + backward, per image) counted on the meta device: convolutions and
    matrix products only (BN, ReLU, pooling and the SGD update are not counted)."""
    with torch.device("meta"):
        model = build_model(model_cfg, NUM_CLASSES)
        x = torch.zeros(1, 3, image_size, image_size)
        y = torch.zeros(1, dtype=torch.int64)
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def ratios(train, evals):
    img_s = {(r["model"], r["mode"], r["batch_size"]): r["img_per_s"] for r in train + evals}

    def per_mode_and_batch(rows, a, b):
        """img/s of model a over model b for each (mode, batch size) of ``rows``; None where one is missing."""
        out = []
        for mode, bs in dict.fromkeys((r["mode"], r["batch_size"]) for r in rows):
            x, y = img_s.get((a, mode, bs)), img_s.get((b, mode, bs))
            out.append({"mode": mode, "batch_size": bs, "ratio": x / y if x and y else None})
        return out

    return {"ac_over_baseline_step_time": per_mode_and_batch(train, "baseline", "ac"),
            "fused_over_deploy": per_mode_and_batch(evals, "ac_fused", "baseline_deploy"),
            "fused_over_unfused": per_mode_and_batch(evals, "ac_fused", "ac_unfused")}


def machine(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    with contextlib.suppress(OSError):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)  # other work on a shared machine skews CPU timings
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args, log=print):
    """All measurements `args` asks for; returns the result dict that --json writes."""
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py
    results = {"machine": machine(device), "command": " ".join(["python -m experiment.bench", *args.argv]),
               "settings": {k: v for k, v in vars(args).items() if k not in ("device", "argv", "json")}
               | {"device": str(device)},
               "train": [], "eval": [], "input": []}
    modes = [None] + ([args.compile_mode] if args.compile else [])
    eval_modes = [None] + ([args.compile_mode] if args.compile and args.compile_eval else [])
    flops = {kind: train_step_flops(model_config(kind, args), args.image_size) for kind in MODELS}
    results["train_step_flops_per_image"] = flops | {"ac_over_baseline": flops["ac"] / flops["baseline"]}
    for bs in args.batch_sizes:
        for mode in modes:
            runners = [TrainRunner(kind, bs, args, device, mode) for kind in MODELS]
            for r in _measure_group("train", runners, args.repeats, device, mode, log):
                r["tflops"] = r["img_per_s"] * flops[r["model"]] / 1e12
                results["train"].append(r)
            ac_model = runners[list(MODELS).index("ac")].model
            del runners
        if "fused_max_abs_diff" not in results:  # the AC model trained a few steps vs its fusion, float32, eval mode
            x, _ = next(fake_loader(8, 1, args.image_size, device, train=False, seed=args.seed).epoch(0))
            results["fused_max_abs_diff"] = logit_difference(ac_model, fuse_model(ac_model), x)["max_abs"]
        torch.manual_seed(args.seed)
        models = {"ac_unfused": ac_model, "ac_fused": fuse_model(ac_model),
                  "baseline_deploy": fuse_model(build_model(model_config("baseline", args), NUM_CLASSES)).to(device)}
        del ac_model
        if args.channels_last:
            models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
        for mode in eval_modes:
            runners = [EvalRunner(name, m, bs, args, device, mode) for name, m in models.items()]
            results["eval"] += _measure_group("eval", runners, args.repeats, device, mode, log)
            del runners
        del models
        r = bench_input(bs, args, device)
        results["input"].append(r)
        log(f"input  DeviceLoader                batch {bs:>5}: {r['img_per_s']:>10,.0f} img/s")
    results["ratios"] = ratios(results["train"], results["eval"])
    return results


def _mib(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def format_table(results):
    m, s = results["machine"], results["settings"]
    ratio_text = {(name, x["mode"], x["batch_size"]): "-" if x["ratio"] is None else f"{x['ratio']:.2f}"
                  for name, rows in results["ratios"].items() for x in rows}

    def ratio(name, r):
        return ratio_text.get((name, r["mode"], r["batch_size"]), "-")

    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_threads']} threads, load average {m.get('load_avg_1min', '?')})"
    amp = "bf16 autocast" if s["amp"] and s["device"].startswith("cuda") else "float32"
    lines = [f"{where}, torch {m['torch']}, {m['date']}; {s['layout']} layout {s['image_size']}x{s['image_size']}, "
             f"width {s['width']}, classifier {s['classifier_width']}, {amp}"
             f"{', channels_last' if s['channels_last'] else ''}; median of {s['repeats']} x {s['steps']} steps "
             f"after {s['warmup']} warm-up",
             "", "| train step | mode | batch | img/s | ms/step | TFLOP/s | peak MiB | AC/baseline step time |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["train"]:
        step_ratio = ratio("ac_over_baseline_step_time", r) if r["model"] == "ac" else ""
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch_size']} | {r['img_per_s']:,.0f} | {r['step_ms']:.2f} | "
                     f"{r['tflops']:.3g} | {_mib(r['peak_mem_bytes'])} | {step_ratio} |")
    lines += ["", "| inference | mode | batch | img/s | peak MiB | fused/deploy | fused/unfused |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["eval"]:
        extra = (f"{ratio('fused_over_deploy', r)} | {ratio('fused_over_unfused', r)}"
                 if r["model"] == "ac_fused" else " | ")
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch_size']} | {r['img_per_s']:,.0f} | "
                     f"{_mib(r['peak_mem_bytes'])} | {extra} |")
    lines += ["", "| input pipeline (DeviceLoader) | batch | batches/s | img/s |", "|---|---:|---:|---:|"]
    for r in results["input"]:
        lines.append(f"| crop+flip+normalise | {r['batch_size']} | {r['batches_per_s']:,.1f} | {r['img_per_s']:,.0f} |")
    f = results["train_step_flops_per_image"]
    lines += ["", f"train-step FLOPs per image (forward+backward): baseline {f['baseline'] / 1e9:.3f} G, "
                  f"AC {f['ac'] / 1e9:.3f} G, AC/baseline {f['ac_over_baseline']:.3f}",
              f"fused vs unfused AC logits, max |diff|: {results['fused_max_abs_diff']:.2e}"]
    return "\n".join(lines)


def parse_args(argv=None):
    def integers(text):  # a named type: argparse's error says what --batch-sizes expects, not "invalid <lambda>"
        try:
            return [int(b) for b in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 128,512, not {text!r}")

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m experiment.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true",
                   help="small sizes on CPU (< 2 min on 2 cores), real sizes and few steps on CUDA")
    p.add_argument("--batch-sizes", type=integers,
                   help="comma-separated training (and inference) batch sizes (default 128,512,1024)")
    p.add_argument("--layout", default="cifar", choices=("cifar", "imagenet"))
    p.add_argument("--image-size", type=int, help="square side (default 32; 224 with --layout imagenet)")
    p.add_argument("--width", type=float, help="channel multiplier (default 1.0)")
    p.add_argument("--classifier-width", type=int, help="hidden width of the classifier (default 4096)")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--steps", type=int, help="steps per timed run (default 50)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10; compile happens here)")
    p.add_argument("--repeats", type=int, help="timed runs; the median is reported (default 5)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA, as trainer.amp (CPU always float32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last tensors and weights (default: on CUDA only, as trainer.channels_last)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure torch.compile(model) (train.py's trainer.compile=true)")
    p.add_argument("--compile-eval", action=argparse.BooleanOptionalAction, default=False,
                   help="with --compile, also measure the compiled inference models")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the fast path; reduce-overhead = CUDA graphs")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write all results here")
    args = p.parse_args(argv)
    args.argv = argv
    args.device = select_device(args.device, option="--device")
    sizes = QUICK["cuda" if args.device.type == "cuda" else "cpu"] if args.quick else FULL
    defaults = sizes | {"image_size": 224 if args.layout == "imagenet" else 32,
                        "channels_last": args.device.type == "cuda"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if min(args.batch_sizes) < 2 or args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise UserError("--batch-sizes must be >= 2 (BatchNorm), --steps and --repeats >= 1, --warmup >= 0")
    check_model_options(args)
    if args.json:  # checked now, not after minutes of measuring; only results this benchmark wrote are replaced
        args.json, = check_outputs([args.json], [], option="--json", replaceable=lambda path: is_json_with_keys(
            path, {"machine", "settings", "train", "eval", "input"}))
    return args


def check_model_options(args):
    """The models the options describe can be built and take `--image-size` images: one line now, not a
    traceback from the first step."""
    if args.image_size < 1:
        raise UserError(f"--image-size {args.image_size} must be >= 1")
    if not (math.isfinite(args.width) and args.width > 0 and args.classifier_width >= 1 and 0 <= args.dropout < 1):
        raise UserError("--width must be a finite number above 0, --classifier-width >= 1, --dropout in [0, 1)")
    for kind in MODELS:  # the options are checked by the constructor; the fit by one forward pass on CPU
        build_model(model_config(kind, args), NUM_CLASSES)
    probe = build_model(model_config("baseline", args) | {"width": 1 / 64, "classifier_width": 8}, NUM_CLASSES)
    try:
        with torch.no_grad():
            probe.eval()(torch.zeros(1, 3, args.image_size, args.image_size))
    except RuntimeError as e:
        raise UserError(f"--image-size {args.image_size} is too small for the {args.layout} layout "
                        f"({first_line(e, 100)}); use --image-size "
                        f"{224 if args.layout == 'imagenet' else 32}") from None


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    results = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
