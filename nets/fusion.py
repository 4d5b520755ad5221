"""Model-level fusion: trained AlexNet / AlexNetAC -> the deploy AlexNet(bn=False)."""

import copy

import torch
from torch import nn

from .acb import ACBlock, fuse_conv_bn
from .alexnet import AlexNet, AlexNetAC

__all__ = ["fuse_conv_bn", "fuse_model", "reparameterize"]


def _fold_block(block: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(block.conv, ACBlock):
        return block.conv.get_equivalent_kernel_bias()
    return fuse_conv_bn(block.conv, block.bn)


@torch.no_grad()
def fuse_model(model: nn.Module) -> AlexNet:
    """Return a new eval-mode ``AlexNet(bn=False)`` equal to ``model`` in eval mode.

    Accepts AlexNet (with or without BN) and AlexNetAC; ``model`` itself is not modified.
    """
    if isinstance(model, AlexNet) and not model.config["bn"]:
        return copy.deepcopy(model).eval()
    if not isinstance(model, (AlexNet, AlexNetAC)):
        raise TypeError(f"fuse_model expects an AlexNet or AlexNetAC, got {type(model).__name__}")
    options = {k: v for k, v in model.config.items() if k not in ("bn", "gamma_init")}
    weight = next(model.parameters())
    fused = AlexNet(**options, bn=False).to(device=weight.device, dtype=weight.dtype)
    for source, target in zip(model.features, fused.features):
        if isinstance(source, nn.Sequential):
            kernel, bias = _fold_block(source)
            target.conv.weight.copy_(kernel)
            target.conv.bias.copy_(bias)
    fused.classifier.load_state_dict(model.classifier.state_dict())
    return fused.eval()


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Switch every ACBlock inside an arbitrary module to its deploy form (a copy unless ``inplace``)."""
    if not inplace:
        model = copy.deepcopy(model)
    # Collect first: switch_to_deploy edits the child dicts that modules() is walking.
    for module in [m for m in model.modules() if isinstance(m, ACBlock)]:
        module.switch_to_deploy()
    return model
