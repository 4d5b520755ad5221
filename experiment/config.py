"""Config values, checked once before any work: a wrong value ends in one line that names the key and what
it accepts, not in a traceback deep inside the run. A checkpoint's stored config passes the same checks and,
since a checkpoint is data from strangers, every name in it that picks code must come from a closed list, and
none of its strings is ever read as an OmegaConf interpolation (`literal_config`).

Why rules here and not Hydra structured configs (dataclass schemas in a ConfigStore): a schema's type error is
raised by Hydra before the entry point runs, as five lines and a HYDRA_FULL_ERROR hint, not one line;
a bool field takes `1` and `yes` (refused here: tests/test_experiment_config.py), an int field the string "7",
a float field nan; every rule below but the booleans and paths also bounds its value, which no type expresses; and
a checkpoint's stored config, plain containers read without Hydra, needs these checks anyway."""
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

from experiment.errors import UserError

_ABSENT = object()


def _whole(minimum, below=None):
    def check(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum and (below is None or v < below)
    return check, f"a whole number of at least {minimum}" + (f" and below {below:,}" if below else "")


def _number(low, high=math.inf, high_open=False, low_open=False):
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if high == math.inf:
        bound = f"above {low}" if low_open else f"of at least {low}"
    else:
        bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return check, f"a finite number {bound}"


def _optional(rule):
    check, accepts = rule
    if check(None):  # optional already: its text says so once
        return rule
    return (lambda v: v is None or check(v)), f"{accepts}, or null"


def _numbers(rule, length=None):
    """A list of numbers each passing `rule`, of `length` entries when given."""
    check, accepts = rule
    count = f"{length} " if length else ""

    def check_all(v):
        is_list = isinstance(v, (list, tuple)) or OmegaConf.is_list(v)
        return is_list and (length is None or len(v) == length) and all(check(x) for x in v)
    return check_all, f"a list of {count}finite numbers, each {accepts.removeprefix('a finite number ')}"


def _one_of(choices):
    return (lambda v: isinstance(v, str) and v in choices), f"one of: {', '.join(choices)}"


_BOOLEAN = (lambda v: isinstance(v, bool)), "true or false"
_PATH = (lambda v: isinstance(v, str) and v != ""), "a folder path"


IMAGE_CHANNELS = 3  # every loader of experiment.data yields RGB images
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")  # torch.compile's


TRAIN_RULES = {
    "seed": _whole(0, below=2**32),  # the data order's generator is seeded from seed * 100,003 + epoch
    "dataset.batch_size": _whole(1),
    "dataset.eval_batch_size": _whole(1),
    "dataset.image_size": _whole(1),
    "dataset.val_split": _number(0, 1, high_open=True),
    "dataset.crop_padding": _whole(0),
    "dataset.num_workers": _whole(0),
    "dataset.hflip": _BOOLEAN,
    "dataset.mean": _numbers(_number(0, 1), IMAGE_CHANNELS),  # per channel, on the 0..1 scale
    "dataset.std": _numbers(_number(0, low_open=True), IMAGE_CHANNELS),
    "dataset.root": _PATH,
    "dataset.download": _BOOLEAN,
    "dataset.num_classes": _whole(1),  # dataset=fake
    "dataset.train_size": _whole(1),
    "dataset.test_size": _whole(1),
    "dataset.verify_images": _BOOLEAN,
    "dataset.skip_bad_images": _BOOLEAN,
    "dataset.cache": _one_of(("auto", "off")),  # dataset=folder: decode once into a cache, or stream
    "dataset.cache_max_gb": _number(0),  # 0 never caches, as cache=off
    "dataset.cache_dir": _optional(_PATH),
    "model.width": _number(0, low_open=True),  # AlexNet's channel multiplier (inf: an OverflowError traceback)
    "model.classifier_width": _whole(1),  # 0 built a classifier of empty layers
    "model.dropout": _number(0, 1, high_open=True),  # nan was accepted by nn.Dropout
    "model.gamma_init": _optional(_number(0, low_open=True)),  # nan would surface only as a nan loss at step 1
    "trainer.epochs": _whole(1),
    "trainer.eval_every": _whole(1),
    "trainer.save_every": _whole(1),
    "trainer.log_every": _whole(1),
    "trainer.label_smoothing": _number(0, 1, high_open=True),
    "trainer.amp": _BOOLEAN,
    "trainer.channels_last": _BOOLEAN,
    "trainer.compile": _BOOLEAN,
    "trainer.compile_mode": _one_of(COMPILE_MODES),  # else torch.compile fails at the first step
    "trainer.progress": _BOOLEAN,
    "trainer.sync_bn": _BOOLEAN,
    "optimizer.lr": _number(0),
    "optimizer.weight_decay": _number(0),
    "optimizer.momentum": _number(0, 1, high_open=True),
    "optimizer.nesterov": _BOOLEAN,
    "scheduler.warmup_epochs": _number(0),
    "scheduler.warmup_start_factor": _number(0, 1),
    "scheduler.min_factor": _number(0, 1),
    "scheduler.start_factor": _number(0, 1),
    "scheduler.pct_start": _number(0, 1, high_open=True),
    "scheduler.gamma": _number(0),
    "scheduler.milestones": _numbers(_number(0, 1)),  # fractions of the steps after warm-up; -1 decays at step 0
}

# eval.py and fuse.py: the dataset overrides (null keeps the checkpoint's value), then each one's own options
_FILE = (lambda v: isinstance(v, str) and Path(v).name != ""), "a file path"  # not '', . or /: folders by name
_DATASET_OVERRIDES = {key: _optional(TRAIN_RULES[key]) for key in (
    "dataset.root", "dataset.download", "dataset.verify_images", "dataset.skip_bad_images", "dataset.eval_batch_size",
    "dataset.num_workers", "dataset.cache", "dataset.cache_dir")}
EVAL_RULES = {"ckpt": _FILE, "out": _optional(_FILE), "compare": _optional(_FILE), "amp": _BOOLEAN,
              **_DATASET_OVERRIDES}
FUSE_RULES = {"ckpt": _FILE, "out": _optional(_FILE), "onnx": _BOOLEAN, "check_batch": _whole(1),
              "tolerance": _number(0), **_DATASET_OVERRIDES}


def check_values(cfg, rules, where="", fix="fix that value"):
    """Every key of `rules` that `cfg` holds must pass its check; `where` says whose config it is, `fix` what to do."""
    for key, (check, accepts) in rules.items():
        value = _select(cfg, key)
        if value is _ABSENT:
            continue
        if not check(value):
            shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            raise UserError(f"{key}={shown!r}{where} is not valid: it must be {accepts}; {fix}")


def check_stored_config(config, path, training=False):
    """A checkpoint's stored config (plain containers) passes the command line's checks: a value edited into it
    is refused before it is used, as it would have been on train.py's command line. `training`: see
    `check_code_names`."""
    where = f" stored in {path}"
    check_code_names(config, where, training=training)
    check_values(config, TRAIN_RULES, where, fix="the file was edited or written by other code: use a checkpoint "
                                                  "written by train.py or fuse.py")


def literal_config(tree):
    """An OmegaConf config of the plain containers `tree` (a stored config) whose strings are all literal: each
    `${` is escaped, so reading a value gives back exactly the stored string. Without this a stored
    `${oc.env:...}` or `${run_dir:...}` would run a resolver (an interpolation is code), and a real path that
    contains `${` would fail to resolve."""
    return OmegaConf.create(escape_interpolations(tree))


def escape_interpolations(value):
    """`value` (plain containers, strings, numbers) with every `${` in its strings escaped for OmegaConf."""
    if isinstance(value, dict):
        return {k: escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape_interpolations(v) for v in value]
    if isinstance(value, str):  # OmegaConf's escape is `\${`; backslashes right before it escape each other
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return value


def _select(tree, key):
    """The value at a dotted `key` of an OmegaConf config or of plain dicts (a checkpoint's config), or _ABSENT."""
    if OmegaConf.is_config(tree):
        return OmegaConf.select(tree, key, default=_ABSENT)
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def check_train_config(cfg, where=""):
    """The config a run trains with (the command line's, or the stored one of a resumed run)."""
    check_values(cfg, TRAIN_RULES, where)
    check_code_names(cfg, where, training=True)


def check_code_names(config, where="", training=False):
    """Every config entry that picks code (model class, dataset loader, optimizer, schedule) names one of this
    repository's closed lists; `training` also requires the optimizer and schedule that resuming rebuilds."""
    from experiment.data import DATASETS
    from experiment.models import ARCHITECTURES, MODEL_SOURCES, torchvision_builders
    from experiment.optim import OPTIMIZERS, SCHEDULES

    source = _select(config, "model.source")
    if source not in (_ABSENT, None, *MODEL_SOURCES):
        raise UserError(f"model.source={source!r}{where} is not valid: it must be one of: {', '.join(MODEL_SOURCES)}")
    architectures = torchvision_builders() if source == "torchvision" else ARCHITECTURES
    needed = {"model.arch": _one_of(architectures), "model.name": ((lambda v: isinstance(v, str)), "a string"),
              "dataset.name": _one_of(DATASETS)}
    if training:
        needed |= {"optimizer._target_": _one_of(OPTIMIZERS), "scheduler.name": _one_of(SCHEDULES)}
    for key, (check, accepts) in needed.items():
        value = _select(config, key)
        if value is _ABSENT or value is None:
            raise UserError(f"the config{where} has no {key}; it was edited or written by other code: use a "
                            f"checkpoint written by train.py or fuse.py")
        if not check(value):
            raise UserError(f"{key}={value!r}{where} is not valid: it must be {accepts}")
