"""Build a network from its config. A closed registry, not `hydra.utils.instantiate`: a model is rebuilt from
the config stored in a checkpoint, and a downloaded checkpoint must not be able to name any callable."""
import torch
from omegaconf import OmegaConf

from nets import AlexNet, AlexNetAC, acify

from experiment.errors import UserError

ARCHITECTURES = {"AlexNet": AlexNet, "AlexNetAC": AlexNetAC}
MODEL_SOURCES = ("torchvision",)  # model.source: where model.arch comes from (absent: ARCHITECTURES above)
OmegaConf.register_new_resolver("model_run_name", lambda arch, ac: f"{arch}_ac" if ac else arch, replace=True)


def torchvision_builders():
    """The names model=torchvision accepts: torchvision's classification builders, a closed list."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_model(model_cfg, num_classes):
    import torchvision

    arch = model_cfg["arch"]
    if arch not in torchvision_builders():
        raise UserError(f"model.arch={arch!r} is not a torchvision classification builder; choose one of: "
                        f"{', '.join(torchvision_builders())}")
    if not isinstance(model_cfg.get("ac"), bool):
        raise UserError(f"model.ac={model_cfg.get('ac')!r} must be true or false")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if not model_cfg["ac"]:
        return model
    try:
        return acify(model, kernel_sizes=tuple(model_cfg.get("kernel_sizes", (3, 5))),
                     gamma_init=model_cfg.get("gamma_init"))
    except ValueError as e:
        raise UserError(f"model.kernel_sizes: {e}") from None


def build_model(model_cfg, num_classes):
    """`model_cfg` is the `model` section of a config: `name`, `arch` and the constructor's options."""
    if model_cfg.get("source") == "torchvision":
        return _torchvision_model(model_cfg, num_classes)
    options = {k: v for k, v in dict(model_cfg).items() if k not in ("name", "arch")}
    arch = model_cfg["arch"]
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown model.arch {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](num_classes=num_classes, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {arch} from model options {options}: {e}") from None


def deploy_config(model_cfg, fused_model):
    """The `model` config section that rebuilds `fused_model`, what `nets.fuse_model` returned for `model_cfg`."""
    name = model_cfg["name"]
    if model_cfg.get("source") == "torchvision":  # the fused model is the builder's own class, without ACBs
        return {**model_cfg, "name": f"{name}_deploy", "ac": False}
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
        hint = ("the imagenet layout needs at least 63 pixels: use model=alexnet or alexnet_ac for 32-pixel data"
                if getattr(model, "config", {}).get("layout") == "imagenet" else "use larger images or another model")
        raise UserError(f"model {name} does not fit {images.shape[-2]}x{images.shape[-1]} images "
                        f"({str(e).splitlines()[0][:100]}); {hint}") from None
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
