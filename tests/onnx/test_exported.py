"""Real exported files through the CLI (issue 24): torch.onnx's ``torch.cond`` (an If), and a file
rewritten as paddle2onnx writes one (no initializers, Constant nodes)."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import convtool
from convtool.cli import main

from .paddle_style import initializers_to_constants


class Branchy(nn.Module):
    """Two conv stacks, one per branch; ``forward`` picks by the input's sign (``cond``: with torch.cond, for export)."""

    def __init__(self, cond: bool = False):
        super().__init__()
        self.cond = cond
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.b = nn.Conv2d(3, 8, 5, padding=2)

    def forward(self, x):
        if self.cond:
            return torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,))
        return self.a(x) if x.sum() > 0 else self.b(x)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cond_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Branchy(cond=True).eval()
    x = torch.randn(1, 3, 16, 16).abs()
    path = tmp_path_factory.mktemp("cond") / "cond.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    assert any(n.op_type == "If" for n in onnx.load(str(path)).graph.node)
    return model, path


@pytest.mark.parametrize("sign", [1, -1], ids=["then", "else"])
def test_torch_cond_export_through_the_cli_counts_as_the_torch_path(cond_file, tmp_path, sign):
    model, path = cond_file
    x = sign * torch.randn(1, 3, 16, 16).abs()
    np.save(tmp_path / "x.npy", x.numpy())
    result = _cli("separate", path, "--rank", "1", "--input-shape", "1,3,16,16", "-o", tmp_path / "s.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert "taken on the example inputs" in " ".join(json.loads(result.stdout)["counted"])
    full = convtool.separate_onnx(path, [x], rank="full")
    # the branch not taken is separated, not run: not proven, as a PyTorch layer that did not run would not be
    assert not full.verified and full.not_run and full.relative_error < 1e-5 and len(full.layers) == 3
    one = convtool.separate_onnx(path, [x], rank=1)
    twin = Branchy().eval()
    twin.load_state_dict(model.state_dict())
    dense = convtool.analyze(twin, x)
    assert one.flops_before == dense.flops  # the torch path counts the branch the input takes, as here
    from_torch = convtool.separate(twin, x, rank=1)
    assert one.flops_after == convtool.analyze(from_torch.model, x).flops


def test_a_paddle_style_file_through_the_cli(cond_file, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2)).eval()
    x = torch.randn(1, 3, 16, 16)
    exported = convtool.export_onnx(model, x, tmp_path / "m.onnx", fold_bn=False).path
    paddle = initializers_to_constants(onnx.load(str(exported)))
    assert not paddle.graph.initializer
    onnx.save(paddle, str(tmp_path / "p.onnx"))
    result = _cli("separate", tmp_path / "p.onnx", "--rank", "full", "--input-shape", "1,3,16,16", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["layers"]) == 2 and report["fidelity"]["relative_error"] < 1e-5
    # the cond model too, rewritten: its branches' weights are outer-scope Constant nodes then
    _, path = cond_file
    onnx.save(initializers_to_constants(onnx.load(str(path))), str(tmp_path / "c.onnx"))
    branchy = convtool.separate_onnx(tmp_path / "c.onnx", [torch.randn(1, 3, 16, 16).abs()], rank="full")
    assert branchy.runs[0].ran and branchy.not_run and not branchy.verified and len(branchy.layers) == 3
