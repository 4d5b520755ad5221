"""Build a network from its config. A closed registry, not `hydra.utils.instantiate`: a model is rebuilt from
the config stored in a checkpoint, and a downloaded checkpoint must not be able to name any callable."""
from nets import AlexNet, AlexNetAC

from experiment.errors import UserError

ARCHITECTURES = {"AlexNet": AlexNet, "AlexNetAC": AlexNetAC}


def build_model(model_cfg, num_classes):
    """`model_cfg` is the `model` section of a config: `name`, `arch` and the constructor's options."""
    options = {k: v for k, v in dict(model_cfg).items() if k not in ("name", "arch")}
    arch = model_cfg["arch"]
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown model.arch {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](num_classes=num_classes, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {arch} from model options {options}: {e}") from None


def deploy_config(model_cfg):
    """The `model` config section of the deploy form that `nets.fuse_model` returns: AlexNet without BN."""
    keep = ("layout", "width", "classifier_width", "dropout")
    cfg = {k: model_cfg[k] for k in keep if k in model_cfg}
    return {"name": f"{model_cfg['name']}_deploy", "arch": "AlexNet", **cfg, "bn": False}


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the network a checkpoint describes and load its weights (strict)."""
    model = build_model(ckpt["config"]["model"], ckpt["num_classes"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"the weights in {path} do not fit the {ckpt['config']['model'].get('arch')} its config "
                        f"describes ({detail}); the file was edited or written by other code") from None
    return model
