"""Rank choice, both orders, calibration and distillation: the mechanics."""

import pytest
import torch
from torch import nn

import convtool
from convtool import InvalidOptionError
from convtool.core.decompose import rank_errors
from convtool.plan.knapsack import DENSE, Choice, allocate
from convtool.core.costs import dense_flops, pair_flops
from convtool.measure.conv_calls import record

from ..zoo import ZOO, DetectorLike, ResNetLike, TwoInputs, build, randomize_batchnorm


def conv_flops(model, x):
    return sum(call.flops for call in record(model, (x,)).calls)


@pytest.mark.parametrize("target", [0.3, 0.45, 0.7])
def test_flop_target_is_met_and_reported(target):
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetLike()).eval()
    x = torch.randn(1, 3, 32, 32)
    result = convtool.separate(model, x, rank=convtool.FlopsTarget(target), order="auto")
    assert result.budget_met
    before, after = convtool.analyze(model, x).flops, convtool.analyze(result.model, x).flops
    assert after <= target * before
    assert (result.flops_before, result.flops_after) == (pytest.approx(before), pytest.approx(after))
    assert conv_flops(result.model, x) < target * conv_flops(model, x)


def test_bigger_budget_never_hurts_the_error():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetLike()).eval()
    x = torch.randn(1, 3, 32, 32)

    def total_error(target):
        result = convtool.separate(model, x, rank=convtool.FlopsTarget(target))
        kept = {layer.name: layer.weight_error for layer in result.layers}
        return sum(e**2 for e in kept.values())

    errors = [total_error(t) for t in (0.3, 0.5, 0.8)]
    assert errors[0] >= errors[1] >= errors[2]


def test_unreachable_target_gives_cheapest_and_says_so():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    result = convtool.separate(model, torch.randn(1, 3, 16, 16), rank=convtool.FlopsTarget(0.01))
    assert result.budget_met is False
    assert result.layers[0].rank == 1


def test_allocate_picks_the_cheaper_error_per_flop():
    def options(w):
        errors = rank_errors(w, 1, "dw-pw")
        choice = {DENSE: (dense_flops(w.shape, 100), 0.0)}
        for r in range(1, len(errors)):
            choice[("dw-pw", r)] = (pair_flops("dw-pw", r, w.shape, 1, 100, 100), float(errors[r]) ** 2)
        return Choice(choice)

    w_easy = torch.zeros(8, 8, 3, 3)
    w_easy[:, :, 1, 1] = torch.randn(8, 8)  # rank 1 per slice: exact at rank 1
    w_hard = torch.randn(8, 8, 3, 3)
    choices = [options(w) for w in (w_easy, w_hard)]
    budget = choices[0].options[("dw-pw", 1)][0] + choices[1].options[("dw-pw", 4)][0]
    picks, met = allocate(choices, budget)
    assert met and picks[0] == ("dw-pw", 1) and picks[1][1] >= 3


def test_energy_picks_the_smallest_rank_keeping_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    result = convtool.separate(model, rank=convtool.Energy(0.6))
    assert [layer.name for layer in result.layers] == ["0", "2"]
    for layer, conv in zip(result.layers, (model[0], model[2])):
        errors = rank_errors(conv.weight, 1, "dw-pw")
        assert 1 - float(errors[layer.rank]) ** 2 >= 0.6 - 1e-9
        assert 1 - float(errors[layer.rank - 1]) ** 2 < 0.6


def test_auto_order_picks_pointwise_first_where_it_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, bias=False)
    with torch.no_grad():
        # W[n, m] = a[n, m] * f[n]: one spatial filter per output, exactly rank 1 as "pw-dw".
        conv.weight.copy_(torch.randn(4, 8)[:, :, None, None] * torch.randn(4, 1, 3, 3))
    result = convtool.separate(nn.Sequential(conv), rank=1, order="auto")
    assert result.layers[0].order == "pw-dw" and result.layers[0].weight_error < 1e-6
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(result.model(x), conv(x), rtol=1e-4, atol=1e-5)
    dw = convtool.separate(nn.Sequential(conv), rank=1, order="dw-pw")
    assert dw.layers[0].weight_error > 0.1


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(rank="auto"), "FlopsTarget"),
        (dict(rank=0.5), "positive integer"),
    ],
)
def test_bad_rank_options(options, message):
    with pytest.raises(InvalidOptionError, match=message):
        convtool.separate(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), **options)


