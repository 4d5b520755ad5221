"""Config values, checked once before any work: a wrong value ends in one line that names the key and what
it accepts, not in a traceback deep inside the run. A checkpoint's stored config passes the same checks and,
since a checkpoint is data from strangers, every name in it that picks code must come from a closed list."""
import math

from omegaconf import OmegaConf

from experiment.errors import UserError

_ABSENT = object()


def _whole(minimum, below=None):
    def check(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum and (below is None or v < below)
    return check, f"a whole number of at least {minimum}" + (f" and below {below:,}" if below else "")


def _number(low, high=math.inf, high_open=False):
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low
        return ok and (v < high if high_open else v <= high)
    bound = f"in [{low}, {high})" if high_open else (f"of at least {low}" if high == math.inf else f"in [{low}, {high}]")
    return check, f"a number {bound}"


def _boolean():
    return (lambda v: isinstance(v, bool)), "true or false"


TRAIN_RULES = {
    "seed": _whole(0, below=2**32),  # the data order's generator is seeded from seed * 100,003 + epoch
    "dataset.batch_size": _whole(1),
    "dataset.eval_batch_size": _whole(1),
    "dataset.image_size": _whole(1),
    "dataset.val_split": _number(0, 1, high_open=True),
    "dataset.crop_padding": _whole(0),
    "dataset.num_workers": _whole(0),
    "dataset.hflip": _boolean(),
    "trainer.epochs": _whole(1),
    "trainer.eval_every": _whole(1),
    "trainer.save_every": _whole(1),
    "trainer.log_every": _whole(1),
    "trainer.label_smoothing": _number(0, 1, high_open=True),
    "trainer.amp": _boolean(),
    "trainer.channels_last": _boolean(),
    "trainer.compile": _boolean(),
    "trainer.progress": _boolean(),
    "trainer.sync_bn": _boolean(),
    "optimizer.lr": _number(0),
    "optimizer.weight_decay": _number(0),
    "optimizer.momentum": _number(0, 1, high_open=True),
    "optimizer.nesterov": _boolean(),
    "scheduler.warmup_epochs": _number(0),
    "scheduler.warmup_start_factor": _number(0, 1),
    "scheduler.min_factor": _number(0, 1),
    "scheduler.start_factor": _number(0, 1),
    "scheduler.pct_start": _number(0, 1, high_open=True),
    "scheduler.gamma": _number(0),
}

# eval.py and fuse.py: their own options, and the dataset overrides (null keeps the checkpoint's value)
EVAL_RULES = {"dataset.eval_batch_size": _whole(1), "dataset.num_workers": _whole(0)}
FUSE_RULES = {"check_batch": _whole(1), "tolerance": _number(0)}


def check_values(cfg, rules, where="", allow_null=False):
    """Every key of `rules` that `cfg` holds must pass its check; `where` says whose config it is."""
    for key, (check, accepts) in rules.items():
        value = _select(cfg, key)
        if value is _ABSENT or (value is None and allow_null):
            continue
        if not check(value):
            raise UserError(f"{key}={value!r}{where} is not valid: it must be {accepts}; fix that value")


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
    needed = [("model.arch", architectures), ("model.name", None), ("dataset.name", DATASETS)]
    if training:
        needed += [("optimizer._target_", OPTIMIZERS), ("scheduler.name", SCHEDULES)]
    for key, choices in needed:
        value = _select(config, key)
        if value is _ABSENT or value is None:
            raise UserError(f"the config{where} has no {key}; it was edited or written by other code: use a "
                            f"checkpoint written by train.py or fuse.py")
        if choices is None:
            if not isinstance(value, str):
                raise UserError(f"{key}={value!r}{where} is not valid: it must be a string")
        elif not isinstance(value, str) or value not in choices:
            raise UserError(f"{key}={value!r}{where} is not valid: it must be one of: {', '.join(choices)}")
