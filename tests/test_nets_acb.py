import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets import ACBlock

IN_CHANNELS, OUT_CHANNELS = 4, 8
MODES = ("zeros", "reflect", "replicate", "circular")
BRANCHES = ("square", "ver", "hor")


def _paddings(k):
    # With centre offset c = dilation * (k // 2): 0 < c always; k // 2 == c (d=1) and < c (d=2);
    # k - 1 > c (d=1) and == c (d=2); k + 1 > c. K=3 gets the whole range 0..K+1.
    return range(k + 2) if k == 3 else (0, k // 2, k - 1, k + 1)


def _grid():
    for k in (3, 5, 7, 11):
        for p, s, d, g in itertools.product(_paddings(k), (1, 2), (1, 2), (1, 2, IN_CHANNELS)):
            yield pytest.param(k, p, s, d, g, id=f"k{k}-p{p}-s{s}-d{d}-g{g}")


GRID = list(_grid())


def _input(k, d, dtype, batch=2):
    # Odd, non-square, large enough for the dilated kernel at p=0 and for reflect padding up to k+1.
    h = d * (k - 1) + 3
    return torch.randn(batch, IN_CHANNELS, h, h + 2, dtype=dtype)


def _randomise_bn(module):
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.5)


def _rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # The convolutions here are tiny: thread start-up and contention would dominate the run time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,p,s,d,g", GRID)
def test_deploy_matches_eval_output(k, p, s, d, g, mode):
    torch.manual_seed(0)
    for dtype, tolerance in TOLERANCE.items():
        block = ACBlock(IN_CHANNELS, OUT_CHANNELS, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
        block = block.to(dtype)
        _randomise_bn(block)
        block.eval()
        x = _input(k, d, dtype)
        with torch.no_grad():
            expected = block(x)
            block.switch_to_deploy()
            actual = block(x)
        assert block.deploy and isinstance(block.fused_conv, nn.Conv2d)
        assert actual.shape == expected.shape
        assert _rel_err(expected, actual) <= tolerance, dtype


def _embed(kernel, k):
    """Place a Kx1 or 1xK kernel on the centre column or row of a zero KxK kernel: the ACB definition."""
    full = kernel.new_zeros(kernel.shape[0], kernel.shape[1], k, k)
    c = k // 2
    if kernel.shape[-1] == 1:
        full[:, :, :, c] = kernel[:, :, :, 0]
    else:
        full[:, :, c, :] = kernel[:, :, 0, :]
    return full


def _reference_train_forward(block, x):
    """Training-mode ACB written from scratch: explicit padding, three convs, batch-statistics BN, sum."""
    k, (p, _), (s, _), (d, _), g = block.kernel_size, block.padding, block.stride, block.dilation, block.groups
    mode = "constant" if block.padding_mode == "zeros" else block.padding_mode
    padded = F.pad(x, (p, p, p, p), mode=mode)
    out = 0
    for name in BRANCHES:
        weight = getattr(block, f"{name}_conv").weight
        if name != "square":
            weight = _embed(weight, k)
        y = F.conv2d(padded, weight, stride=s, dilation=d, groups=g)
        bn = getattr(block, f"{name}_bn")
        mean = y.mean(dim=(0, 2, 3), keepdim=True)
        var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        out = out + (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return out


TRAIN_GRID = [
    (3, 0, 1, 1, 1, "zeros"),
    (3, 1, 2, 2, 2, "reflect"),
    (5, 1, 1, 2, IN_CHANNELS, "zeros"),
    (5, 3, 2, 1, 1, "circular"),
    (7, 2, 1, 2, 2, "replicate"),
    (7, 8, 2, 1, IN_CHANNELS, "zeros"),
    (11, 2, 4, 1, 1, "zeros"),
    (11, 10, 1, 2, 2, "reflect"),
]


@pytest.mark.parametrize("k,p,s,d,g,mode", TRAIN_GRID)
def test_train_forward_matches_reference(k, p, s, d, g, mode):
    torch.manual_seed(1)
    block = ACBlock(IN_CHANNELS, OUT_CHANNELS, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
    block = block.double()
    _randomise_bn(block)
    block.train()
    x = _input(k, d, torch.float64, batch=4)
    assert _rel_err(_reference_train_forward(block, x), block(x)) <= 1e-12


def test_padding_and_dilation_pairs_fold_exactly():
    torch.manual_seed(2)
    block = ACBlock(IN_CHANNELS, OUT_CHANNELS, 5, padding=(0, 3), dilation=(2, 1)).double()
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, IN_CHANNELS, 11, 9, dtype=torch.float64)
    expected = block(x)
    block.switch_to_deploy()
    assert expected.shape == (2, OUT_CHANNELS, 3, 11)
    assert _rel_err(expected, block(x)) <= 1e-12


def test_state_dict_uses_published_acnet_names():
    k = 5
    state = ACBlock(IN_CHANNELS, OUT_CHANNELS, k, padding=2).state_dict()
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {f"{b}_conv.weight" for b in BRANCHES} | {f"{b}_bn.{key}" for b in BRANCHES for key in bn_keys}
    assert set(state) == expected
    assert state["square_conv.weight"].shape == (OUT_CHANNELS, IN_CHANNELS, k, k)
    assert state["ver_conv.weight"].shape == (OUT_CHANNELS, IN_CHANNELS, k, 1)
    assert state["hor_conv.weight"].shape == (OUT_CHANNELS, IN_CHANNELS, 1, k)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(kernel_size=4), "odd"),
        (dict(kernel_size=1), ">= 3"),
        (dict(kernel_size=(3, 3)), "kernel_size must be an int"),
        (dict(padding=-1), "padding must be >= 0"),
        (dict(padding="same"), "padding must be an int or a pair"),
        (dict(padding=(1, 1, 1)), "padding must be an int or a pair"),
        (dict(stride=0), "stride must be >= 1"),
        (dict(dilation=0), "dilation must be >= 1"),
        (dict(groups=3), "groups=3 must be >= 1 and divide"),
        (dict(groups=0), "groups=0"),
        (dict(padding_mode="mirror"), "padding_mode must be one of"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, reason):
    options = dict(in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, kernel_size=3, padding=1) | kwargs
    with pytest.raises(ValueError, match=reason):
        ACBlock(**options)


def test_switch_to_deploy_is_idempotent():
    torch.manual_seed(3)
    block = ACBlock(IN_CHANNELS, OUT_CHANNELS, 3, padding=1)
    _randomise_bn(block)
    block.eval()
    block.switch_to_deploy()
    fused = block.fused_conv
    weight = fused.weight.detach().clone()
    block.switch_to_deploy()
    assert block.fused_conv is fused
    assert torch.equal(block.fused_conv.weight, weight)
    assert set(block.state_dict()) == {"fused_conv.weight", "fused_conv.bias"}
    assert not any(hasattr(block, f"{b}_{m}") for b in BRANCHES for m in ("conv", "bn"))


def test_deploy_block_loads_fused_state_dict_and_matches():
    torch.manual_seed(4)
    options = dict(in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, kernel_size=5, stride=2, padding=1,
                   dilation=2, groups=2, padding_mode="reflect")
    trained = ACBlock(**options)
    _randomise_bn(trained)
    trained.eval()
    x = torch.randn(2, IN_CHANNELS, 13, 15)
    expected = trained(x)
    kernel, bias = trained.get_equivalent_kernel_bias()
    trained.switch_to_deploy()
    assert torch.equal(trained.fused_conv.weight, kernel)
    assert torch.equal(trained.fused_conv.bias, bias)
    deployed = ACBlock(**options, deploy=True)
    assert deployed.deploy
    deployed.load_state_dict(trained.state_dict(), strict=True)
    assert _rel_err(expected, deployed(x)) <= 1e-5
    assert deployed.get_equivalent_kernel_bias()[0] is deployed.fused_conv.weight


def test_gradients_reach_all_three_branches():
    torch.manual_seed(5)
    block = ACBlock(IN_CHANNELS, OUT_CHANNELS, 3, padding=1).train()
    out = block(torch.randn(2, IN_CHANNELS, 7, 9))
    # A random projection: the plain sum of a batch-normalised output has zero gradient.
    (out * torch.randn_like(out)).sum().backward()
    for branch in BRANCHES:
        for param in (f"{branch}_conv.weight", f"{branch}_bn.weight", f"{branch}_bn.bias"):
            grad = block.get_parameter(param).grad
            assert grad is not None and grad.abs().sum() > 0, param


def test_gamma_init_sets_all_branch_bn_weights():
    block = ACBlock(IN_CHANNELS, OUT_CHANNELS, 3, padding=1, gamma_init=1 / 3)
    for branch in BRANCHES:
        assert torch.equal(getattr(block, f"{branch}_bn").weight, torch.full((OUT_CHANNELS,), 1 / 3))
    assert torch.equal(ACBlock(IN_CHANNELS, OUT_CHANNELS, 3).ver_bn.weight, torch.ones(OUT_CHANNELS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_deploy_matches_eval_output_on_cuda(mode):
    torch.manual_seed(6)
    block = ACBlock(IN_CHANNELS, OUT_CHANNELS, 5, stride=2, padding=1, dilation=2, groups=2, padding_mode=mode)
    block = block.double().cuda()
    _randomise_bn(block)
    block.eval()
    x = _input(5, 2, torch.float64).cuda()
    with torch.no_grad():
        expected = block(x)
        block.switch_to_deploy()
        actual = block(x)
    assert block.fused_conv.weight.is_cuda
    assert _rel_err(expected, actual) <= 1e-12
