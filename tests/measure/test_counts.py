"""The seeds' arithmetic, through the public API, and agreement with fvcore."""

import pytest
import torch
from torch import nn

import convtool


def conv(cin, cout, bias=False):
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


def test_dense_conv_parameters():
    assert convtool.analyze(conv(16, 32), torch.randn(1, 16, 8, 8)).params == 4_608
    assert convtool.analyze(conv(32, 64), torch.randn(1, 32, 8, 8)).params == 18_432


@pytest.mark.parametrize(
    "cin,cout,dense,separable,ratio",
    [(32, 64, 18_432, 2_336, 7.9), (8, 8, 576, 136, 4.24)],
)
def test_separable_parameters(cin, cout, dense, separable, ratio):
    model = nn.Sequential(conv(cin, cout))
    x = torch.randn(1, cin, 8, 8)
    c = convtool.compare(model, convtool.separate(model, x).model, x)
    assert (c.before.params, c.after.params) == (dense, separable)
    assert c.params_ratio == pytest.approx(ratio, abs=0.01)
    assert (c.layers[0].params_before, c.layers[0].params_after) == (dense, separable)


def test_conv_bn_relu_block():
    block = nn.Sequential(conv(32, 64), nn.BatchNorm2d(64), nn.ReLU()).eval()
    x = torch.randn(1, 32, 8, 8)
    result = convtool.separate(block, x)
    c = result.report(x)
    assert (c.before.params, c.after.params) == (18_560, 2_464)


def test_flops_follow_the_hand_formulas():
    n, m, k, h, w = 64, 32, 3, 10, 12
    model = nn.Sequential(nn.Conv2d(m, n, k, stride=2, padding=1, bias=False))
    x = torch.randn(1, m, h, w)
    ho, wo = 5, 6
    c = convtool.compare(model, convtool.separate(model, x).model, x)
    assert c.before.flops == n * m * k * k * ho * wo
    assert c.after.flops == m * k * k * ho * wo + n * m * ho * wo
    assert (c.layers[0].flops_before, c.layers[0].flops_after) == (c.before.flops, c.after.flops)


def test_doubling_channels_quadruples_dense_cost():
    x16, x32 = torch.randn(1, 16, 8, 8), torch.randn(1, 32, 8, 8)
    small, large = convtool.analyze(conv(16, 32), x16), convtool.analyze(conv(32, 64), x32)
    assert large.flops == 4 * small.flops and large.params == 4 * small.params


def test_same_padding_convs_are_counted():
    """fvcore has no counter for aten::_convolution_mode; convtool adds one."""
    x = torch.randn(1, 16, 10, 10)
    a = convtool.analyze(nn.Conv2d(16, 32, 3, padding="same", bias=False), x)
    assert a.flops == 16 * 32 * 9 * 100
    assert "aten::_convolution_mode" not in a.unsupported_ops


def test_analyze_agrees_with_fvcore_called_directly():
    from fvcore.nn import FlopCountAnalysis, parameter_count

    from ..zoo import ResNetLike

    model = ResNetLike().eval()
    x = torch.randn(1, 3, 32, 32)
    a = convtool.analyze(model, x)
    direct = FlopCountAnalysis(model, x)
    direct.unsupported_ops_warnings(False)
    assert a.flops == direct.total()
    assert a.params == parameter_count(model)[""]
    by_module = direct.by_module()
    for row in a.modules:
        assert row.flops == by_module.get(row.name, 0), row.name
    assert a.module("layer1.0.conv1").type == "Conv2d"
    assert a.unsupported_ops == dict(direct.unsupported_ops())


def test_dict_outputs_and_two_inputs_are_counted():
    from ..zoo import DetectorLike, TwoInputs

    a = convtool.analyze(DetectorLike().eval(), torch.randn(1, 3, 32, 32))
    assert a.flops > 0 and a.module("smooth").flops > 0
    b = convtool.analyze(TwoInputs().eval(), (torch.randn(1, 3, 16, 16), torch.randn(1, 1, 16, 16)))
    assert b.input_shapes == ((1, 3, 16, 16), (1, 1, 16, 16))


def test_analysis_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(conv(3, 8), nn.BatchNorm2d(8)).train()
    convtool.analyze(model, torch.randn(4, 3, 8, 8))
    assert model.training
    torch.testing.assert_close(model[1].running_mean, torch.zeros(8))
