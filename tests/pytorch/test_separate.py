"""The public contract of convtool.separate, beyond the zoo."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convtool
from convtool import InvalidOptionError, NothingToSeparateError, SeparableConv, SeparationError

from ..zoo import ResNetLike, VGGLike, randomize_batchnorm


def test_include_and_exclude_patterns():
    model = ResNetLike().eval()
    only = convtool.separate(model, rank=1, include=["layer1.*"])
    assert {layer.name for layer in only.layers} == {
        "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
    }
    assert ("conv1", "not matched by any include pattern") in only.skipped
    without = convtool.separate(model, rank=1, exclude=["conv1", "layer1.*"])
    names = {layer.name for layer in without.layers}
    assert "conv1" not in names and not any(n.startswith("layer1") for n in names)
    assert ("conv1", "excluded by pattern 'conv1'") in without.skipped


def test_exclude_wins_over_include():
    with pytest.raises(NothingToSeparateError, match="excluded"):
        convtool.separate(VGGLike(), include=["features.*"], exclude=["*"])


@pytest.mark.parametrize("rank", [0, -1, 1.5, "half", True])
def test_bad_rank_is_refused(rank):
    with pytest.raises(InvalidOptionError, match="rank"):
        convtool.separate(VGGLike(), rank=rank)


def test_bad_order_and_non_module_are_refused():
    with pytest.raises(InvalidOptionError, match="order"):
        convtool.separate(VGGLike(), order="sideways")
    with pytest.raises(InvalidOptionError, match="nn.Module"):
        convtool.separate(lambda x: x)


def test_model_without_convs_has_nothing_to_separate():
    with pytest.raises(NothingToSeparateError, match="no conv"):
        convtool.separate(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2), (torch.float64, 1e-10)])
def test_dtype_is_kept(dtype, tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).to(dtype).eval()
    x = torch.randn(1, 4, 12, 12, dtype=dtype)
    result = convtool.separate(model, x, rank="full")
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_kept(training):
    model = randomize_batchnorm(ResNetLike()).train(training)
    result = convtool.separate(model, torch.randn(2, 3, 32, 32))
    assert result.model.training is training
    assert all(m.training is training for m in result.model.modules())


def test_example_run_does_not_touch_batchnorm_statistics():
    model = randomize_batchnorm(ResNetLike()).train()
    result = convtool.separate(model, torch.randn(2, 3, 32, 32), rank="full")
    torch.testing.assert_close(result.model.bn1.running_mean, model.bn1.running_mean)


def test_frozen_weights_stay_frozen():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    model.requires_grad_(False)
    result = convtool.separate(model)
    assert not any(p.requires_grad for p in result.model.parameters())


def test_conv_with_hooks_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    model[0].register_forward_hook(lambda m, i, o: o)
    result = convtool.separate(model)
    assert [layer.name for layer in result.layers] == ["1"]
    assert "hooks" in dict(result.skipped)["0"]


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.other = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.other(self.conv(x)) * self.conv.weight.mean()


def test_conv_whose_weight_is_read_directly_is_left_alone():
    model = ReadsWeight()
    x = torch.randn(1, 3, 10, 10)
    result = convtool.separate(model, x)
    assert [layer.name for layer in result.layers] == ["other"]
    assert "reads this conv's weight" in dict(result.skipped)["conv"]


class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.c = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.c(F.conv2d(x, self.w * 2))


def test_functional_conv_with_computed_weight_is_reported():
    result = convtool.separate(ComputedWeight(), torch.randn(1, 3, 10, 10))
    assert [layer.name for layer in result.layers] == ["c"]
    assert any("computed at run time" in s.reason for s in result.skipped)


class BreaksWhenSwapped(nn.Module):
    """Untraceable, and reads the conv's weight in code fx never sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:
            return F.conv2d(x, self.conv.weight)
        return self.conv(x)


def test_a_conv_run_around_its_module_is_not_claimed():
    # The pair's dense-equivalent weight keeps the code running, but the pair itself never runs.
    with pytest.raises(NothingToSeparateError, match="applies it itself"):
        convtool.separate(BreaksWhenSwapped(), torch.ones(1, 3, 8, 8))
    result = convtool.separate(BreaksWhenSwapped(), -torch.ones(1, 3, 8, 8))  # the other branch calls the module
    assert [layer.name for layer in result.layers] == ["conv"] and result.verified


class CallsConvInternals(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv._conv_forward(x, self.conv.weight, self.conv.bias)
        return self.conv(x)


def test_a_rewrite_that_breaks_the_model_is_reported_with_what_to_do():
    with pytest.raises(SeparationError, match="exclude"):
        convtool.separate(CallsConvInternals(), torch.ones(1, 3, 8, 8))


def test_bare_conv_becomes_a_pair():
    conv = nn.Conv2d(16, 32, 3, bias=False)
    result = convtool.separate(conv)
    assert isinstance(result.model, SeparableConv)
    assert result.layers[0].name == "<model>"
    assert (result.layers[0].params_before, result.layers[0].params_after) == (4608, 16 * 9 + 32 * 16)
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (32, 16, 3, 3)


def test_pair_keeps_conv_attributes_for_surrounding_code():
    conv = nn.Conv2d(4, 8, (3, 5), stride=2, padding=(1, 2), dilation=1)
    pair = SeparableConv.from_conv(conv, rank=2)
    assert (pair.in_channels, pair.out_channels, pair.kernel_size, pair.stride, pair.padding) == (
        4, 8, (3, 5), (2, 2), (1, 2),
    )
    assert "rank=2" in repr(pair) and "order='dw-pw'" in repr(pair)


@pytest.mark.gpu
def test_cuda_model_stays_on_cuda():
    model = VGGLike().cuda().eval()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    result = convtool.separate(model, x, rank="full")
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-3, atol=1e-4)
