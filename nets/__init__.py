"""Networks of the AlexNet-AC experiment: pure PyTorch, importable into any project."""

from .acb import ACBlock
from .alexnet import AlexNet, AlexNetAC
from .fusion import fuse_model

__all__ = ["ACBlock", "AlexNet", "AlexNetAC", "fuse_model"]
