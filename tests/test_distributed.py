"""DistributedDataParallel on CPU: 2 gloo processes started by torchrun, as a user would start them."""
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY, read_metrics, run_script
from distributed_step import first_step
from experiment.data import DeviceLoader, FolderLoader, build_test_loader, load_dataset
from experiment.distributed import World, wrap_ddp
from experiment.errors import UserError
from experiment.models import model_from_checkpoint
from experiment.evaluation import evaluate


def torchrun(script, *args, nproc=2, cwd=ROOT, env=None, timeout=300):
    """`torchrun --standalone --nproc_per_node=<nproc> <script> <args>`; returns the CompletedProcess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script), *map(str, args)]
    proc = subprocess.run(command, cwd=cwd, text=True, capture_output=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 2-process training run started in an empty directory with the default (Hydra-named) run directory;
    the processes' temp folder is a directory of its own, so anything a rank leaves there is seen. Epoch 1
    saves last.pt without an evaluation, so is not the best: saving stays in step on all ranks. A validation
    split picks best.pt, so both the sharded validation and the final test score are exercised."""
    cwd, scratch = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("scratch")
    proc = torchrun("train.py", *TINY, "trainer.epochs=2", "trainer.eval_every=2", "dataset.val_split=0.2", cwd=cwd,
                    env={"TMPDIR": str(scratch)})
    runs = list((cwd / "outputs" / "runs").iterdir())
    return cwd, scratch, runs, proc


def test_two_processes_leave_exactly_one_run_directory(ddp_run):
    cwd, scratch, runs, proc = ddp_run
    assert [p.name for p in cwd.iterdir()] == ["outputs"] and [p.name for p in (cwd / "outputs").iterdir()] == ["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert sorted(p.name for p in run.iterdir() if p.is_file() and not p.name.startswith("events.")) == [
        ".alexnet-ac-run", "config.yaml", "metrics.json", "train.log"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # only rank 0 writes TensorBoard events
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    # ranks other than 0 got a scratch directory from experiment/run_dir.py and wrote nothing into it
    assert all(p.is_dir() for p in scratch.rglob("alexnet-ac-*")) and not list(scratch.rglob("alexnet-ac-*/*"))
    # one voice: the console and the log file carry each line once
    log = (run / "train.log").read_text()
    assert proc.stdout.count("epoch 2/2") == log.count("epoch 2/2") == 1
    assert "2 process(es)" in log


def test_validation_counts_every_held_out_sample_once_and_the_test_split_scores_best_pt(ddp_run):
    _, _, (run,), _ = ddp_run
    metrics = read_metrics(run)
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    model = model_from_checkpoint(ckpt)
    dataset = OmegaConf.create(ckpt["config"]["dataset"])
    data = load_dataset(dataset)

    def one_process(split):
        loader = build_test_loader(data, dataset, device=torch.device("cpu"), split=split)
        return evaluate(model, loader, num_classes=ckpt["num_classes"], device="cpu", world=World())

    val, test = one_process("val"), one_process("test")
    assert (val["num_samples"], test["num_samples"]) == (287, 360)
    last = metrics["history"][-1]
    assert last["val_acc1"] == pytest.approx(val["acc1"], abs=1e-9) == metrics["final_acc1"] == metrics["best_acc1"]
    assert last["val_acc5"] == pytest.approx(val["acc5"], abs=1e-9)
    assert last["val_loss"] == pytest.approx(val["loss"], rel=1e-5)
    assert metrics["selected_on"] == "val" and metrics["test_acc1"] == pytest.approx(test["acc1"], abs=1e-9)


def test_ddp_checkpoint_loads_in_one_process(ddp_run):
    _, _, (run,), _ = ddp_run
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert len(ckpt["rng"]) == 2  # one RNG state per rank, so a resume under torchrun continues each
    model_from_checkpoint(ckpt)  # strict load into experiment.models.build_model's network


@pytest.mark.slow
def test_ddp_checkpoint_resumes_in_one_process(ddp_run, tmp_path):
    _, _, (run,), _ = ddp_run
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["config"]["trainer"]["epochs"] = 3  # as if the 2-process run had been stopped after epoch 2 of 3
    torch.save(ckpt, copy / "checkpoints" / "last.pt")
    # a checkpoint copied out of its run continues in a new folder, not in the one it was copied to
    refused = run_script("train.py", f"resume={copy / 'checkpoints' / 'last.pt'}", check=False)
    assert refused.returncode == 2 and "pass hydra.run.dir=<a new folder>" in refused.stderr
    continued = tmp_path / "continued"
    proc = run_script("train.py", f"resume={copy / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={continued}")
    assert "1 process(es)" in proc.stdout
    metrics = read_metrics(continued)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    # only last.pt was copied: best.pt, picked on the validation split, cannot be scored, and says so
    assert metrics["test_acc1"] is None and "best.pt is missing" in proc.stderr + proc.stdout


def test_first_step_matches_one_process_with_the_same_global_batch(tmp_path):
    """Without SyncBatchNorm (it runs on GPUs only) each rank normalises with the statistics of its half of
    the global batch; one process computing BatchNorm per half of the same batch must give the same loss,
    gradients and updated weights: the shards are the halves of the single-process batch, DDP averages
    the gradients and the learning rate is not rescaled."""
    overrides = [*TINY, "model.dropout=0"]
    torchrun("tests/distributed_step.py", tmp_path / "ddp.pt", *overrides)
    _assert_same_step(torch.load(tmp_path / "ddp.pt", weights_only=True), first_step(overrides, chunks=2))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, SyncBatchNorm)")
