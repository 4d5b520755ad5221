import pytest
import torch
from torch import nn

from nets import ACBlock, AlexNet, AlexNetAC, AlexNetOptions

SMALL = dict(width=0.25, classifier_width=64)
# Smallest inputs that survive the three 3x3/2 max pools: 15 px (cifar layout), 63 px (imagenet layout).
MIN_PIXELS = {"cifar": 15, "imagenet": 63}


def _conv_blocks(model):
    return [block for name, block in model.features.named_children() if name.startswith("conv")]


@pytest.fixture(scope="module")
def default_alexnet():
    torch.manual_seed(0)
    return AlexNet()


def test_default_alexnet_is_the_seed_topology(default_alexnet):
    model = default_alexnet
    assert [name for name, _ in model.features.named_children()] == [
        "conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"
    ]
    convs = [block.conv for block in _conv_blocks(model)]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) for c in convs)
    assert all(c.bias is None for c in convs)
    blocks = _conv_blocks(model)
    assert all(isinstance(block.bn, nn.BatchNorm2d) and isinstance(block.relu, nn.ReLU) for block in blocks)
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3
    assert model.avgpool.output_size == 6
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(9216, 4096), (4096, 4096), (4096, 10)]
    assert [type(m) for m in model.classifier] == [
        nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear
    ]
    assert model.classifier[0].p == 0.5


def test_imagenet_layout_uses_torchvision_kernels():
    model = AlexNet(layout="imagenet", bn=False, **SMALL)
    convs = [block.conv for block in _conv_blocks(model)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)
    ]
    assert all(c.bias is not None for c in convs)
    assert [c.out_channels for c in convs] == [16, 48, 96, 64, 64]


def test_alexnet_ac_uses_acblocks_with_the_same_geometry():
    model = AlexNetAC(layout="imagenet", gamma_init=1 / 3, **SMALL)
    blocks = [block.conv for block in _conv_blocks(model)]
    assert all(isinstance(b, ACBlock) and not b.deploy for b in blocks)
    assert [(b.kernel_size, b.stride, b.padding) for b in blocks] == [
        (11, (4, 4), (2, 2)), (5, (1, 1), (2, 2)), (3, (1, 1), (1, 1)), (3, (1, 1), (1, 1)), (3, (1, 1), (1, 1))
    ]
    assert all(torch.all(b.hor_bn.weight == 1 / 3) for b in blocks)


@pytest.mark.parametrize("layout", sorted(MIN_PIXELS))
@pytest.mark.parametrize("build", [AlexNet, AlexNetAC, lambda **kw: AlexNet(bn=False, **kw)], ids=["bn", "ac", "plain"])
def test_forward_shape_at_smallest_input(build, layout):
    model = build(num_classes=7, layout=layout, **SMALL).eval()
    pixels = MIN_PIXELS[layout]
    assert model(torch.randn(2, 3, pixels, pixels)).shape == (2, 7)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, pixels - 1, pixels - 1))


def test_width_rounds_and_keeps_at_least_one_channel():
    model = AlexNet(width=0.001, classifier_width=8)
    assert [b.conv.out_channels for b in _conv_blocks(model)] == [1] * 5
    assert model.classifier[1].in_features == 36


def test_init(default_alexnet):
    conv = default_alexnet.features.conv3.conv
    # Kaiming normal, fan_out mode: std = sqrt(2 / (out_channels * k * k)).
    assert conv.weight.std().item() == pytest.approx((2 / (384 * 9)) ** 0.5, rel=0.02)
    linear = default_alexnet.classifier[1]
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.all(linear.bias == 0)
    bn = default_alexnet.features.conv1.bn
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert all(torch.all(b.conv.bias == 0) for b in _conv_blocks(AlexNet(bn=False, **SMALL)))


@pytest.mark.parametrize("build", [AlexNet, AlexNetAC])
def test_unknown_layout_names_the_choices(build):
    with pytest.raises(ValueError, match=r"unknown layout 'vgg'.*'cifar', 'imagenet'"):
        build(layout="vgg")


def test_non_positive_width_is_rejected():
    with pytest.raises(ValueError, match="width must be > 0"):
        AlexNet(width=0)


def test_options_record_constructor_options():
    plain, ac = AlexNet(5, layout="imagenet", bn=False, dropout=0.1, **SMALL), AlexNetAC(5, gamma_init=0.5, **SMALL)
    assert plain.options.kwargs() == dict(
        num_classes=5, layout="imagenet", width=0.25, classifier_width=64, dropout=0.1, bn=False
    )
    assert ac.options.kwargs() == dict(
        num_classes=5, layout="cifar", width=0.25, classifier_width=64, dropout=0.5, gamma_init=0.5
    )
    assert (plain.options.arch, ac.options.arch) == ("AlexNet", "AlexNetAC")
    assert type(ac.options.build()) is AlexNetAC and ac.options.build().options == ac.options
    assert ac.options.deploy() == AlexNetOptions(5, "cifar", 0.25, 64, 0.5, bn=False)


@pytest.mark.parametrize("options, says", [(dict(ac=True, bn=False), "AlexNetAC has no bn option"),
                                           (dict(gamma_init=0.5), "an option of AlexNetAC, not AlexNet")])
def test_options_refuse_what_the_class_cannot_take(options, says):
    with pytest.raises(ValueError, match=says):
        AlexNetOptions(**options)