def test_auto_needs_inputs_to_cost_layers():
    with pytest.raises(InvalidOptionError, match="example inputs"):
        convtool.separate(nn.Conv2d(3, 8, 3), rank=convtool.FlopsTarget(0.5))


def _output_error(model, reference, x):
    with torch.no_grad():
        out, ref = model(x), reference(x)
    return float((out - ref).norm() / ref.norm())


def test_calibration_lowers_output_error():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetLike()).eval()
    data = torch.randn(64, 3, 32, 32)
    held_out = torch.randn(16, 3, 32, 32)
    plain = convtool.separate(model, data[:1], rank=1)
    calibrated = convtool.separate(model, data[:1], rank=1, calibration=data)
    assert _output_error(calibrated.model, model, held_out) < 0.8 * _output_error(plain.model, model, held_out)


def test_calibration_refits_pointwise_first_pairs_too():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetLike()).eval()
    data = torch.randn(64, 3, 32, 32)
    plain = convtool.separate(model, data[:1], rank=1, order="pw-dw")
    calibrated = convtool.separate(model, data[:1], rank=1, order="pw-dw", calibration=data)
    assert _output_error(calibrated.model, model, data) < 0.8 * _output_error(plain.model, model, data)


def test_batchnorm_reestimation_uses_the_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
    data = torch.randn(64, 3, 12, 12) * 2 + 1
    result = convtool.separate(model, data[:1], rank="full", calibration=data, recalibrate_bn=True)
    with torch.no_grad():
        first = model[0](data)  # full rank: the pair reproduces the conv
    torch.testing.assert_close(result.model[1].running_mean, first.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
    assert not result.model.training and result.model[1].momentum == model[1].momentum


@pytest.mark.parametrize("entry", [e for e in ZOO if e.name in ("two_inputs", "detector", "functional", "unet", "reused")],
                         ids=lambda e: e.name)
def test_calibration_runs_across_the_zoo(entry):
    model, inputs = build(entry)
    data = tuple(torch.cat([x] * 4) for x in inputs)
    result = convtool.separate(model, inputs, rank=1, calibration=data if len(data) > 1 else data[0])
    with torch.no_grad():
        result.model(*inputs)


def test_calibration_accepts_batches_and_rejects_junk():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    batches = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    convtool.separate(model, batches[0], calibration=batches)
    with pytest.raises(InvalidOptionError, match="calibration"):
        convtool.separate(model, batches[0], calibration=42)
    with pytest.raises(InvalidOptionError, match="calibration"):
        convtool.separate(model, batches[0], calibration=["not a tensor"])


def test_distillation_lowers_the_loss_deterministically():
    torch.manual_seed(0)
    teacher = randomize_batchnorm(ResNetLike()).eval()
    data = torch.randn(128, 3, 32, 32)
    student = convtool.separate(teacher, data[:1], rank=1).model
    snapshot = {k: v.clone() for k, v in student.state_dict().items()}
    first = convtool.distill(student, teacher, data, steps=30, batch_size=16, lr=3e-3, seed=3)
    second = convtool.distill(student, teacher, data, steps=30, batch_size=16, lr=3e-3, seed=3)
    assert first.losses == second.losses
    assert sum(first.losses[-5:]) < 0.7 * sum(first.losses[:5])
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in snapshot.items())
    assert _output_error(first.student.eval(), teacher, data[:16]) < _output_error(student, teacher, data[:16])


def test_distillation_with_features_multi_input_and_dict_outputs():
    for build_model, data in (
        (TwoInputs, (torch.randn(32, 3, 16, 16), torch.randn(32, 1, 16, 16))),
        (DetectorLike, torch.randn(32, 3, 32, 32)),
    ):
        teacher = randomize_batchnorm(build_model()).eval()
        example = tuple(t[:1] for t in data) if isinstance(data, tuple) else data[:1]
        student = convtool.separate(teacher, example, rank=1).model
        steps = []
        result = convtool.distill(student, teacher, data, steps=8, batch_size=8, features=True,
                                  on_step=lambda s, loss: steps.append(s))
        assert steps == list(range(1, 9)) and len(result.losses) == 8


class _Counted(nn.Module):
    """Counts forward passes of every copy convtool makes, as one class-wide figure."""

    passes = 0

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(depth)))

    def forward(self, x):
        type(self).passes += 1
        return self.body(x)


