"""Every config composes, builds what it names, and documents each option."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, TINY, compose_main, run_main
from experiment.models import build_model
from experiment.optim import build_optimizer, build_scheduler, lr_factor
from nets import ACBlock, AlexNet, AlexNetAC

CONFIGS = ROOT / "configs"


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("model", [m for m in options("model") if m != "torchvision"])
def test_every_model_config_builds_its_network(model):
    cfg = compose_train(f"model={model}", "model.width=0.125", "model.classifier_width=16")
    net = build_model(cfg.model, num_classes=10)
    assert isinstance(net, AlexNetAC if "_ac" in model else AlexNet)
    assert net.options.layout == ("imagenet" if model.endswith("imagenet") else "cifar")


@pytest.mark.parametrize("model", [m for m in options("model") if "_ac" in m])
def test_every_ac_config_starts_each_branch_bn_at_one_third(model):
    """Three summed BN branches at scale 1 start at three times one BN's variance; 1/3 each keeps the sum at 1."""
    def branch_scales(*overrides):
        cfg = compose_train(f"model={model}", "model.width=0.125", "model.classifier_width=16", *overrides)
        blocks = [m for m in build_model(cfg.model, num_classes=10).modules() if isinstance(m, ACBlock)]
        assert len(blocks) == 5
        return torch.cat([bn.weight for b in blocks for bn in (b.square_bn, b.ver_bn, b.hor_bn)]).unique().tolist()

    assert branch_scales() == [pytest.approx(1 / 3)]
    assert branch_scales("model.gamma_init=1") == [1.0]  # the seed's plain block


@pytest.mark.parametrize("ac", [False, True])
def test_torchvision_config_names_the_run_and_builds_the_builders_class(ac):
    cfg = compose_train("model=torchvision", "model.arch=mobilenet_v2", f"model.ac={str(ac).lower()}")
    assert cfg.model.name == ("mobilenet_v2_ac" if ac else "mobilenet_v2")
    assert cfg.model.gamma_init == pytest.approx(1 / 3)
    net = build_model(cfg.model, num_classes=7)
    assert type(net) is torchvision.models.MobileNetV2 and net.classifier[-1].out_features == 7
    assert any(isinstance(m, ACBlock) for m in net.modules()) == ac


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_every_optimizer_and_schedule_builds(optimizer, scheduler):
    cfg = compose_train(f"optimizer={optimizer}", f"scheduler={scheduler}", "model.width=0.125",
                        "model.classifier_width=16")
    net = build_model(cfg.model, num_classes=10)
    opt = build_optimizer(net, cfg.optimizer)
    sched = build_scheduler(opt, cfg.scheduler, epochs=2, steps_per_epoch=5)
    first = lr_factor(cfg.scheduler, 0, total_steps=10, steps_per_epoch=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr * first) and sched.last_epoch == 0
    assert opt.param_groups[1]["weight_decay"] == 0.0  # BN and bias parameters are not decayed


@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_dataset_config_has_what_the_loaders_read(dataset):
    cfg = compose_train(f"dataset={dataset}")
    assert cfg.dataset.name == dataset
    for key in ("batch_size", "eval_batch_size", "mean", "std"):
        assert key in cfg.dataset, key


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_experiment_preset_composes(preset):
    cfg = compose_train(f"experiment={preset}")
    OmegaConf.resolve(cfg)


def test_published_cifar_recipe():
    ac = compose_train("experiment=cifar_acnet", "model=alexnet_ac")
    assert ac.dataset.name == "cifar10" and ac.dataset.batch_size == 128
    assert (ac.optimizer.lr, ac.optimizer.momentum, ac.optimizer.weight_decay) == (0.1, 0.9, 1e-4)
    assert ac.scheduler.name == "cosine" and ac.scheduler.min_factor == 0 and ac.scheduler.warmup_epochs == 0
    assert ac.model.gamma_init == pytest.approx(1 / 3)
    base = compose_train("experiment=cifar_acnet", "model=alexnet")
    assert "gamma_init" not in base.model
    # the two arms differ in the model section only
    def without_model(cfg):
        return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in cfg.items() if k not in ("model", "hydra")}

    assert without_model(ac) == without_model(base)


