"""``LatencyTarget``: a budget in measured milliseconds, repaired end to end (issue 25, item 1).

The repair loop is tested on fake timings (a layer's milliseconds from its weights and input
size, and an end-to-end timer that is a function of the separated model), so each test is
deterministic; one test runs the real thing on onnxruntime CPU and checks the figures
returned are those its benchmark measured.
"""

import math

import pytest
import torch
from torch import nn

import convtool
from convtool import InvalidOptionError, LatencyTarget, ProviderUnavailableError
from convtool.core.records import Benchmark
from convtool.plan.budgets import as_budget
from convtool.pytorch import dense as dense_module
from convtool.report.render import SCHEMA_VERSION, to_dict, to_markdown
from convtool.search import fronts as fronts_module


def conv_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))


def fake_layer_ms(module: nn.Module, shape: tuple, provider: str) -> float:
    """A layer's 'milliseconds': its conv weights times its input's pixels (more rank, more time)."""
    return conv_weights(module) * math.prod(shape[2:]) / 1e5


class FakeTiming:
    """Stands in for AgainstOriginal: the separated model 'runs' in 0.2 + 0.8 x its share of the conv weights.

    ``miss`` is added to the ratio of the first ``miss_rounds`` benchmarks (a miss the repair must see);
    ``ratios`` replaces the formula by a fixed sequence. Every benchmark returned is kept, by model.
    """

    made: list["FakeTiming"] = []
    miss, miss_rounds, ratios = 0.0, 0, None

    def __init__(self, original, example_inputs, *, provider="cpu", threads=None, exporter="auto", int8=None):
        self.original, self.threads, self.returned = original, threads, []
        FakeTiming.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def benchmark(self, separated, *, runs=50, warmup=5):
        n = len(self.returned)
        if FakeTiming.ratios is not None:
            ratio = FakeTiming.ratios[n % len(FakeTiming.ratios)]
        else:
            ratio = 0.2 + 0.8 * conv_weights(separated) / conv_weights(self.original)
            ratio += FakeTiming.miss if n < FakeTiming.miss_rounds else 0.0
        timing = Benchmark("CPUExecutionProvider", 10.0, 10.0 * ratio, runs, self.threads)
        self.returned.append((separated, timing))
        return timing


@pytest.fixture
def fake(monkeypatch):
    FakeTiming.made, FakeTiming.miss, FakeTiming.miss_rounds, FakeTiming.ratios = [], 0.0, 0, None
    monkeypatch.setattr(dense_module, "module_latency", fake_layer_ms)
    monkeypatch.setattr(fronts_module, "AgainstOriginal", FakeTiming)
    return FakeTiming


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    return model, torch.randn(1, 16, 16, 16)


@pytest.mark.parametrize("kwargs, words", [
    (dict(fraction=0), "in \\(0, 1\\]"), (dict(fraction=1.5), "in \\(0, 1\\]"), (dict(fraction=True), "in \\(0, 1\\]"),
    (dict(fraction="0.5"), "in \\(0, 1\\]"), (dict(fraction=0.5, provider=""), "provider"),
    (dict(fraction=0.5, runs=0), "runs"), (dict(fraction=0.5, rounds=0), "rounds"), (dict(fraction=0.5, threads=0), "threads"),
    (dict(fraction=0.5, runs=2.5), "runs"), (dict(fraction=0.5, tolerance=0), "tolerance"), (dict(fraction=0.5, tolerance=1), "tolerance"),
])
def test_the_record_refuses_bad_values_in_one_line(kwargs, words):
    with pytest.raises(InvalidOptionError, match=words) as error:
        LatencyTarget(**kwargs)
    assert "\n" not in str(error.value)


def test_the_record_is_a_rank():
    target = convtool.LatencyTarget(0.5, provider="cpu")
    assert as_budget(target) is target and "LatencyTarget" in convtool.__all__
    assert (target.rounds, target.tolerance, target.threads) == (5, 0.1, None)


def test_a_miss_on_the_first_round_is_repaired(fake):
    fake.miss, fake.miss_rounds = 0.3, 1
    model, x = net()
    result = convtool.separate(model, x, rank=LatencyTarget(0.5))
    search = result.search
    assert len(search.tried) >= 2 and not search.tried[0].met
    assert search.met and search.reason == "" and abs(search.ratio - 0.5) <= 0.05
    assert search.floor is None and search.tried[-1].met
    # What is returned is what its own benchmark measured, for that very model.
    (timing,) = [t for m, t in fake.made[0].returned if m is result.model]
    assert search.latency == timing and search.ratio == timing.separated_ms / timing.original_ms
    assert search.flops_fraction == pytest.approx(result.flops_after / result.flops_before)
    assert result.budget_met is None


def test_layers_are_timed_dense_and_in_the_form_they_ship_in(fake, monkeypatch):
    from convtool.core.modules import BranchedSeparableConv, SeparableConv

    timed = []
    monkeypatch.setattr(dense_module, "module_latency",
                        lambda module, shape, provider: timed.append((type(module), shape)) or fake_layer_ms(module, shape, provider))
    model, x = net()
    convtool.separate(model, x, rank=LatencyTarget(0.5))
    kinds = {kind for kind, _ in timed}
    assert nn.Conv2d in kinds and BranchedSeparableConv in kinds  # dense, and rank > 1 pairs as the branches they ship as
    assert SeparableConv in kinds  # rank 1 ships as built
    assert {shape for _, shape in timed} == {(1, 16, 16, 16), (1, 32, 16, 16)}  # each layer at its input shape


