"""``sweep``: each FLOP budget separated, exported, timed against the original and judged (issue 25, item 2)."""

from unittest import mock

import pytest
import torch
from torch import nn

import convtool
from convtool import InvalidOptionError, ProviderUnavailableError

FAST = dict(exporter="torchscript", runs=5, warmup=1)  # the timing's numbers are not under test here


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def test_every_target_is_separated_timed_and_judged_with_one_costing(digits):
    model, images, test_x, test_y = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def accuracy(m, data):
        seen.append((m, data, m.training, torch.is_grad_enabled()))
        x, y = data
        return float((m(x).argmax(1) == y).double().mean())

    from convtool.plan import budget

    with mock.patch.object(budget, "cost", wraps=budget.cost) as measured:
        result = convtool.sweep(model, images[:1], targets=(0.5, 0.25), calibration=images[:128], metric=accuracy,
                                metric_data=(test_x, test_y), **FAST)
    assert measured.call_count == 1  # the layers' errors are measured once, for both budgets
    assert [p.target for p in result.points] == [0.5, 0.25]
    for point in result.points:
        assert point.budget_met and point.flops_fraction <= point.target * (1 + 1e-9)
        assert point.flops == pytest.approx(point.flops_fraction * result.original.flops)
        assert point.params < result.original.params and point.layers >= 1
        assert point.speedup == pytest.approx(result.original.latency_ms / point.latency_ms)
        assert 0.9 <= point.top1_agreement <= 1 and point.sqnr_db > 5 and point.seconds > 0
    assert result.points[1].flops < result.points[0].flops
    # The original: FLOPs fraction 1, speed-up 1, agreeing with itself, its metric measured too.
    o = result.original
    assert (o.target, o.flops_fraction, o.speedup, o.top1_agreement, o.sqnr_db, o.layers) == (None, 1.0, 1.0, 1.0, None, 0)
    with torch.no_grad():
        assert o.metric == float((model(test_x).argmax(1) == test_y).double().mean())
    # The metric ran on the original and each separated model, in eval mode, without gradients, on the data given.
    assert len(seen) == 3 and seen[0][0] is model and all(s[1][0] is test_x for s in seen)
    assert all(not training and not grad for _, _, training, grad in seen)
    assert [p.metric for p in result.points] == [pytest.approx(v) for v in (
        float((seen[i][0](test_x).argmax(1) == test_y).double().mean()) for i in (1, 2))]
    assert result.metric_name == "accuracy" and result.measure == "accuracy"
    assert result.judged_on.startswith("32 held-out calibration samples")  # every fourth batch of 32
    assert result.provider == "CPUExecutionProvider" and result.input_shapes == ((1, 1, 8, 8),)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and not model.training


def test_without_a_metric_the_measure_is_agreement_and_the_metric_gets_the_held_out_inputs():
    model, calls = small(), []
    data = torch.randn(16, 3, 8, 8)

    def mean_logit(m, x):
        calls.append(x)
        return m(x).mean()  # a one-element tensor is taken as a number

    result = convtool.sweep(model, targets=(0.5,), calibration=data, metric=mean_logit, **FAST)
    assert torch.equal(calls[0], data[-4:])  # no batch to hold out whole: each batch's last quarter
    assert isinstance(result.points[0].metric, float)
    steps = []
    plain = convtool.sweep(model, torch.randn(1, 3, 8, 8), targets=(0.5,), on_step=lambda *step: steps.append(step), **FAST)
    assert steps == [(0, 3, "exporting and judging the original"), (1, 3, "separating at 0.5 of the FLOPs"),
                     (2, 3, "timing 2 ONNX files on CPUExecutionProvider"), (3, 3, "done")]
    assert plain.metric_name is None and plain.measure == "top-1 agreement"
    assert plain.value(plain.points[0]) == plain.points[0].top1_agreement
    assert plain.judged_on.startswith("the example inputs (1 sample")


@pytest.mark.parametrize("value", ["x", float("nan"), True, torch.ones(2)])
def test_a_metric_must_give_a_finite_number(value):
    def bad(model, data):
        return value

    with pytest.raises(InvalidOptionError, match="the metric bad returned .*; it must return a finite number"):
        convtool.sweep(small(), torch.randn(1, 3, 8, 8), targets=(0.5,), metric=bad, **FAST)


@pytest.mark.parametrize("targets, words", [((0.5, 1.5), "in \\(0, 1\\]"), ((), "at least one"), ((0.5, 0.5), "repeat"),
                                            ("0.5", "in \\(0, 1\\]")])
def test_bad_targets_are_refused_before_any_work(targets, words):
    with pytest.raises(InvalidOptionError, match=words):
        convtool.sweep(small(), torch.randn(1, 3, 8, 8), targets=targets)


def test_a_provider_that_cannot_run_is_refused():
    with pytest.raises(ProviderUnavailableError):
        convtool.sweep(small(), torch.randn(1, 3, 8, 8), targets=(0.5,), provider="tensorrt")
