"""Turn the square convs of any CNN into ACBlocks, remembering what each replaced so fusion can restore it.

Which BN "follows" a conv is read from the model's traced forward (torch.fx): the conv's output feeds that
BN and nothing else, and each of the two modules is called once. A model fx cannot trace falls back to the
one order a module tree states on its own: a BN directly after the conv in an ``nn.Sequential``.
"""

import copy
import warnings

import torch
from torch import fx, nn

from .acb import ACBlock

__all__ = ["acify"]


def _absorbable_bn(module: nn.Module, conv: nn.Conv2d) -> bool:
    # Only a BN whose eval form is an affine map with learnable scale and shift can carry the fused bias back.
    return (
        type(module) is nn.BatchNorm2d
        and module.affine
        and module.track_running_stats
        and module.num_features == conv.out_channels
    )


def _traced_pairs(model: nn.Module) -> dict[str, str]:
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d) or len(node.users) != 1:
            continue
        (user,) = node.users
        if (
            user.op == "call_module"
            and isinstance(modules[user.target], nn.BatchNorm2d)
            and calls[node.target] == calls[user.target] == 1
        ):
            pairs[node.target] = user.target
    return pairs


def _sequential_pairs(model: nn.Module) -> dict[str, str]:
    pairs = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                if isinstance(module._modules[first], nn.Conv2d) and isinstance(module._modules[second], nn.BatchNorm2d):
                    pairs[f"{prefix}.{first}".lstrip(".")] = f"{prefix}.{second}".lstrip(".")
    return pairs


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """``{conv name: name of the BatchNorm2d that directly follows it}`` by the rule in the module docstring."""
    try:
        return _traced_pairs(model)
    except Exception:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...) on dynamic code
        return _sequential_pairs(model)


def _convertible(conv: nn.Module, kernel_sizes) -> bool:
    # Exactly nn.Conv2d: a subclass may compute something else (weight standardisation, ...).
    if type(conv) is not nn.Conv2d:
        return False
    kh, kw = conv.kernel_size
    return kh == kw and kh in kernel_sizes


def _block_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":  # odd kernel, stride 1 (PyTorch's rule for "same"): symmetric padding
        return tuple(d * (k // 2) for d, k in zip(conv.dilation, conv.kernel_size))
    return conv.padding


def conv_options(conv: nn.Conv2d) -> dict:
    """The constructor arguments that rebuild `conv` (without its weights)."""
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _bn_options(bn: nn.BatchNorm2d) -> dict:
    return dict(num_features=bn.num_features, eps=bn.eps, momentum=bn.momentum)


@torch.no_grad()
def acify(model: nn.Module, kernel_sizes=(3, 5), gamma_init: float | None = 1 / 3) -> nn.Module:
    """A copy of ``model`` with every square ``nn.Conv2d`` of a size in ``kernel_sizes`` an ``ACBlock``.

    A BN that directly follows such a conv (see the module docstring) is absorbed into the block and
    replaced by ``nn.Identity``; a conv without one converts only if it has a bias, which then holds the
    block's fused bias after ``fuse_model``. Strides, dilations, groups (depthwise) and padding modes are
    kept. Each block's square kernel starts from the conv's weights; ``gamma_init`` is the initial scale of
    the three branch BNs (1/3 as in the published CIFAR recipe; None: PyTorch's 1). Each block remembers
    what it replaced, so ``nets.fuse_model`` returns the original architecture. ``model`` is not modified;
    without a convertible conv the copy is plain, and a warning says so. Convs inside existing ACBlocks stay.
    """
    sizes = tuple(kernel_sizes) if isinstance(kernel_sizes, (tuple, list)) else (kernel_sizes,)
    if not sizes or any(not isinstance(k, int) or isinstance(k, bool) or k < 3 or k % 2 == 0 for k in sizes):
        raise ValueError(f"acify: kernel_sizes must be odd ints >= 3, got {kernel_sizes!r}")
    inside_blocks = {
        f"{prefix}.{name}".lstrip(".")
        for prefix, block in model.named_modules()
        if isinstance(block, ACBlock)
        for name, _ in block.named_modules()
    }
    modules = dict(model.named_modules())
    pairs = {c: b for c, b in conv_bn_pairs(model).items() if _absorbable_bn(modules[b], modules[c])}
    targets = [
        name
        for name, conv in modules.items()
        if name not in inside_blocks and _convertible(conv, sizes) and (name in pairs or conv.bias is not None)
    ]
    if not targets:
        warnings.warn(
            f"acify: {type(model).__name__} has no convertible conv (square, kernel in {sizes}, followed by a "
            "BatchNorm2d or with a bias); returned unchanged",
            stacklevel=2,
        )
        return copy.deepcopy(model)

    acified = copy.deepcopy(model)
    for name in targets:
        conv = acified.get_submodule(name)
        block = ACBlock(conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride,
                        padding=_block_padding(conv), dilation=conv.dilation, groups=conv.groups,
                        padding_mode=conv.padding_mode, gamma_init=gamma_init)
        block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        block.square_conv.weight.copy_(conv.weight)
        block.train(conv.training)
        # A plain dict attribute, not a registered module: the state_dict stays the block's own. deepcopy keeps
        # the reference to the Identity pointing at the copy's Identity, wherever the model is later nested.
        block.replaced = {"conv": conv_options(conv), "bn": None, "bn_slot": None}
        if name in pairs:
            bn = acified.get_submodule(pairs[name])
            slot = nn.Identity()
            block.replaced.update(bn=_bn_options(bn), bn_slot=slot)
            acified.set_submodule(pairs[name], slot)
        acified.set_submodule(name, block)
    return acified
