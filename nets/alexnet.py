"""AlexNet with plain conv(+BN) blocks, and AlexNetAC with every conv an ACBlock."""

from collections import OrderedDict
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .acb import ACBlock

CHANNELS = (64, 192, 384, 256, 256)
# (kernel, stride, padding) of conv1..conv5.
LAYOUTS = {
    "cifar": ((3, 1, 1),) * 5,  # the seed topology, for 32-pixel images
    "imagenet": ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)),  # torchvision's, for 224 px
}
POOL_AFTER = (1, 2, 5)


@dataclass(frozen=True)
class AlexNetOptions:
    """Everything that defines a network of the AlexNet family, as one value: a model keeps its own as
    ``model.options``, ``build()`` makes a fresh one and ``deploy()`` gives the options of its fused form."""

    num_classes: int = 10
    layout: str = "cifar"
    width: float = 1.0
    classifier_width: int = 4096
    dropout: float = 0.5
    ac: bool = False  # every conv an ACBlock (AlexNetAC) instead of conv(+BN) (AlexNet)
    bn: bool = True  # AlexNet: BN after each conv; False is the deploy form (biased convs). ACBlocks always have BN
    gamma_init: float | None = None  # AlexNetAC: initial BN scale of the three branches (None: 1)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {sorted(LAYOUTS)}")
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if self.ac and not self.bn:
            raise ValueError("AlexNetAC has no bn option: its ACBlocks always have BN (bn=False is AlexNet's deploy form)")
        if not self.ac and self.gamma_init is not None:
            raise ValueError("gamma_init sets the branch BN scales of ACBlocks: an option of AlexNetAC, not AlexNet")

    @property
    def arch(self):
        return "AlexNetAC" if self.ac else "AlexNet"

    def kwargs(self):
        """The keyword arguments of the class `arch` names: without the other class's option."""
        other = "bn" if self.ac else "gamma_init"
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("ac", other)}

    def build(self):
        return (AlexNetAC if self.ac else AlexNet)(**self.kwargs())

    def deploy(self):
        """The fused form: plain biased convs, no BN, the same topology and classifier."""
        return replace(self, ac=False, bn=False, gamma_init=None)


class _AlexNetBase(nn.Module):
    """The AlexNet topology shared by all variants; ``conv_block`` makes the conv(+norm) of a stage."""

    def __init__(self, conv_block, options):
        super().__init__()
        self.options = options
        num_classes, width, dropout = options.num_classes, options.width, options.dropout
        channels = [max(1, round(c * width)) for c in CHANNELS]
        layers = OrderedDict()
        in_channels = 3
        for i, (out_channels, (k, s, p)) in enumerate(zip(channels, LAYOUTS[options.layout]), start=1):
            layers[f"conv{i}"] = nn.Sequential(
                OrderedDict(conv_block(in_channels, out_channels, k, s, p) + [("relu", nn.ReLU(inplace=True))])
            )
            if i in POOL_AFTER:
                layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=3, stride=2)
            in_channels = out_channels
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_channels * 6 * 6, options.classifier_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(options.classifier_width, options.classifier_width),
            nn.ReLU(inplace=True),
            nn.Linear(options.classifier_width, num_classes),
        )
        for m in self.modules():
            # BatchNorm keeps PyTorch's default (weight 1, bias 0) so ACBlock's gamma_init survives.
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class AlexNet(_AlexNetBase):
    """AlexNet; ``bn=True`` is the BN baseline, ``bn=False`` (biased convs) the deploy form.

    ``layout="cifar"`` is the seed topology (3x3 convs); ``"imagenet"`` uses torchvision's kernels.
    ``width`` scales the conv channels, ``classifier_width`` the hidden linear layers.
    """

    def __init__(self, num_classes=10, layout="cifar", width=1.0, classifier_width=4096, dropout=0.5, bn=True):
        def conv_block(cin, cout, k, s, p):
            conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=not bn)
            return [("conv", conv), ("bn", nn.BatchNorm2d(cout))] if bn else [("conv", conv)]

        super().__init__(conv_block, AlexNetOptions(num_classes, layout, width, classifier_width, dropout, bn=bn))


class AlexNetAC(_AlexNetBase):
    """AlexNet with every conv an ACBlock; ``fuse_model`` turns it into ``AlexNet(bn=False)``."""

    def __init__(
        self, num_classes=10, layout="cifar", width=1.0, classifier_width=4096, dropout=0.5, gamma_init=None
    ):
        def conv_block(cin, cout, k, s, p):
            return [("conv", ACBlock(cin, cout, k, stride=s, padding=p, gamma_init=gamma_init))]

        super().__init__(conv_block, AlexNetOptions(num_classes, layout, width, classifier_width, dropout, ac=True,
                                                    gamma_init=gamma_init))
