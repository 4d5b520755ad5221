"""Networks of the AlexNet-AC experiment, and ACBlocks for any CNN (`acify`): pure PyTorch, importable anywhere."""

from .acb import ACBlock
from .acify import acify
from .alexnet import AlexNet, AlexNetAC, AlexNetOptions
from .fusion import fuse_model

__all__ = ["ACBlock", "acify", "AlexNet", "AlexNetAC", "AlexNetOptions", "fuse_model"]
