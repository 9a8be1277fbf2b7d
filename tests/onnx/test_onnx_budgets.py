"""Every budget on an ONNX graph, as on a PyTorch model: one planner under both front ends (issue 33).

An agreement floor and a latency target search the same way on a graph; a FLOP target with
sensitivity weighs layers by the graph's own outputs; the latency filter times the nodes this
front end writes. The records speak one dialect: ``verified``, ``skipped``, ``search``, ``report()``.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import convtool
from convtool import AgreementTarget, FlopsTarget, InvalidOptionError, LatencyTarget, NothingToSeparateError
from convtool.core.records import Benchmark
from convtool.onnx import dense as dense_module
from convtool.search import fronts as fronts_module


def exported(model: nn.Module, x: torch.Tensor, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    convtool.export_onnx(model.eval(), x, path)
    return path


def top1(session_path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(session_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1)


def test_an_agreement_floor_holds_on_the_test_split_at_fewer_flops_than_half(digits, tmp_path):
    model, images, test_x, _ = digits
    path = exported(model, images[:1], tmp_path)
    result = convtool.separate_onnx(path, (images[:1].numpy(),), rank=AgreementTarget(0.99, minimize="flops"), order="auto",
                                    calibration=images)
    search = result.search
    assert result.verified and search.met and search.top1_agreement >= 0.99 and search.samples == 320
    separated = tmp_path / "s.onnx"
    convtool.onnx.separate.save_onnx(result, separated)
    with torch.no_grad():
        original = model(test_x).argmax(1).numpy()
    # On the test split, within the sampling error of the 320 held-out and 450 test samples (two standard errors of
    # their difference at 0.99: 1.5 points).
    assert float((top1(separated, test_x) == original).mean()) >= 0.99 - 0.015
    half = convtool.separate_onnx(path, (images[:1].numpy(),), rank=FlopsTarget(0.5), order="auto", calibration=images)
    assert result.flops_after < half.flops_after
    assert search.flops_fraction == pytest.approx(result.flops_after / result.flops_before)
    assert search.flops_fraction == min(t.flops_fraction for t in search.tried if t.met)


def test_an_agreement_floor_needs_calibration_and_a_classifier_on_onnx_too(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    path = exported(model, torch.randn(1, 4, 12, 12), tmp_path)
    with pytest.raises(InvalidOptionError, match="held-out calibration data: pass calibration"):
        convtool.separate_onnx(path, ((1, 4, 12, 12),), rank=AgreementTarget(0.99))
    with pytest.raises(InvalidOptionError, match="top-1 agreement floor needs a model returning one"):
        convtool.separate_onnx(path, ((1, 4, 12, 12),), rank=AgreementTarget(0.99), calibration=torch.randn(32, 4, 12, 12))
    result = convtool.separate_onnx(path, ((1, 4, 12, 12),), rank=AgreementTarget(sqnr_db=8), calibration=torch.randn(32, 4, 12, 12))
    assert result.search.sqnr_db >= 8 and result.search.top1_agreement is None and result.verified


class LoudAndQuiet(nn.Module):
    """Two convs of one shape side by side: ``loud`` reaches the output as it is, ``quiet`` scaled by 1e-3.

    ``loud``'s weight is nearly rank 1 per channel (a small weight error at rank 1), ``quiet``'s is
    noise (a large one): weight errors cut ``loud``, the output says cut ``quiet``.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loud, self.quiet = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        with torch.no_grad():
            u, v = torch.randn(32, 16, 1), torch.randn(1, 16, 9)
            self.loud.weight.copy_((u * v + 0.15 * torch.randn(32, 16, 9)).reshape(32, 16, 3, 3))

    def forward(self, x):
        return self.loud(x) + 1e-3 * self.quiet(x)


def _cut(result) -> dict[str, int]:
    return {layer.name: layer.rank for layer in result.layers}