def test_a_target_below_reach_returns_the_fastest_plan_and_its_floor(fake):
    model, x = net()
    target = LatencyTarget(0.1, rounds=4)  # the fake never runs below 0.2 of the original
    result = convtool.separate(model, x, rank=target)
    search = result.search
    assert not search.met and len(search.tried) <= target.rounds
    assert search.floor == search.tried[-1].latency_ratio == search.ratio > 0.2
    assert "below what separation reaches" in search.reason and f"{search.floor:.3f}" in search.reason
    # The floor is the fastest plan: every layer at rank 1.
    assert {layer.rank for layer in result.layers} == {1} and len(result.layers) == 3


def test_the_loop_stops_within_its_bound_when_timings_never_settle(fake):
    fake.ratios = (0.95, 0.05)  # alternately far too slow and far too fast
    model, x = net()
    result = convtool.separate(model, x, rank=LatencyTarget(0.5, rounds=3))
    search = result.search
    assert 1 <= len(search.tried) <= 3 and not any(r.met for r in search.tried)
    assert search.ratio == 0.05 and search.met  # faster than asked: kept, and the report says it is not within
    assert "no plan within 10%" in search.reason


def test_a_plan_always_too_fast_widens_the_budget_and_stops(fake):
    fake.ratios = (0.01,)  # every plan far faster than asked: the budget widens until every layer would stay dense
    model, x = net()
    result = convtool.separate(model, x, rank=LatencyTarget(0.5, rounds=8))
    search = result.search
    assert 1 <= len(search.tried) <= 8 and search.met and not search.tried[-1].met
    budgets = [r.budget for r in search.tried]
    assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets)  # each round a wider, new budget


def test_no_layer_faster_than_dense_is_one_line(fake, monkeypatch):
    monkeypatch.setattr(dense_module, "module_latency", lambda module, shape, provider: 1.0)
    model, x = net()
    with pytest.raises(convtool.NothingToSeparateError, match="no layer's separated form runs faster than its dense conv on cpu"):
        convtool.separate(model, x, rank=LatencyTarget(0.5))
    assert fake.made[0].returned == []


def test_the_report_carries_the_search(fake):
    model, x = net()
    result = convtool.separate(model, x, rank=LatencyTarget(0.5, threads=2, runs=7))
    data = to_dict(result.report(x))
    assert data["schema_version"] == SCHEMA_VERSION == 7
    found = data["search"]
    assert list(found) == ["target", "goal", "met", "reason", "flops_fraction", "latency", "top1_agreement", "sqnr_db",
                           "held_out_samples", "floor", "tried", "baseline"]
    assert found["baseline"] == "the original"
    assert found["target"]["type"] == "LatencyTarget" and found["target"]["fraction"] == 0.5
    assert (found["latency"]["provider"], found["latency"]["runs"], found["latency"]["threads"]) == ("CPUExecutionProvider", 7, 2)
    assert found["latency"]["ratio"] == result.search.ratio and len(found["tried"]) == len(result.search.tried)
    assert set(found["tried"][0]) == {"budget", "unit", "flops_fraction", "latency_ratio", "top1_agreement", "sqnr_db", "met"}
    text = to_markdown(result.report(x))
    assert "0.5 of the original's latency on cpu" in text and "7 interleaved runs on CPUExecutionProvider, 2 threads" in text
    assert to_dict(convtool.separate(model, x, rank=1).report(x))["search"] is None


def test_a_provider_that_cannot_run_is_refused_before_any_work(fake):
    import onnxruntime as ort

    model, x = net()
    with pytest.raises(InvalidOptionError, match="unknown provider"):
        convtool.separate(model, x, rank=LatencyTarget(0.5, provider="abacus"))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider is not in this onnxruntime build"):
            convtool.separate(model, x, rank=LatencyTarget(0.5, provider="cuda"))
    assert fake.made == []
    with pytest.raises(InvalidOptionError, match="pass example inputs"):
        convtool.separate(model, rank=LatencyTarget(0.5))
    # The same provider named twice is one provider.
    result = convtool.separate(model, x, rank=LatencyTarget(0.5), latency_provider="CPUExecutionProvider")
    assert result.search.latency.provider == "CPUExecutionProvider"


@pytest.mark.real_timing
def test_on_onnxruntime_the_ratio_returned_is_the_one_its_benchmark_measured(monkeypatch):
    """The real thing: each round's benchmark is recorded, and the search returns those numbers.

    Two wide 3x3 convs, whose rank-1 pairs take an eighth of the FLOPs: a pair faster than the
    dense conv on any CPU, so the search has something to separate wherever the suite runs (a
    zoo net's narrow layers may have none on some machine).
    """
    from convtool.deploy.verify import AgainstOriginal

    seen = []
    real = AgainstOriginal.benchmark

    def spy(self, separated, **kwargs):
        timing = real(self, separated, **kwargs)
        seen.append((separated, timing))
        return timing

    monkeypatch.setattr(AgainstOriginal, "benchmark", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1)).eval()
    inputs = torch.randn(1, 128, 16, 16)
    result = convtool.separate(model, inputs, rank=LatencyTarget(0.7, runs=5, rounds=2))
    search = result.search
    assert len(seen) == len(search.tried) >= 1
    (timing,) = [t for m, t in seen if m is result.model]
    assert timing.provider == search.latency.provider == "CPUExecutionProvider" and timing.runs == search.latency.runs == 5
    assert search.latency == timing and search.ratio == timing.separated_ms / timing.original_ms
    for (_, t), r in zip(seen, search.tried):
        assert r.latency_ratio == t.separated_ms / t.original_ms
