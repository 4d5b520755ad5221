"""Model-level fusion: every ACBlock back to one conv, then the model's deploy class.

One walker serves every model: a block made by `acify` becomes the conv it replaced (and its BN an
exact identity-plus-bias), any other block a biased conv; AlexNet and AlexNetAC then become AlexNet(bn=False).
"""

import copy

import torch
from torch import nn

from .acb import ACBlock, fuse_conv_bn
from .acify import conv_options
from .alexnet import AlexNet, AlexNetAC, AlexNetOptions

__all__ = ["fuse_conv_bn", "fuse_model", "reparameterize"]


def _conv(options: dict, kernel: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    conv = nn.Conv2d(**options, device=kernel.device, dtype=kernel.dtype)
    conv.weight.copy_(kernel)
    if conv.bias is not None:
        conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
    return conv


def _identity_plus_bias(options: dict, bias: torch.Tensor) -> nn.BatchNorm2d:
    """A BatchNorm2d whose eval form is exactly x + bias: scale 1, shift bias, mean 0, variance 1 - eps."""
    bn = nn.BatchNorm2d(**options, device=bias.device, dtype=bias.dtype)
    bn.bias.copy_(bias)
    bn.running_var.fill_(1 - bn.eps)
    return bn


def _block_as_conv(block: ACBlock) -> nn.Conv2d:
    return _conv(
        dict(in_channels=block.in_channels, out_channels=block.out_channels, kernel_size=block.kernel_size,
             stride=block.stride, padding=block.padding, dilation=block.dilation, groups=block.groups,
             padding_mode=block.padding_mode, bias=True),
        *block.get_equivalent_kernel_bias(),
    )


@torch.no_grad()
def _restore_convs(model: nn.Module) -> nn.Module:
    """Replace, in place, every ACBlock by one conv: what `acify` replaced (see above), else a biased conv."""
    if isinstance(model, ACBlock):  # nothing to replace it in
        return _block_as_conv(model)
    names = {id(module): name for name, module in model.named_modules()}
    # Collect first: the replacements edit the child dicts that named_modules() is walking.
    for name, block in [(n, m) for n, m in model.named_modules() if isinstance(m, ACBlock)]:
        replaced = getattr(block, "replaced", None)
        if replaced is None:
            model.set_submodule(name, _block_as_conv(block))
            continue
        kernel, bias = block.get_equivalent_kernel_bias()
        if replaced["bn"] is None:
            model.set_submodule(name, _conv(replaced["conv"], kernel, bias))
        else:  # the conv keeps its own bias (zero: it sits before a BN), the BN carries the fused one
            model.set_submodule(name, _conv(replaced["conv"], kernel, None))
            model.set_submodule(names[id(replaced["bn_slot"])], _identity_plus_bias(replaced["bn"], bias))
    return model


def _as_deploy_alexnet(model: nn.Module, options: AlexNetOptions) -> AlexNet:
    """An AlexNet-family model whose convs are plain (conv or conv+BN per block) -> AlexNet(bn=False)."""
    for block in model.features:
        if isinstance(block, nn.Sequential) and "bn" in block._modules:
            kernel, bias = fuse_conv_bn(block.conv, block.bn)
            block.conv = _conv({**conv_options(block.conv), "bias": True}, kernel, bias)
            del block.bn
    weight = next(model.parameters())
    deploy = options.deploy().build().to(device=weight.device, dtype=weight.dtype)
    deploy.load_state_dict(model.state_dict())
    return deploy


@torch.no_grad()
def fuse_model(model: nn.Module) -> nn.Module:
    """Return a new eval-mode deploy model equal to ``model`` in eval mode; ``model`` is not modified.

    AlexNet (with or without BN) and AlexNetAC give an ``AlexNet(bn=False)``. A model made by ``nets.acify``
    gives an instance of the class it was made from, whose state_dict loads with ``strict=True`` into a fresh
    instance of that class. Any other model gives an eval copy with its ACBlocks, if any, folded into biased convs.
    """
    fused = _restore_convs(copy.deepcopy(model))
    if isinstance(model, (AlexNet, AlexNetAC)):
        return _as_deploy_alexnet(fused, model.options).eval()
    return fused.eval()


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Switch every ACBlock inside an arbitrary module to its deploy form (a copy unless ``inplace``)."""
    if not inplace:
        model = copy.deepcopy(model)
    # Collect first: switch_to_deploy edits the child dicts that modules() is walking.
    for module in [m for m in model.modules() if isinstance(m, ACBlock)]:
        module.switch_to_deploy()
    return model
