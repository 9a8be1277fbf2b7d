"""The PyTorch front end on the models people have (issue 35): a TorchScript module said so in the
library's words, and parts fx cannot trace reported only where they leave a conv dense."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convtool
from convtool import InvalidOptionError

from ..zoo import ZOO, build


def test_a_torchscript_module_is_refused_as_the_cli_refuses_its_archive(tmp_path):
    """"fx cannot trace it (AssertionError: traced_func_name=forward doesn't exist in RecursiveScriptModule)" before."""
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())), tmp_path / "m.pt")
    with pytest.raises(InvalidOptionError, match="TorchScript module.*give the eager model"):
        convtool.separate(torch.jit.load(tmp_path / "m.pt"), torch.randn(1, 3, 8, 8))


class Gated(nn.Module):
    """fx cannot trace it (a branch on a value), and its own code calls a conv on its own weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.mean() > 100:
            return x
        return self.conv(F.conv2d(x, self.weight, padding=1))


class Untraceable(nn.Module):
    """A SegFormer-like model: blocks in a ModuleList, a forward fx cannot trace, every conv a module but one."""

    def __init__(self, with_functional: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(2)])
        self.gated = Gated() if with_functional else nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            if x.abs().max() > 1e6:  # data-dependent: fx cannot trace the model
                break
            x = block(x)
        return self.gated(x)


def test_parts_fx_cannot_trace_are_not_reported_when_every_conv_was_found():
    """270 such entries across 26 architectures, 90 of them ModuleList containers, every conv separated."""
    model, x = Untraceable(with_functional=False).eval(), torch.randn(1, 3, 8, 8)
    result = convtool.separate(model, x, rank="full")
    assert len(result.layers) == 4 and result.skipped == ()
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_part_fx_cannot_trace_is_reported_where_it_leaves_a_conv_dense():
    model, x = Untraceable(with_functional=True).eval(), torch.randn(1, 3, 8, 8)
    result = convtool.separate(model, x, rank="full")
    assert {layer.name for layer in result.layers} == {"stem", "blocks.0.0", "blocks.1.0", "gated.conv"}
    (skipped,) = result.skipped
    assert skipped.name == "gated" and "fx cannot trace it" in skipped.reason and "gated.weight" in skipped.reason
    assert "blocks" not in {s.name for s in result.skipped}  # a container is not a part


@pytest.mark.parametrize("entry", [e for e in ZOO if e.name == "shape_cache_detect"], ids=lambda e: e.name)
def test_a_detection_head_with_a_shape_cache_reports_nothing_untraced(entry):
    model, inputs = build(entry)
    result = convtool.separate(model, inputs, rank=1)
    assert not any("trace" in s.reason for s in result.skipped), result.skipped
    assert {s.name for s in result.skipped} == set(entry.stays_dense)
