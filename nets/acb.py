"""Asymmetric Convolution Block (ACNet, Ding et al., ICCV 2019) and its exact fold into one conv."""

import torch
import torch.nn.functional as F
from torch import nn

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it; returns (kernel, bias).

    Uses the running statistics, so the result matches ``bn(conv(x))`` only in eval mode.
    """
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
    kernel = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = beta + (conv_bias - bn.running_mean) * scale
    return kernel, bias


def _int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        raise ValueError(f"ACBlock: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"ACBlock: {name} must be >= {minimum}, got {value!r}")
    return tuple(pair)


def _crop(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return x[..., rows : x.shape[-2] - rows, cols : x.shape[-1] - cols]


class ACBlock(nn.Module):
    """KxK conv-BN plus Kx1 and 1xK conv-BN branches, summed; foldable into one biased KxK conv.

    The Kx1 and 1xK kernels sit on the centre column and row of the KxK kernel (dilation included),
    so ``switch_to_deploy()`` is exact for every padding mode, stride, dilation and grouping accepted
    here. The fold uses BN running statistics: it equals the training form in eval mode only.
    Submodule names follow the published ACNet code, so its state_dicts load directly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        gamma_init: float | None = None,
    ):
        super().__init__()
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool):
            raise ValueError(f"ACBlock: kernel_size must be an int (square kernel), got {kernel_size!r}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            # An even kernel has no centre row/column to host the 1D branches; K=1 has no 1D branches.
            raise ValueError(f"ACBlock: kernel_size must be odd and >= 3, got {kernel_size}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"ACBlock: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"ACBlock: groups={groups} must be >= 1 and divide in_channels={in_channels} "
                f"and out_channels={out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _int_pair("stride", stride, 1)
        self.padding = _int_pair("padding", padding, 0)
        self.dilation = _int_pair("dilation", dilation, 1)
        self.groups = groups
        self.padding_mode = padding_mode
        self.deploy = deploy

        if deploy:
            self.fused_conv = self._fused_conv()
            return

        # Zero padding stays inside the convs (the fast path). Other modes pad the input once in
        # forward(), shared by the three branches: they pad each axis independently, so a crop of that
        # padded input is exactly what the square kernel's centre column or row sees.
        ph, pw = self.padding if padding_mode == "zeros" else (0, 0)
        ch, cw = (d * (kernel_size // 2) for d in self.dilation)  # centre offset of the dilated window
        # Shifted by the centre offset, a 1D branch needs less padding, or a crop where padding < offset.
        self._ver_crop = max(cw - pw, 0)
        self._hor_crop = max(ch - ph, 0)
        k = kernel_size
        conv = dict(stride=self.stride, dilation=self.dilation, groups=groups, bias=False)
        self.square_conv = nn.Conv2d(in_channels, out_channels, (k, k), padding=(ph, pw), **conv)
        self.square_bn = nn.BatchNorm2d(out_channels)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (k, 1), padding=(ph, max(pw - cw, 0)), **conv)
        self.ver_bn = nn.BatchNorm2d(out_channels)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, k), padding=(max(ph - ch, 0), pw), **conv)
        self.hor_bn = nn.BatchNorm2d(out_channels)
        if gamma_init is not None:
            for bn in (self.square_bn, self.ver_bn, self.hor_bn):
                nn.init.constant_(bn.weight, gamma_init)

    def _fused_conv(self, **factory) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            padding_mode=self.padding_mode,
            **factory,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.fused_conv(x)
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
        square = self.square_bn(self.square_conv(x))
        ver = self.ver_bn(self.ver_conv(_crop(x, 0, self._ver_crop)))
        hor = self.hor_bn(self.hor_conv(_crop(x, self._hor_crop, 0)))
        return square + ver + hor

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (kernel, bias) of the single KxK conv equal to this block in eval mode."""
        if self.deploy:
            return self.fused_conv.weight, self.fused_conv.bias
        kernel, bias = fuse_conv_bn(self.square_conv, self.square_bn)
        ver_kernel, ver_bias = fuse_conv_bn(self.ver_conv, self.ver_bn)
        hor_kernel, hor_bias = fuse_conv_bn(self.hor_conv, self.hor_bn)
        c = self.kernel_size // 2
        kernel[:, :, :, c : c + 1] += ver_kernel
        kernel[:, :, c : c + 1, :] += hor_kernel
        return kernel, bias + ver_bias + hor_bias

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace the three branches by one biased conv ``fused_conv``, in place; idempotent."""
        if self.deploy:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        self.fused_conv = self._fused_conv(device=kernel.device, dtype=kernel.dtype)
        self.fused_conv.weight.copy_(kernel)
        self.fused_conv.bias.copy_(bias)
        for name in ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn"):
            delattr(self, name)
        del self._ver_crop, self._hor_crop
        self.deploy = True

    def extra_repr(self) -> str:
        return f"deploy={self.deploy}"