def test_sensitivity_plans_by_the_graphs_output_where_weight_errors_disagree(tmp_path):
    model = LoudAndQuiet().eval()
    x = torch.randn(1, 16, 12, 12)
    path = exported(model, x, tmp_path)
    data = torch.randn(32, 16, 12, 12)
    by_weight = convtool.separate_onnx(path, (x.numpy(),), rank=FlopsTarget(0.6))
    by_output = convtool.separate_onnx(path, (x.numpy(),), rank=FlopsTarget(0.6, sensitivity=True), calibration=data)
    import onnx

    by_weight_name = {n.input[1]: n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"}
    loud, quiet = by_weight_name["loud.weight"], by_weight_name["quiet.weight"]
    dense = 10**6  # a layer kept dense ranks above any pair
    weighted, sensed = _cut(by_weight), _cut(by_output)
    # Weight errors spend the budget on the noisy weight, and cut the low-rank one deeper...
    assert weighted.get(quiet, dense) > weighted.get(loud, dense)
    # ...the graph's outputs say the opposite: the quiet layer's error barely reaches them.
    assert sensed.get(loud, dense) > sensed.get(quiet, dense)
    assert by_output.verified and by_output.budget_met


def test_sensitivity_on_onnx_needs_calibration(tmp_path):
    path = exported(LoudAndQuiet(), torch.randn(1, 16, 12, 12), tmp_path)
    with pytest.raises(InvalidOptionError, match="sensitivity .* calibration"):
        convtool.separate_onnx(path, ((1, 16, 12, 12),), rank=FlopsTarget(0.5, sensitivity=True))


def wide(folder: Path) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.randn(1, 32, 16, 16)
    return exported(model, x, folder), x


class FakeOnnxTiming:
    """The graphs' 'milliseconds' from their conv weights: a layer's is its weights times its input's pixels, a
    whole graph's 0.2 + 0.8 x its share of the original's conv weights."""

    calls: list = []

    @staticmethod
    def layer(path, feeds, provider, key, runs=15):
        import onnx

        model = onnx.load(str(path))
        pixels = np.prod(next(iter(feeds.values())).shape[2:])
        return sum(np.prod(i.dims) for i in model.graph.initializer if len(i.dims) == 4) * pixels / 1e5

    @staticmethod
    def whole(original, separated, feeds, runs=20, provider="cpu", threads=2):
        import onnx

        weights = [sum(np.prod(i.dims) for i in onnx.load(str(p)).graph.initializer if len(i.dims) == 4) for p in (original, separated)]
        ratio = 0.2 + 0.8 * weights[1] / weights[0]
        timing = Benchmark("CPUExecutionProvider", 10.0, 10.0 * ratio, runs, threads)
        FakeOnnxTiming.calls.append((separated, timing))
        return timing


@pytest.fixture
def fake_onnx_timing(monkeypatch):
    FakeOnnxTiming.calls = []
    monkeypatch.setattr(dense_module, "graph_latency", FakeOnnxTiming.layer)
    monkeypatch.setattr(fronts_module.onnx_separate, "time_onnx", FakeOnnxTiming.whole)
    return FakeOnnxTiming


def test_a_latency_target_searches_a_graph_as_a_module(tmp_path, fake_onnx_timing):
    path, x = wide(tmp_path)
    result = convtool.separate_onnx(path, (x.numpy(),), rank=LatencyTarget(0.5, runs=7))
    search = result.search
    assert search.met and abs(search.ratio - 0.5) <= 0.05 and result.verified
    assert search.latency is fake_onnx_timing.calls[len(search.tried) - 1][1] or search.latency in [t for _, t in fake_onnx_timing.calls]
    assert len(fake_onnx_timing.calls) == len(search.tried) and search.latency.runs == 7
    assert search.flops_fraction == pytest.approx(result.flops_after / result.flops_before)
    assert result.budget_met is None  # a latency target's milliseconds are the search's to judge


def test_the_latency_filter_keeps_slow_nodes_dense_on_onnx(tmp_path, monkeypatch):
    path, x = wide(tmp_path)
    timed = []

    def slow_pairs(path_, feeds, provider, key, runs=15):
        timed.append(key)
        return 1.0 if key[4] == ("dense", 0) else 2.0  # every pair slower than its dense node

    monkeypatch.setattr(dense_module, "graph_latency", slow_pairs)
    with pytest.raises(NothingToSeparateError, match="not faster than the dense conv on CPUExecutionProvider"):
        convtool.separate_onnx(path, (x.numpy(),), rank=2, latency_provider="cpu")
    assert {key[4] for key in timed} >= {("dense", 0), ("dw-pw", 2)}
    monkeypatch.setattr(dense_module, "graph_latency", lambda *a, **k: 2.0 if a[3][4] == ("dense", 0) else 1.0)
    result = convtool.separate_onnx(path, (x.numpy(),), rank=2, latency_provider="cpu")
    assert len(result.layers) == 3 and result.verified


def test_the_two_records_speak_one_dialect(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 12, 12)
    from_torch = convtool.separate(model, x, rank=1)
    from_onnx = convtool.separate_onnx(exported(model, x, tmp_path), (x.numpy(),), rank=1)
    for field in ("model", "layers", "skipped", "verified", "verification", "budget_met", "flops_before", "flops_after", "search"):
        assert hasattr(from_torch, field) and hasattr(from_onnx, field), field
    assert from_torch.verified and from_onnx.verified
    # report() needs no inputs on either: each keeps the inputs it ran on.
    a, b = from_torch.report(), from_onnx.report()
    assert a.flops_ratio == pytest.approx(b.flops_ratio, rel=0.05) and a.verified and b.verified
    from convtool.report.render import to_dict

    assert set(to_dict(a)) == set(to_dict(b))
