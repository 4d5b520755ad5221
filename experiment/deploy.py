"""From a trained checkpoint to a deployable one: fuse, prove the fusion exact, export to ONNX."""
import contextlib
import copy
import logging

import torch

from experiment.errors import UserError
from experiment.models import deploy_config


def is_deploy(ckpt):
    return bool(ckpt.get("deploy"))


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


def export_onnx(model, example, path):
    """Export with a dynamic batch dimension."""
    from torch.export import Dim

    for name in ("onnxscript", "onnx_ir"):  # their optimiser narrates each pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=True, input_names=["images"],
                          output_names=["logits"], dynamic_shapes=({0: Dim("batch")},), external_data=False,
                          verbose=False)
    except ImportError as e:
        raise UserError(f"ONNX export needs the onnx and onnxscript packages ({e}); pip install -r requirements.txt") from None
    return path


def onnx_logit_difference(path, model, images):
    """Run the exported file with onnxruntime on `images`; compare with PyTorch as `logit_difference` does."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking the ONNX export needs onnxruntime; pip install -r requirements.txt") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {"images": images.cpu().numpy()})[0])
    with torch.no_grad():
        return compare_logits(model.eval()(images), onnx_logits)