def test_sync_bn_step_matches_one_process(tmp_path):
    overrides = [*TINY, "model.dropout=0", "trainer.device=cuda", "trainer.sync_bn=true"]
    torchrun("tests/distributed_step.py", tmp_path / "ddp.pt", *overrides)
    _assert_same_step(torch.load(tmp_path / "ddp.pt", weights_only=True), first_step(overrides))


def _assert_same_step(a, b):
    assert a["batch"] == b["batch"] == 64
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-5)
    for kind in ("grads", "params"):
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:  # float32: only the order of summation may differ
            scale = b[kind][name].abs().max().item()
            assert (a[kind][name] - b[kind][name]).abs().max().item() <= 1e-3 * scale, (kind, name)


def test_sync_bn_on_cpu_is_refused_with_a_clear_message():
    with pytest.raises(UserError, match="trainer.sync_bn=true needs GPUs"):
        wrap_ddp(torch.nn.BatchNorm2d(3), World(rank=0, size=2), torch.device("cpu"), sync_bn=True)


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def _loader(kind, images, labels, batch_size, train, rank, world_size):
    common = dict(train=train, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", seed=3, rank=rank,
                  world_size=world_size)
    if kind == "device":
        return DeviceLoader(images, labels, batch_size, crop_padding=2, **common)
    return FolderLoader(_Dataset(images, labels), batch_size, num_workers=0, **common)


@pytest.mark.parametrize("kind", ["device", "folder"])
def test_ranks_take_slices_of_the_single_process_batches(kind):
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50)
    single = _loader(kind, images, labels, 12, True, 0, 1)
    ranks = [_loader(kind, images, labels, 12, True, r, 3) for r in range(3)]
    assert [len(r) for r in ranks] == [len(single)] * 3 == [4] * 3
    for epoch, start in ((0, 0), (1, 2)):
        batches = list(single.epoch(epoch, start))
        sharded = list(zip(*(r.epoch(epoch, start) for r in ranks)))
        assert len(batches) == len(sharded) == 4 - start
        for (x, y), shards in zip(batches, sharded):
            assert all(len(ys) == 4 for _, ys in shards)
            assert torch.equal(torch.cat([ys for _, ys in shards]), y)
            assert torch.equal(torch.cat([xs for xs, _ in shards]), x)


@pytest.mark.parametrize("kind", ["device", "folder"])
def test_ranks_evaluate_every_sample_once(kind):
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50)
    seen = [y for r in range(3) for _, y in _loader(kind, images, labels, 8, False, r, 3).epoch(0)]
    assert torch.equal(torch.cat(seen).sort().values, labels)


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_stops_every_rank(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), *TINY, "trainer.epochs=50", "trainer.log_every=5",
               f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "run" / "train.log"
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "epoch 1/50" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not get through epoch 1"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
        proc.wait(timeout=60)  # a rank left waiting in a collective would hang here
    finally:
        proc.kill()
    assert "interrupted (SIGTERM)" in log.read_text()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] >= 1 and len(ckpt["rng"]) == 2


def test_slurm_launcher_config_fits_what_train_py_expects():
    """configs/hydra/launcher/slurm.yaml without the plugin installed (CI does not install it): it extends the
    schema of the plugin requirements-cluster.txt installs, asks for one process on one GPU per job (train.py
    is one process; several GPUs per run go through torchrun), leaves the plugin's early-warning signal before
    the time limit alone, and that signal (SIGUSR2) stops a run the way Ctrl-C does. (The names and types of
    the knobs are the plugin's to check, when a sweep composes the config with it installed.)"""
    import signal

    from experiment.training import StopRequest

    launcher = OmegaConf.load(ROOT / "configs" / "hydra" / "launcher" / "slurm.yaml")
    assert launcher.defaults == ["submitit_slurm"]
    requirements = (ROOT / "requirements-cluster.txt").read_text().splitlines()
    assert any(line.startswith("hydra-submitit-launcher") for line in requirements)
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1)
    assert launcher.timeout_min > 2  # train.py gets the warning 2 minutes before the limit
    assert not {"signal_delay_s", "max_num_timeout"} & launcher.keys()  # the plugin's defaults: SIGUSR2, 120 s
    with StopRequest(World(), torch.device("cpu")) as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop() and stop.signal == signal.SIGUSR2 and stop.exit_code == 128 + signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # handed back after the run


def test_train_entry_point_pickles_for_the_slurm_launcher():
    """The SLURM launcher (submitit) sends Hydra's task function to the job with cloudpickle."""
    cloudpickle = pytest.importorskip("cloudpickle")
    task_function = runpy.run_path(str(ROOT / "train.py"), run_name="train_script")["main"].__wrapped__
    cloudpickle.dumps(task_function)
