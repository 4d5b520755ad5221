"""experiment/config.py: every bad config value ends in one line naming the key; a stored config
names code only from closed lists."""
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT
from experiment.config import (EVAL_RULES, FUSE_RULES, check_code_names, check_train_config, check_values,
                               literal_config)
from experiment.errors import UserError


def train_config(*overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=["dataset=digits", *overrides])


def test_the_shipped_configs_pass():
    for dataset in ("cifar10", "cifar100", "digits", "fake"):
        for optimizer in ("sgd", "adamw"):
            check_train_config(train_config(f"dataset={dataset}", f"optimizer={optimizer}"))
    for model in ("alexnet", "alexnet_ac", "alexnet_imagenet", "alexnet_ac_imagenet", "torchvision"):
        check_train_config(train_config(f"model={model}"))
    for preset in ("scheduler=onecycle", "scheduler=multistep", "experiment=cifar_acnet", "experiment=digits_demo"):
        check_train_config(train_config(preset))


@pytest.mark.parametrize("model, says", [
    ({"name": "x", "source": "torchvision", "arch": "os.system"}, "model.arch='os.system'"),
    ({"name": "x", "source": "torchvision", "arch": "AlexNet"}, "model.arch='AlexNet'"),  # not a builder name
    ({"name": "x", "source": "os", "arch": "system"}, "model.source='os'"),
    ({"name": "x", "arch": "resnet18"}, "model.arch='resnet18'"),  # a builder only under source: torchvision
])
def test_torchvision_names_come_from_torchvision_builders_only(model, says):
    check_code_names({**STORED, "model": {"name": "x", "source": "torchvision", "arch": "resnet18"}})
    with pytest.raises(UserError, match=says):
        check_code_names({**STORED, "model": model})


@pytest.mark.parametrize("override", [
    "dataset.batch_size=0", "dataset.batch_size=-1", "dataset.batch_size=1.5", "dataset.eval_batch_size=0",
    "seed=abc", "seed=-1", "dataset.image_size=0", "trainer.label_smoothing=2", "trainer.label_smoothing=1",
    "trainer.label_smoothing=-0.1", "dataset.crop_padding=-1", "+dataset.num_workers=-1", "trainer.epochs=0",
    "trainer.eval_every=0", "optimizer.lr=-1", "optimizer.lr=nan", "dataset.hflip=maybe",
    # found in the second round: a huge seed overflowed the data-order generator, strings passed as switches
    "seed=4611686018427387904", "optimizer.momentum=-1", "optimizer.momentum=1.5", "optimizer.nesterov=yes",
    "trainer.amp=maybe", "trainer.compile=1", "scheduler.warmup_epochs=-1", "scheduler.min_factor=2",
    "dataset.val_split=1", "dataset.val_split=-0.1",
    # the third round: a traceback, or a silent mistake, further in
    "dataset.mean=[0,0]", "dataset.mean=abc", "dataset.std=[0.3,0.3,0]", "dataset.std=[0.3,0.3,nan]",
    "model.gamma_init=nan", "model.gamma_init=0", "model.gamma_init=abc",
    "scheduler=multistep scheduler.milestones=abc", "scheduler=multistep scheduler.milestones=[-1]",
    "scheduler=multistep scheduler.milestones=[0.5,2]",
    "dataset=folder dataset.root=5", "dataset=cifar10 dataset.download=maybe", "dataset=fake dataset.num_classes=0",
    "dataset=fake dataset.test_size=0", "model.width=inf", "model.width=0", "model.classifier_width=0",
    "model.dropout=nan", "model.dropout=1", "trainer.compile_mode=fastest",
    "dataset=folder dataset.cache=sometimes", "dataset=folder dataset.cache_max_gb=-1",
    "dataset=folder dataset.cache_dir=''",
])
def test_bad_train_values_name_the_key(override):
    *group, override = override.split()
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(UserError, match=f"^{re.escape(key)}=.* is not valid: it must be "):
        check_train_config(train_config(*group, override))


@pytest.mark.parametrize("cfg, key", [
    ({"check_batch": 0, "tolerance": 1e-3}, "check_batch"), ({"check_batch": -1, "tolerance": 1e-3}, "check_batch"),
    ({"check_batch": 4, "tolerance": "abc"}, "tolerance"), ({"check_batch": 4, "tolerance": -1.0}, "tolerance"),
])
def test_bad_fuse_values(cfg, key):
    with pytest.raises(UserError, match=f"^{key}="):
        check_values(cfg, FUSE_RULES)


