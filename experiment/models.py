"""Build a network from its config. A closed registry, not `hydra.utils.instantiate`: a model is rebuilt from
the config stored in a checkpoint, and a downloaded checkpoint must not be able to name any callable."""
import torch

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


def deploy_config(name, fused_model):
    """The `model` config section that rebuilds `fused_model`, what `nets.fuse_model` returned for model `name`."""
    options = {k: v for k, v in fused_model.config.items() if k != "num_classes"}
    return {"name": f"{name}_deploy", "arch": type(fused_model).__name__, **options}


def check_input_fits(model, images, name):
    """One forward pass of `images` in eval mode (no statistics updated, no random numbers drawn): a model
    whose layout does not fit the image size fails here with one line, not in the first training step."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(images)
    except RuntimeError as e:
        raise UserError(f"model {name} does not fit {images.shape[-2]}x{images.shape[-1]} images "
                        f"({str(e).splitlines()[0][:100]}); the imagenet layout needs at least 63 pixels: use "
                        f"model=alexnet or alexnet_ac for 32-pixel data") from None
    finally:
        model.train(was_training)


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
