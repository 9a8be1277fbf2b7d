"""The output errors of a conv whose groups each read one input channel (a filterbank, a depthwise conv), in closed form."""

import pytest
import torch
import torch.nn.functional as F

from convtool import SeparableConv
from convtool.core.decompose import max_rank
from convtool.plan.measured import rank_output_errors

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("channels, filters, kernel, stride, padding, dilation", [
    (1, 24, (17,), 3, 5, 1),  # a 1-d filterbank, strided like an audio front end
    (1, 12, (9, 1), (2, 1), (4, 0), 1),  # a filterbank over a (time, 1) image, as the pitch tracker's first conv
    (3, 12, (3, 5), 1, "same", (1, 2)),  # one input channel per group: 3 groups of 4 outputs
    (4, 8, (2, 3, 3), (1, 2, 2), 1, 1),  # 3-d, a depthwise conv with a channel multiplier of 2
])
def test_every_rank_in_closed_form_equals_building_each_pair(channels, filters, kernel, stride, padding, dilation):
    torch.manual_seed(0)
    dims = len(kernel)
    weight = torch.randn(filters, 1, *kernel, dtype=torch.float64)
    bias = torch.randn(filters, dtype=torch.float64)
    x = torch.randn(3, channels, *(k * 3 + 7 for k in kernel), dtype=torch.float64)
    options = dict(stride=stride, padding=padding, dilation=dilation)
    top = max_rank(weight, channels, "dw-pw")
    fast = rank_output_errors(weight, bias, channels, "dw-pw", x, top, options)
    reference = CONVS[dims](x, weight, bias, stride, padding, dilation, channels)
    assert sorted(fast) == list(range(1, top + 1))
    for r in range(1, top + 1):
        pair = SeparableConv.from_weight(weight, bias, groups=channels, rank=r, order="dw-pw", **options)
        with torch.no_grad():
            slow = float((pair(x) - reference).pow(2).sum())
        assert fast[r] == pytest.approx(slow, rel=1e-6, abs=1e-9), (r, fast[r], slow)
    assert fast[top] == pytest.approx(0.0, abs=1e-9)