def test_eval_overrides_may_be_null_but_not_zero():
    check_values({"dataset": {"eval_batch_size": None, "num_workers": None}}, EVAL_RULES)
    with pytest.raises(UserError, match="dataset.eval_batch_size=0"):
        check_values({"dataset": {"eval_batch_size": 0}}, EVAL_RULES)
    with pytest.raises(UserError, match="dataset.cache='sometimes' is not valid: it must be one of: auto, off"):
        check_values({"dataset": {"cache": "sometimes"}}, EVAL_RULES)
    with pytest.raises(UserError, match="dataset.verify_images='maybe' is not valid: it must be true or false"):
        check_values({"dataset": {"verify_images": "maybe"}}, EVAL_RULES)


def tool_config(tool, *overrides):
    """configs/eval.yaml or configs/fuse.yaml as the command line composes it."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(tool, overrides=["ckpt=run/checkpoints/best.pt", *overrides])


TOOL_RULES = {"eval": EVAL_RULES, "fuse": FUSE_RULES}


def test_the_shipped_eval_and_fuse_configs_pass():
    check_values(tool_config("eval", "compare=other.pt", "out=x.json", "amp=true"), EVAL_RULES)
    check_values(tool_config("fuse", "onnx=true", "out=x.pt"), FUSE_RULES)


@pytest.mark.parametrize("tool, override", [
    # a hands-on bug hunt: onnx=maybe exported an ONNX file, amp=maybe ran in bf16, ckpt=5 was a TypeError traceback
    ("fuse", "onnx=maybe"), ("fuse", "onnx=1"), ("fuse", "onnx=null"), ("eval", "amp=maybe"), ("eval", "amp=null"),
    ("fuse", "ckpt=5"), ("eval", "ckpt=5"), ("eval", "ckpt=''"), ("fuse", "ckpt=null"), ("fuse", "out=5"),
    ("eval", "out=5"), ("eval", "compare=true"), ("fuse", "check_batch=0"), ("fuse", "tolerance=nan"),
    ("eval", "out=."), ("fuse", "out=/"), ("eval", "compare=."),  # out=. was a ValueError traceback
    ("fuse", "dataset.download=maybe"), ("eval", "dataset.skip_bad_images=1"), ("fuse", "dataset.cache=sometimes"),
    ("eval", "dataset.eval_batch_size=0"), ("eval", "dataset.num_workers=-1"), ("fuse", "dataset.root=5"),
])
def test_bad_eval_and_fuse_values_name_the_key(tool, override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"^{re.escape(key)}=.* is not valid: it must be "):
        check_values(tool_config(tool, override), TOOL_RULES[tool])


def test_an_override_that_is_optional_already_says_null_once():
    """dataset.cache_dir may be null for training already: the eval/fuse override said "or null, or null"."""
    with pytest.raises(UserError, match=r"it must be a folder path, or null; fix that value$"):
        check_values(tool_config("eval", "dataset.cache_dir=''"), EVAL_RULES)


STORED = {"model": {"name": "alexnet", "arch": "AlexNet"}, "dataset": {"name": "digits"},
          "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1}, "scheduler": {"name": "cosine"}}


@pytest.mark.parametrize("key, value", [
    ("optimizer._target_", "os.system"), ("optimizer._target_", "numpy.savez"),
    ("optimizer._target_", "torch.optim.sgd"), ("model.arch", "os.system"), ("dataset.name", "../../etc"),
    ("scheduler.name", "builtins.exec"), ("model.arch", None), ("model.name", 3),
])
def test_stored_names_that_pick_code_come_from_closed_lists(key, value):
    section, name = key.split(".")
    stored = {**STORED, section: {**STORED[section], name: value}}
    check_code_names(STORED, training=True)
    with pytest.raises(UserError, match=key):
        check_code_names(stored, " stored in x.pt", training=True)


@pytest.mark.parametrize("section", ["model", "dataset"])
def test_stored_config_without_a_section(section):
    stored = {k: v for k, v in STORED.items() if k != section}
    with pytest.raises(UserError, match=f"has no {section}"):
        check_code_names(stored)


@pytest.mark.parametrize("value", ["${oc.env:PATH}", "/data/${run_dir:null,/tmp/x}", "a\\${b}", "a\\\\${b}",
                                   "${", "$${x}", "${a}${b}", "plain\\", "no interpolation"])
def test_a_literal_config_gives_back_its_strings_and_resolves_nothing(value):
    cfg = literal_config({"dataset": {"root": value, "mean": [value, 0.5]}})
    assert cfg.dataset.root == value and cfg.dataset.mean[0] == value
    assert OmegaConf.to_container(cfg, resolve=True) == {"dataset": {"root": value, "mean": [value, 0.5]}}
    assert OmegaConf.create(OmegaConf.to_yaml(cfg)).dataset.root == value  # config.yaml: read back the same


def test_gamma_init_may_be_null():
    check_train_config(train_config("model=alexnet"))  # gamma_init: null
    check_train_config(train_config("model=alexnet_ac", "model.gamma_init=0.5"))