def test_run_directories_are_readable_and_unique(tmp_path, monkeypatch):
    cfg = compose_train("model=alexnet", "dataset=digits", "seed=3")
    run_dir = cfg.hydra.run.dir
    assert run_dir.startswith("outputs/") and run_dir.endswith("_alexnet_digits_seed3")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}_${model.name}_${dataset.name}_seed${seed}"
    # Two runs of the same command started in the same second each get a directory of their own. Hydra stamps
    # a run's start time into its directory name when it resolves that name, the first thing a run does: both
    # are composed first (the slow part), then started back to back; a slow machine that crosses a second
    # boundary between them gets another try. Both then claim their directory and write their config there,
    # and stop (the batch is larger than the data set).
    command = [*TINY, "model=alexnet", "seed=3", "dataset.batch_size=5000"]
    for attempt in range(5):
        cwd = tmp_path / str(attempt)
        cwd.mkdir()
        monkeypatch.chdir(cwd)  # the default run directory is relative: outputs/runs/<start time>_...
        runs = [compose_main("train.py", *command) for _ in range(2)]
        names = [Path(cfg.hydra.run.dir).name for cfg in runs]  # the start: names resolved, directories made
        if len({name[:len("2000-01-01_00-00-00")] for name in names}) == 1:
            break
    else:
        pytest.fail("no two runs started within the same second in 5 tries")
    for cfg in runs:
        proc = run_main("train.py", *command, composed=cfg, check=False)
        assert proc.returncode == 2 and "is larger than the 1437 training samples" in proc.stderr, proc.stderr
    assert names[0] != names[1] and all(name.endswith("_alexnet_digits_seed3") for name in names), names
    assert sorted(p.name for p in (cwd / "outputs" / "runs").iterdir()) == sorted(names)
    for name in names:
        assert (cwd / "outputs" / "runs" / name / "config.yaml").is_file()
        assert f"run directory: {cwd / 'outputs' / 'runs' / name}" in (cwd / "outputs/runs" / name / "train.log").read_text()


def test_resume_sends_the_run_back_to_its_own_directory(tmp_path):
    cfg = compose_train(f"resume={tmp_path}/run/checkpoints/last.pt")
    assert cfg.hydra.run.dir == str(tmp_path / "run")


def test_every_option_carries_a_comment():
    missing = []
    for path in CONFIGS.rglob("*.yaml"):
        if "hydra" in path.relative_to(CONFIGS).parts:
            continue  # Hydra's own logging schema
        in_hydra_section = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^hydra:", line):
                in_hydra_section = True
            elif re.match(r"^\S", line):
                in_hydra_section = False
            is_option = re.match(r"^\s*[A-Za-z_][\w.]*:\s*\S", line) and not line.lstrip().startswith("#")
            if is_option and not in_hydra_section and "#" not in line and not line.strip().startswith("- "):
                missing.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not missing, "options without a comment:\n" + "\n".join(missing)


def test_resolvers_are_registered_by_the_entry_point_and_eval_and_fuse_load_no_training_code():
    """Importing experiment/ registers no OmegaConf resolver (train.py calls register_resolvers); eval.py and
    fuse.py load neither the training module nor train.py's resolvers."""
    names = ("run_dir", "log_file", "model_run_name")
    code = ("import runpy, sys\nfrom omegaconf import OmegaConf\n"
            "import experiment.checkpoint, experiment.models, experiment.run_dir, experiment.data\n"
            f"print([OmegaConf.has_resolver(n) for n in {names!r}])\n"
            "for script in ('eval.py', 'fuse.py'):\n"
            "    runpy.run_path(script, run_name='loaded')\n"
            f"print('experiment.training' in sys.modules, [OmegaConf.has_resolver(n) for n in {names!r}])\n"
            "runpy.run_path('train.py', run_name='loaded')\n"
            f"print([OmegaConf.has_resolver(n) for n in {names!r}])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["[False, False, False]", "False [False, False, False]", "[True, True, True]"]
