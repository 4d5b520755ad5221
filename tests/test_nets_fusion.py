import pytest
import torch
from torch import nn

from experiment.complexity import count_macs
from nets import ACBlock, AlexNet, AlexNetAC, fuse_model
from nets.fusion import fuse_conv_bn, reparameterize

OPTIONS = dict(num_classes=7, width=0.25, classifier_width=64, dropout=0.3)
PIXELS = {"cifar": 32, "imagenet": 65}  # odd on purpose; 63 px is the imagenet layout's minimum


def _randomise_bn(model):
    """Random running statistics and affine parameters, as after training (never the 0/1 defaults)."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
                bn.num_batches_tracked.fill_(100)


def _trained(build, layout):
    torch.manual_seed(0)
    model = build(layout=layout, **OPTIONS)
    _randomise_bn(model)
    return model.train()


def _rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("layout", sorted(PIXELS))
@pytest.mark.parametrize("build", [AlexNet, AlexNetAC])
def test_fused_model_is_equivalent_deploy_alexnet(build, layout):
    model = _trained(build, layout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_model(model)

    # The input is left untouched, train mode included.
    assert model.training
    assert all(m.training for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    assert type(fused) is AlexNet and fused.options.kwargs() == dict(layout=layout, bn=False, **OPTIONS)
    assert not any(m.training for m in fused.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, ACBlock)) for m in fused.modules())

    x = torch.randn(8, 3, PIXELS[layout], PIXELS[layout])
    with torch.no_grad():
        expected = model.eval()(x)
        actual = fused(x)
    assert expected.abs().max() > 0
    assert _rel_err(expected, actual) <= 1e-5
    assert torch.equal(expected.argmax(1), actual.argmax(1))

    fresh = AlexNet(layout=layout, bn=False, **OPTIONS)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    size = (1, 3, PIXELS[layout], PIXELS[layout])
    if build is AlexNetAC:
        assert count_macs(model, size) > count_macs(fused, size)


def test_deploy_alexnet_input_gives_an_eval_copy():
    model = _trained(lambda **kw: AlexNet(bn=False, **kw), "cifar")
    fused = fuse_model(model)
    assert fused is not model and model.training and not fused.training
    assert fused.options == model.options
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(x), model.eval()(x))
    fused.features.conv1.conv.weight.data.zero_()
    assert model.features.conv1.conv.weight.abs().sum() > 0


def test_fused_model_keeps_device_and_dtype():
    model = _trained(AlexNetAC, "cifar").double().eval()
    fused = fuse_model(model)
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(model(x), fused(x)) <= 1e-12


def test_fuse_model_of_a_module_without_acblocks_is_an_equal_eval_copy():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    _randomise_bn(model)
    fused = fuse_model(model)
    assert fused is not model and model.training and not fused.training
    assert fused.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fused.state_dict().items())


def test_fuse_model_of_a_bare_acblock_is_its_biased_conv():
    torch.manual_seed(3)
    block = ACBlock(2, 4, 3, padding=1, groups=2)
    _randomise_bn(block)
    fused = fuse_model(block)
    assert type(fused) is nn.Conv2d and fused.groups == 2 and fused.bias is not None
    x = torch.randn(2, 2, 7, 7)
    with torch.no_grad():
        assert _rel_err(block.eval()(x), fused(x)) <= 1e-5


def test_fuse_conv_bn_matches_conv_then_bn():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = nn.BatchNorm2d(6).double()
    _randomise_bn(bn)
    bn.eval()
    kernel, bias = fuse_conv_bn(conv, bn)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    expected = bn(conv(x))
    actual = nn.functional.conv2d(x, kernel, bias, padding=1)
    assert _rel_err(expected, actual) <= 1e-12


def test_reparameterize_switches_every_acblock_in_a_custom_cnn():
    torch.manual_seed(2)
    model = nn.Sequential(
        ACBlock(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(ACBlock(8, 8, 5, padding=2, groups=8), nn.BatchNorm2d(8)),
    )
    _randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        expected = model(x)
        deployed = reparameterize(model)
        assert not any(b.deploy for b in model.modules() if isinstance(b, ACBlock))
        assert all(b.deploy for b in deployed.modules() if isinstance(b, ACBlock))
        assert _rel_err(expected, deployed(x)) <= 1e-5
        same = reparameterize(model, inplace=True)
        assert same is model and all(b.deploy for b in model.modules() if isinstance(b, ACBlock))
        assert _rel_err(expected, model(x)) <= 1e-5
