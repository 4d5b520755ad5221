import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from nets import ACBlock, AlexNet, AlexNetAC, acify, fuse_model


class SmallNet(nn.Module):
    """Every case acify decides on: ResNet-style conv/bn attributes, Sequentials, strides, dilation, groups,
    padding modes, a biased conv before a ReLU, and convs that must stay plain."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.stage = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 5, padding=4, dilation=2, padding_mode="reflect"), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 12, 3, padding="same"), nn.ReLU(),  # biased, no BN: the fused bias goes here
            nn.Conv2d(12, 12, 1, bias=False), nn.BatchNorm2d(12),  # 1x1: not an ACB
        )
        self.plain = nn.Conv2d(12, 12, 3, padding=1, bias=False)  # no BN, no bias: nowhere to put a fused bias
        self.shortcut_bn = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stage(x)
        x = self.shortcut_bn(self.plain(x) + x)  # a BN after a sum does not follow the conv
        return self.head(x.mean((2, 3)))


def _vgg11_bn(num_classes=10):
    model = torchvision.models.vgg11_bn(num_classes=num_classes)
    model.classifier = nn.Linear(512 * 7 * 7, num_classes)  # the 100 M-parameter head says nothing here
    return model


BUILDERS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "vgg11_bn": _vgg11_bn,  # biased convs before BN
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),  # depthwise
    "small": SmallNet,
}
# MobileNetV2 a few steps into training runs at float32's noise floor: measured over seeds, the AC model's
# own float32 logits are 0.5-1.5e-5 (relative) away from its float64 logits, so two float32 computations of
# the same function cannot agree to 1e-5. Its fusion is checked in float64 only (where it agrees to 1e-11).
FLOAT32_NOISE_FLOOR = {"mobilenet_v2"}
SLOW = {"resnet18", "vgg11_bn"}  # 5-10 s each on two CPU cores
# SmallNet's `plain` conv cannot convert; everything else square, 3x3 or 5x5, does.
NOT_CONVERTIBLE = {"small": {"plain"}}


def _convertible_names(model, name):
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size in ((3, 3), (5, 5))} - NOT_CONVERTIBLE.get(name, set())


def _rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(BUILDERS)])
def test_acify_trains_and_fuses_back_into_the_original_class(name):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bns_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    ac = acify(model)

    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, ACBlock) for m in model.modules())
    blocks = {n: m for n, m in ac.named_modules() if isinstance(m, ACBlock)}
    assert set(blocks) == _convertible_names(model, name)
    assert all(isinstance(ac.get_submodule(n), nn.Conv2d) for n in NOT_CONVERTIBLE.get(name, ()))
    absorbed = sum(b.replaced["bn"] is not None for b in blocks.values())
    assert sum(isinstance(m, nn.BatchNorm2d) and not isinstance(p, ACBlock)
               for p in ac.modules() for m in p.children()) == bns_before - absorbed
    assert all(torch.equal(b.square_bn.weight, torch.full_like(b.square_bn.weight, 1 / 3)) for b in blocks.values())

    # A few training steps move weights, BN scales and running statistics away from their initial values.
    optimizer = torch.optim.SGD(ac.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ac.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(ac(x), y)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b.ver_bn.running_var, torch.ones_like(b.ver_bn.running_var)) for b in blocks.values())

    fused = fuse_model(ac)
    assert type(fused) is type(model) and not fused.training and ac.training
    assert not any(isinstance(m, ACBlock) for m in fused.modules())
    fresh = BUILDERS[name]()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(images), fresh.eval()(images))
        if name not in FLOAT32_NOISE_FLOOR:
            assert _rel_err(ac.eval()(images), fused(images)) <= 1e-5
        exact = copy.deepcopy(ac).double().eval()
        assert _rel_err(exact(images.double()), fuse_model(exact)(images.double())) <= 1e-10


def test_fused_bn_is_an_exact_identity_plus_bias():
    torch.manual_seed(1)
    ac = acify(torchvision.models.resnet18(num_classes=10))
    fused = fuse_model(ac)
    bn = fused.layer1[0].bn1
    assert fused.layer1[0].conv1.bias is None
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.running_mean, torch.zeros(64))
    assert torch.equal(bn.running_var, torch.full((64,), 1 - bn.eps))
    kernel, bias = ac.layer1[0].conv1.get_equivalent_kernel_bias()
    assert torch.equal(bn.bias, bias) and torch.equal(fused.layer1[0].conv1.weight, kernel)
    # the 7x7 stem is no ACB candidate: it and its BN come back as they were
    assert torch.equal(fused.conv1.weight, ac.conv1.weight) and torch.equal(fused.bn1.running_var, ac.bn1.running_var)


def test_conv_bias_before_bn_is_zero_after_fusion():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))  # as in VGG-BN
    fused = fuse_model(acify(model))
    assert isinstance(fused[1], nn.BatchNorm2d)
    assert fused[0].bias is not None and torch.equal(fused[0].bias, torch.zeros(4))


def test_fusion_finds_the_bn_slot_when_the_acified_model_is_wrapped():
    torch.manual_seed(3)
    ac = acify(SmallNet())
    wrapped = nn.Sequential(nn.Identity(), ac)
    fused = fuse_model(wrapped)
    assert type(fused[1]) is SmallNet
    SmallNet().load_state_dict(fused[1].state_dict(), strict=True)


def test_acify_options():
    model = SmallNet()
    only_5 = acify(model, kernel_sizes=(5,), gamma_init=None)
    blocks = [m for m in only_5.modules() if isinstance(m, ACBlock)]
    assert len(blocks) == 1 and blocks[0].kernel_size == 5
    assert torch.equal(blocks[0].hor_bn.weight, torch.ones(12))
    for bad in [(2,), (1, 3), (), 3.0, (True,)]:
        with pytest.raises(ValueError, match="kernel_sizes"):
            acify(model, kernel_sizes=bad)


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: only the Sequential states an order."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_pairs_only_sequential_neighbours():
    torch.manual_seed(4)
    ac = acify(Untraceable())
    assert isinstance(ac.body[0], ACBlock) and isinstance(ac.body[1], nn.Identity)
    assert type(ac.conv) is nn.Conv2d and type(ac.bn) is nn.BatchNorm2d
    ac(torch.randn(2, 3, 8, 8)).sum().backward()
    fused = fuse_model(ac)
    Untraceable().load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _rel_err(ac.eval()(x), fused(x)) <= 1e-5


@pytest.mark.parametrize("model", [nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.LazyLinear(2)),
                                   AlexNetAC(width=0.1, classifier_width=8)], ids=["1x1", "already_ac"])
def test_model_without_convertible_conv_comes_back_plain_with_a_warning(model):
    with pytest.warns(UserWarning, match="no convertible conv"):
        result = acify(model)
    assert result is not model and type(result) is type(model)
    assert result.state_dict().keys() == model.state_dict().keys()
    assert sum(isinstance(m, ACBlock) for m in result.modules()) == sum(isinstance(m, ACBlock) for m in model.modules())


def test_acified_alexnet_fuses_to_the_deploy_alexnet():
    torch.manual_seed(5)
    options = dict(num_classes=5, width=0.1, classifier_width=16)
    ac = acify(AlexNet(**options))
    assert sum(isinstance(m, ACBlock) for m in ac.modules()) == 5
    with torch.no_grad():
        for bn in (m for m in ac.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    fused = fuse_model(ac)
    assert type(fused) is AlexNet and fused.options.kwargs() == {**options, "layout": "cifar", "dropout": 0.5, "bn": False}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel_err(ac.eval()(x), fused(x)) <= 1e-5
