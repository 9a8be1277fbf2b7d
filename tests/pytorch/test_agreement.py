"""``AgreementTarget``: the fewest FLOPs that keep a floor of agreement on held-out data (issue 23, item 4)."""

from unittest import mock

import pytest
import torch
from torch import nn

import convtool
from convtool import AgreementTarget, InvalidOptionError, NothingToSeparateError
from convtool.search.fronts import PyTorchFront
from convtool.search.trials import split_held_out


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x).argmax(1) == b.eval()(x).argmax(1)).float().mean())


def test_the_floor_holds_on_unseen_data_at_fewer_flops_than_half(digits):
    model, images, test_x, _ = digits
    result = convtool.separate(model, images[:1], rank=AgreementTarget(0.99), order="auto", calibration=images)
    search = result.search
    assert search.top1_agreement >= 0.99 and search.samples == 320  # every fourth batch of 32 held out
    # The floor is met on held-out data the refit never saw; on the test split, within the
    # sampling error of 320 samples (two standard errors at 0.99: 1.1 points).
    assert agreement(result.model, model, test_x) >= 0.99 - 0.011
    half = convtool.separate(model, images[:1], rank=convtool.FlopsTarget(0.5), order="auto", calibration=images)
    assert result.flops_after < half.flops_after
    assert search.flops_fraction == pytest.approx(result.flops_after / result.flops_before)
    met = [t.flops_fraction for t in search.tried if t.met]
    assert search.flops_fraction == min(met)  # the smallest budget measured to meet the floor, never a guess
    assert all(not t.met for t in search.tried if t.flops_fraction < search.flops_fraction)


def test_the_layers_are_costed_once_for_every_budget(digits):
    model, images, _, _ = digits
    from convtool.plan import budget

    with mock.patch.object(budget, "cost", wraps=budget.cost) as measured:
        result = convtool.separate(model, images[:1], rank=AgreementTarget(0.98, sensitivity=True), order="auto",
                                   calibration=images[:256])
    assert measured.call_count == 1 and len(result.search.tried) >= 3


def test_no_budget_meeting_the_floor_is_one_line(digits):
    model, images, _, _ = digits
    with pytest.raises(NothingToSeparateError, match=r"no FLOP budget meets SQNR >= 90 dB on \d+ held-out") as error:
        convtool.separate(model, images[:1], rank=AgreementTarget(sqnr_db=90), calibration=images[:128])
    assert "\n" not in str(error.value)


def test_an_sqnr_floor_serves_any_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    data = torch.randn(64, 4, 12, 12)
    result = convtool.separate(model, data[:1], rank=AgreementTarget(sqnr_db=8), calibration=data)
    assert result.search.top1_agreement is None and result.search.sqnr_db >= 8
    with pytest.raises(InvalidOptionError, match="top-1 agreement floor needs a model returning one"):
        convtool.separate(model, data[:1], rank=AgreementTarget(0.9), calibration=data)


def test_bad_targets_and_missing_data_are_refused():
    for bad in (dict(), dict(top1=1.5), dict(top1=0.9, held_out=1.0), dict(sqnr_db=float("nan"))):
        with pytest.raises(InvalidOptionError):
            AgreementTarget(**bad)
    model = nn.Sequential(nn.Conv2d(4, 8, 3))
    with pytest.raises(InvalidOptionError, match="held-out calibration data"):
        convtool.separate(model, torch.randn(1, 4, 8, 8), rank=AgreementTarget(sqnr_db=10))


def test_held_out_batches_are_never_fit_on():
    front = PyTorchFront(nn.Identity(), None, None, order="dw-pw", include=(), exclude=(), recalibrate_bn=False,
                         latency_provider=None, refit="last")
    split = lambda data, share: split_held_out(front, data, share)  # noqa: E731
    batches = [torch.full((8, 1), float(i)) for i in range(8)]
    fit, held = split(batches, 0.25)
    assert [int(b[0][0]) for b in held] == [3, 7] and [int(b[0][0]) for b in fit] == [0, 1, 2, 4, 5, 6]
    fit, held = split(torch.arange(8.0)[:, None], 0.25)  # one batch: its last quarter
    assert fit[0][0].flatten().tolist() == [0, 1, 2, 3, 4, 5] and held[0][0].flatten().tolist() == [6, 7]
    with pytest.raises(InvalidOptionError, match="at least 4 samples"):
        split(torch.zeros(1, 1), 0.25)


def test_a_model_with_nothing_to_separate_says_why_not_which_floor():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1))
    with pytest.raises(NothingToSeparateError, match="already depthwise"):
        convtool.separate(model, torch.randn(1, 4, 8, 8), rank=AgreementTarget(sqnr_db=10), calibration=torch.randn(16, 4, 8, 8))
