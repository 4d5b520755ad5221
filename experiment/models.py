"""Networks from their config, and from a trained model to a deployable one.

A closed registry, not `hydra.utils.instantiate`: a model is rebuilt from the config stored in a checkpoint,
and a downloaded checkpoint must not be able to name any callable. Deploying fuses, proves the fusion exact
and exports to ONNX.
"""
import contextlib
import copy
import logging

import torch

from nets import AlexNetOptions, acify

from experiment.errors import UserError, choose, first_line


MODEL_SOURCES = ("torchvision",)  # model.source: where model.arch comes from (absent: ARCHITECTURES below)


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


def _alexnet(model_cfg, num_classes):
    """AlexNet or AlexNetAC: the config's options, checked as one `nets.AlexNetOptions`."""
    arch = model_cfg["arch"]
    options = {k: v for k, v in dict(model_cfg).items() if k not in ("name", "arch")}
    try:
        typed = AlexNetOptions(num_classes=num_classes, ac=arch == "AlexNetAC", **options)
        if extra := sorted(set(options) - set(typed.kwargs())):
            raise TypeError(f"{arch} has no option {', '.join(extra)}")
        return typed.build()
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {arch} from model options {options}: {e}") from None


# model.arch -> builder(model config, number of classes)
ARCHITECTURES = {"AlexNet": _alexnet, "AlexNetAC": _alexnet}


def build_model(model_cfg, num_classes):
    """`model_cfg` is the `model` section of a config: `name`, `arch` and the constructor's options."""
    if model_cfg.get("source") == "torchvision":
        return _torchvision_model(model_cfg, num_classes)
    return choose(ARCHITECTURES, model_cfg["arch"], "model.arch")(model_cfg, num_classes)


def deploy_config(model_cfg, fused_model):
    """The `model` config section that rebuilds `fused_model`, what `nets.fuse_model` returned for `model_cfg`."""
    name = model_cfg["name"]
    if model_cfg.get("source") == "torchvision":  # the fused model is the builder's own class, without ACBs
        return {**model_cfg, "name": f"{name}_deploy", "ac": False}
    options = fused_model.options
    return {"name": f"{name}_deploy", "arch": options.arch,
            **{k: v for k, v in options.kwargs().items() if k != "num_classes"}}


def check_input_fits(model, images, name):
    """One forward pass of `images` in eval mode (no statistics updated, no random numbers drawn): a model
    whose layout does not fit the image size fails here with one line, not in the first training step."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(images)
    except RuntimeError as e:
        imagenet = getattr(getattr(model, "options", None), "layout", None) == "imagenet"
        hint = ("the imagenet layout needs at least 63 pixels: use model=alexnet or alexnet_ac for 32-pixel data"
                if imagenet else "use larger images or another model")
        raise UserError(f"model {name} does not fit {images.shape[-2]}x{images.shape[-1]} images "
                        f"({first_line(e, 100)}); {hint}") from None
    finally:
        model.train(was_training)


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the network a checkpoint describes and load its weights (strict); weights that are not finite
    are refused: such a model's scores and fusion would mean nothing."""
    bad = [name for name, value in ckpt["model"].items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise UserError(f"the weights in {path} are not finite (nan or inf in {', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): the run diverged or the file is damaged; use an "
                        f"earlier checkpoint of the run")
    model = build_model(ckpt["config"]["model"], ckpt["num_classes"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"the weights in {path} do not fit the {ckpt['config']['model'].get('arch')} its config "
                        f"describes ({detail}); the file was edited or written by other code") from None
    return model


def deploy_checkpoint(ckpt, fused_model, source):
    """The deploy checkpoint: the fused weights and the config that rebuilds them, no training state."""
    config = copy.deepcopy(ckpt["config"])
    config["model"] = deploy_config(config["model"], fused_model)
    return {"model": fused_model.state_dict(), "config": config, "num_classes": ckpt["num_classes"],
            "classes": ckpt.get("classes"), "deploy": True, "source": str(source), "epoch": ckpt.get("epoch")}


@contextlib.contextmanager
def exact_float32():
    """True float32 arithmetic on CUDA: PyTorch runs cuDNN convolutions in TF32 by default, whose ~1e-3
    relative error would hide (or fake) a difference between a model and its fusion."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def compare_logits(reference, other):
    """Max absolute and relative (to the largest |reference logit|) difference and argmax agreement."""
    reference, other = reference.float().cpu(), other.float().cpu()
    abs_diff = (reference - other).abs().max().item()
    return {"max_abs": abs_diff, "max_rel": abs_diff / max(reference.abs().max().item(), 1e-12),
            "argmax_agree": (reference.argmax(1) == other.argmax(1)).float().mean().item(),
            "num_samples": len(reference)}


@torch.no_grad()
def logit_difference(model_a, model_b, images):
    with exact_float32():
        return compare_logits(model_a.eval()(images), model_b.eval()(images))


def export_onnx(model, example):
    """The ONNX model's bytes, with a dynamic batch dimension: kept in memory until every check has passed."""
    from torch.export import Dim

    for name in ("onnxscript", "onnx_ir"):  # their optimiser narrates each pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: Dim("batch")},), verbose=False)
    except ImportError as e:
        raise UserError(f"ONNX export needs the onnx and onnxscript packages ({e}); "
                        "pip install -r requirements.txt") from None
    return program.model_proto.SerializeToString()


def onnx_logit_difference(onnx_model, model, images):
    """Run the exported model (bytes) with onnxruntime on `images`; compare with PyTorch as `logit_difference` does."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking the ONNX export needs onnxruntime; pip install -r requirements.txt") from None
    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {"images": images.cpu().numpy()})[0])
    with torch.no_grad():
        return compare_logits(model.eval()(images), onnx_logits)
