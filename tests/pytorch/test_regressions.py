"""Bugs found in review, each pinned by the reproduction that showed it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convtool


class FunctionalBufferBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.register_buffer("b", torch.randn(8))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=1)


def test_functional_conv_with_a_buffer_bias():
    model, x = FunctionalBufferBias(), torch.randn(1, 4, 8, 8)
    result = convtool.separate(model, x, rank="full")
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def _weight_normed():
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 8, 3, padding=1))
    return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()


def test_parametrized_conv_with_calibration_and_budget():
    model, x = _weight_normed(), torch.randn(1, 4, 10, 10)
    calibrated = convtool.separate(model, x, rank=2, calibration=torch.randn(16, 4, 10, 10))
    assert [layer.name for layer in calibrated.layers] == ["0", "2"]
    budget = convtool.separate(model, x, rank=convtool.FlopsTarget(0.5))
    assert not any("did not run" in s.reason for s in budget.skipped)
    full = convtool.separate(model, x, rank="full")
    torch.testing.assert_close(full.model(x), model(x), rtol=1e-4, atol=1e-5)
    assert torch.nn.utils.parametrize.is_parametrized(model[0])  # the caller's model keeps it


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)

    def forward(self, x):
        return F.conv2d(x, self.w, padding=1)[:, :, ::2, ::2] + F.conv2d(x, self.w, padding=1, stride=2)


def test_one_weight_in_two_calls_with_calibration():
    model, x = SharedWeight(), torch.randn(1, 4, 8, 8)
    result = convtool.separate(model, x, rank="full", calibration=torch.randn(8, 4, 8, 8))
    (layer,) = result.layers  # one weight, one layer: its two call settings share the factors
    assert layer.name == "w" and len(layer.aliases) == 1 and layer.calls == 2
    assert layer.output_error is not None and layer.output_error < 1e-5
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_budget_counts_pointwise_first_pairs_on_the_unpadded_input(mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1, stride=2, padding_mode=mode), nn.ReLU(), nn.Conv2d(32, 32, 5, padding=2, padding_mode=mode)
    ).eval()
    x = torch.randn(1, 16, 32, 32)
    result = convtool.separate(model, x, rank=convtool.FlopsTarget(0.3), order="pw-dw")
    assert result.flops_after == pytest.approx(convtool.analyze(result.model, x).flops, rel=0.01)
    assert max(layer.rank for layer in result.layers) == 2


def test_energy_with_auto_order_weighs_the_stride():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 16, 3, padding=1, stride=2))
    x = torch.randn(1, 64, 32, 32)
    auto = convtool.separate(model, x, rank=convtool.Energy(0.5), order="auto")
    # At stride 2 the pointwise-first pair costs more than the dense conv, so that order keeps it dense.
    with pytest.raises(convtool.NothingToSeparateError, match="costs .* the dense conv"):
        convtool.separate(model, x, rank=convtool.Energy(0.5), order="pw-dw")
    dw = convtool.separate(model, x, rank=convtool.Energy(0.5), order="dw-pw")
    assert convtool.analyze(auto.model, x).flops == convtool.analyze(dw.model, x).flops
    assert auto.layers[0].order == "dw-pw"


class Guarded(nn.Module):
    """A forward that swallows every Exception: calibration's early stop must get through."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        try:
            y = self.a(x)
        except Exception:
            y = torch.zeros(x.shape[0], 8, *x.shape[2:])
        return self.b(y)


def test_calibration_early_stop_is_not_swallowed():
    model, x = Guarded().eval(), torch.randn(1, 3, 8, 8)
    plain = convtool.separate(model, x, rank=1)
    calibrated = convtool.separate(model, x, rank=1, calibration=torch.randn(32, 3, 8, 8))
    err = lambda m: float((m(x) - model(x)).detach().norm())  # noqa: E731
    assert err(calibrated.model) < err(plain.model)


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.dropout(self.c(x).mean((2, 3)), 0.5, self.training))


def test_saved_model_keeps_mode_dependent_code(tmp_path):
    from convtool.io import save_model

    model, x = ModeDependent().eval(), torch.randn(1, 3, 8, 8)
    separated = convtool.separate(model, x, rank="full").model
    assert save_model(separated, tmp_path / "m.pt", (x,)) is False  # saved as-is, not traced
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded) is ModeDependent


def test_bias_correction_is_counted_after_not_before():
    """The refit gives a bias to a layer trained without one; the report once counted it in params_before too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()).eval()
    # Non-negative inputs, as after a ReLU: the pair's error then has a mean the bias removes (on
    # zero-mean noise the judged refit rightly keeps the SVD pair and its zero bias).
    x = torch.rand(32, 8, 10, 10)
    result = convtool.separate(model, x[:1], rank=2, calibration=x)
    (layer,) = result.layers
    assert layer.params_before == 16 * 8 * 3 * 3
    assert layer.params_after == 8 * 2 * 3 * 3 + 16 * 8 * 2 + 16  # the fitted bias is the separated layer's
    assert result.model[0].bias is not None and bool(result.model[0].bias.abs().sum() > 0)
    (reported,) = result.report(x[:1]).layers
    assert (reported.params_before, reported.params_after) == (layer.params_before, layer.params_after)
    (compared,) = convtool.compare(model, result.model, x[:1]).layers
    assert (compared.params_before, compared.params_after) == (layer.params_before, layer.params_after)
