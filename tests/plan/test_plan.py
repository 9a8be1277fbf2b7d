"""Rank costing: every rank's output error from one factorisation, the same numbers as building each pair."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convtool
from convtool import SeparableConv
from convtool.plan.measured import rank_output_errors
from convtool.core.decompose import max_rank

from ..core.test_decompose import _input, conv_configs
from ..zoo import ZOO, build


@settings(max_examples=30, deadline=None)
@given(config=conv_configs(), order=st.sampled_from(["dw-pw", "pw-dw"]), seed=st.integers(0, 2**16))
def test_every_rank_costed_at_once_equals_building_each_pair(config, order, seed):
    torch.manual_seed(seed)
    config = {**config, "padding_mode": "zeros"}  # output errors are measured for zero padding only
    conv = torch.nn.Conv2d(**config).double()
    x = _input(conv, torch.float64)
    options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    top = max_rank(conv.weight, conv.groups, order)
    fast = rank_output_errors(conv.weight, conv.bias, conv.groups, order, x, top, options)
    with torch.no_grad():
        reference = conv(x)
        for r in range(1, top + 1):
            pair = SeparableConv.from_conv(conv, rank=r, order=order)
            slow = float((pair(x) - reference).pow(2).sum())
            assert fast[r] == pytest.approx(slow, rel=1e-6, abs=1e-9), (r, fast[r], slow)


@pytest.mark.parametrize("entry", [e for e in ZOO if e.name in ("resnet", "unet", "functional", "reused")], ids=lambda e: e.name)
def test_budget_plans_with_calibration_are_those_of_measuring_each_pair(entry, monkeypatch):
    """The plan chosen with the fast costing is the plan chosen by building every candidate pair."""
    from convtool.plan import measured as plan_module

    model, inputs = build(entry)
    data = tuple(torch.cat([x] * 8) for x in inputs)
    calibration = data if len(data) > 1 else data[0]
    target = convtool.FlopsTarget(0.4)
    fast = convtool.separate(model, inputs, rank=target, order="auto", calibration=calibration)

    def slow(weight, bias, groups, order, x, top, options, dense=None):
        transposed = options.get("transposed", False)
        kw = {k: options[k] for k in ("stride", "padding", "dilation")}
        with torch.no_grad():
            if transposed:
                kw["output_padding"] = options.get("output_padding", 0)
                reference = torch.nn.functional.conv_transpose2d(x, weight, None, kw["stride"], kw["padding"], kw["output_padding"], groups, kw["dilation"])
            else:
                reference = torch.nn.functional.conv2d(x, weight, None, kw["stride"], kw["padding"], kw["dilation"], groups)
            return {
                r: float((SeparableConv.from_weight(weight, None, groups=groups, rank=r, order=order, transposed=transposed, **kw)(x) - reference)
                         .double().pow(2).sum())
                for r in range(1, top + 1)
            }

    monkeypatch.setattr(plan_module, "rank_output_errors", slow)
    brute = convtool.separate(model, inputs, rank=target, order="auto", calibration=calibration)
    assert [(l.name, l.order, l.rank) for l in fast.layers] == [(l.name, l.order, l.rank) for l in brute.layers]


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_the_streamed_refit_reports_the_error_it_leaves(order):
    """The refit keeps no activations; the error it reports is the one the layer makes on the data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)).eval()
    data = torch.randn(80, 8, 12, 12)  # three batches of 32, the last partial
    result = convtool.separate(model, data[:1], rank=1, order=order, calibration=data)
    with torch.no_grad():
        expected = float((result.model(data) - model(data)).norm() / model(data).norm())
    assert result.layers[0].output_error == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("target", [0.15, 0.4, 0.7])
@pytest.mark.parametrize("entry", [e for e in ZOO if e.name in ("resnet", "inception", "unet", "mobilenet")], ids=lambda e: e.name)
def test_options_out_of_reach_are_not_costed_and_change_no_plan(entry, target, monkeypatch):
    """Options costing more than dense, or past the budget's slack, are dropped before costing.

    Weighed by each layer's own output error, exact at every rank: the model-output default
    measures a few ranks along each layer's front and interpolates the rest, so a different set
    of options moves what it measures, and with it a close plan.
    """
    from convtool.plan import measured as plan_module

    model, inputs = build(entry)
    data = tuple(torch.cat([x] * 4) for x in inputs)
    calibration = data if len(data) > 1 else data[0]
    costed = []
    real = plan_module.rank_output_errors
    monkeypatch.setattr(plan_module, "rank_output_errors", lambda *a, **k: costed.append(a[5]) or real(*a, **k))
    budget = convtool.FlopsTarget(target, sensitivity=False)
    pruned = convtool.separate(model, inputs, rank=budget, order="auto", calibration=calibration)
    pruned_ranks = list(costed)
    costed.clear()
    from convtool.plan import costing

    monkeypatch.setattr(costing, "reachable", lambda choice, slack: choice)
    full = convtool.separate(model, inputs, rank=budget, order="auto", calibration=calibration)
    assert [(l.name, l.order, l.rank) for l in pruned.layers] == [(l.name, l.order, l.rank) for l in full.layers]
    if full.budget_met:
        assert sum(pruned_ranks) < sum(costed)
    else:  # out of reach even at every layer's cheapest option: the plan is those, and no error is measured (issue 36)
        assert not pruned_ranks and not costed