def test_the_refit_costs_one_pass_per_batch_whatever_the_depth():
    """Refitting layer by layer ran both models up to each layer: passes grew with depth."""
    data = torch.randn(96, 8, 8, 8)  # three batches
    counts = {}
    for depth in (2, 6):
        torch.manual_seed(0)
        model = _Counted(depth).eval()
        _Counted.passes = 0
        convtool.separate(model, data[:1], rank=1)
        plain = _Counted.passes
        _Counted.passes = 0
        convtool.separate(model, data[:1], rank=1, calibration=data)
        counts[depth] = _Counted.passes - plain
    # the reference and the separated model once per batch, and one check that the data fits the model
    assert counts[2] == counts[6] == 2 * 3 + 1


class _Branchy(nn.Module):
    """Runs its second conv twice on inputs with a positive mean, once otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.b(self.a(x))
        return self.b(y) if bool(x.mean() > 0) else y


def test_a_batch_that_takes_another_path_is_not_fitted_to_mismatched_targets():
    torch.manual_seed(0)
    model = _Branchy().eval()
    positive, negative = torch.randn(32, 4, 8, 8).abs(), -torch.randn(32, 4, 8, 8).abs()
    # In the separated model the first batch is positive, as in the reference, and fits; on
    # the mixed data, batch by batch, each batch keeps its own path in both models.
    result = convtool.separate(model, positive[:1], rank="full", calibration=[positive, negative, positive])
    with torch.no_grad():
        for x in (positive, negative):
            torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)


def test_costing_ranks_and_the_refit_share_the_first_batch():
    """The planner's activations are the refit's first targets: no extra dense pass for costing."""
    data = torch.randn(96, 8, 8, 8)  # three batches
    torch.manual_seed(0)
    model = _Counted(3).eval()
    # Leaves room for ranks above 1, so ranks are costed; at each layer's output (sensitivity runs the model more).
    target = convtool.FlopsTarget(0.6, sensitivity=False)
    _Counted.passes = 0
    convtool.separate(model, data[:1], rank=target)
    plain = _Counted.passes
    _Counted.passes = 0
    result = convtool.separate(model, data[:1], rank=target, calibration=data)
    assert {layer.rank for layer in result.layers} != {1}
    # the reference and the separated model once per batch, and one check that the data fits
    assert _Counted.passes - plain == 2 * 3 + 1


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_refitting_both_halves_reports_the_error_it_leaves_and_never_a_worse_one(order):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False)).eval()
    data = torch.randn(80, 6, 10, 10)
    last = convtool.separate(model, data[:1], rank=1, order=order, calibration=data)
    both = convtool.separate(model, data[:1], rank=1, order=order, calibration=data, refit="both")
    for a, b in zip(last.layers, both.layers):
        assert b.output_error <= a.output_error + 1e-9
    # both orders: some layer gains, and the first layer's error is its own, measured on the data the refit used
    assert any(b.output_error < a.output_error - 1e-3 for a, b in zip(last.layers, both.layers))
    with torch.no_grad():
        expected = float((both.model[0](data) - model[0](data)).norm() / model[0](data).norm())
    assert both.layers[0].output_error == pytest.approx(expected, rel=1e-3)
    with torch.no_grad():  # the last layer's error: its pair on the separated model's input, against the original's output
        expected = float((both.model(data) - model(data)).norm() / model(data).norm())
    assert both.layers[-1].output_error == pytest.approx(expected, rel=1e-3)
    exact = convtool.separate(model, data[:1], rank="full", calibration=data, refit="both")
    with torch.no_grad():
        torch.testing.assert_close(exact.model(data), model(data), rtol=1e-4, atol=1e-4)
    with pytest.raises(convtool.InvalidOptionError, match="refit"):
        convtool.separate(model, data[:1], rank=1, calibration=data, refit="first")


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_refitting_both_halves_of_a_conv_with_a_padding_mode(order):
    """A reflect-padded conv pads inside its pair: the dense equations must use the padding the spatial half's call used
    (a depthwise-first pair's refit once crashed on the zoo's U-Net by padding a padded input again)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(12, 16, 3, padding=1, padding_mode="reflect")).eval()
    data = torch.randn(48, 6, 10, 10)
    last = convtool.separate(model, data[:1], rank=2, order=order, calibration=data)
    both = convtool.separate(model, data[:1], rank=2, order=order, calibration=data, refit="both")
    for a, b in zip(last.layers, both.layers):
        assert b.output_error <= a.output_error + 1e-9
    with torch.no_grad():
        expected = float((both.model(data) - model(data)).norm() / model(data).norm())
    assert both.layers[-1].output_error == pytest.approx(expected, rel=1e-3)
