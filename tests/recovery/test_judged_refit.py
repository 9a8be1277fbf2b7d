"""The refit's least squares are judged on held-out samples, and filterbanks (one input channel) are separable under a budget."""

import pytest
import torch
from torch import nn

import convtool
from convtool.recovery.equations import NormalEquations


def relative_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = reference(x)
        return float((model(x) - y).norm() / y.norm())


def test_few_samples_for_many_features_do_not_overfit_the_refit():
    # 8 samples at 3x3 output positions: 54 rows to fit after the held-out quarter, 128 features
    # (64 channels x rank 2) in each output's least squares. Plain least squares fit them exactly.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU()).eval()
    calibration, fresh = torch.randn(8, 64, 5, 5), torch.randn(64, 64, 5, 5)
    svd = convtool.separate(model, calibration[:1], rank=2).model
    fitted = convtool.separate(model, calibration[:1], rank=2, calibration=calibration).model
    assert relative_error(fitted, model, fresh) <= relative_error(svd, model, fresh) * 1.01
    plain = NormalEquations.solve_judged
    try:  # what the refit did before: the plain solve on every sample
        NormalEquations.solve_judged = lambda self, prior, held, hint=None: (self.plus(held).solve(), 1e-6)
        overfit = convtool.separate(model, calibration[:1], rank=2, calibration=calibration).model
    finally:
        NormalEquations.solve_judged = plain
    assert relative_error(overfit, model, fresh) > 1.2 * relative_error(fitted, model, fresh)


def smooth(n: int, mixing: torch.Tensor) -> torch.Tensor:
    """Inputs correlated across channels and pixels, as activations are (on white noise the SVD pair is already the fit)."""
    x = torch.nn.functional.interpolate(torch.randn(n, 3, 4, 4), size=(12, 12), mode="bilinear", align_corners=False)
    return torch.einsum("nchw,cd->ndhw", x, mixing) + 0.1 * torch.randn(n, 8, 12, 12)


def test_with_enough_samples_the_judged_refit_is_the_least_squares():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval()
    mixing = torch.randn(3, 8)
    data = smooth(64, mixing)
    fitted = convtool.separate(model, data[:1], rank=1, calibration=data)
    svd = convtool.separate(model, data[:1], rank=1)
    fresh = smooth(32, mixing)
    assert relative_error(fitted.model, model, fresh) < 0.9 * relative_error(svd.model, model, fresh)


def test_a_filterbank_is_separated_under_a_budget_and_kept_dense_under_a_fixed_rank():
    torch.manual_seed(2)
    # a learned audio front end in miniature: 1 input channel, 64 filters of 48 taps, then a 3x1 conv
    model = nn.Sequential(nn.Conv2d(1, 64, (48, 1), stride=(4, 1), padding=(22, 0)), nn.ReLU(),
                          nn.Conv2d(64, 32, (3, 1), padding=(1, 0))).eval()
    with torch.no_grad():  # a low-rank bank: 6 prototype filters mixed, as trained banks nearly are
        model[0].weight.copy_((torch.randn(64, 6) @ torch.randn(6, 48)).reshape(64, 1, 48, 1))
    x = torch.randn(16, 1, 256, 1)
    fixed = convtool.separate(model, x[:1], rank=2)
    assert [layer.name for layer in fixed.layers] == ["2"]
    assert any(s.name == "0" and "single input channel" in s.reason for s in fixed.skipped)
    budget = convtool.separate(model, x[:1], rank=convtool.FlopsTarget(0.3), calibration=x)
    bank = {layer.name: layer for layer in budget.layers}["0"]
    assert bank.rank <= 48 and bank.flops_after < bank.flops_before and budget.verified
    exact = convtool.separate(model, x[:1], rank=convtool.Energy(1.0))
    with torch.no_grad():
        torch.testing.assert_close(exact.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert {layer.name for layer in exact.layers} >= {"0"}


@pytest.mark.parametrize("layout", ["branches", "multiplier"])
def test_a_separated_filterbank_exports_as_one_conv_then_a_mix(tmp_path, layout):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 32, (16, 1), padding=(8, 0))).eval()
    with torch.no_grad():
        model[0].weight.copy_((torch.randn(32, 3) @ torch.randn(3, 16)).reshape(32, 1, 16, 1))
    x = torch.randn(2, 1, 64, 1)
    result = convtool.separate(model, x[:1], rank=convtool.Energy(0.95))
    exported = convtool.export_onnx(result.model, x, tmp_path / "bank.onnx", layout=layout)
    import onnx

    convs = [n for n in onnx.load(str(exported)).graph.node if n.op_type == "Conv"]
    assert result.layers[0].rank > 1 and len(convs) == 2  # a 1 -> r conv has no channel multiplier to split
    checks = convtool.verify_onnx(exported, result.model, x, providers=["cpu"])
    assert all(check.passed for check in checks)


def test_a_data_set_streamed_refits_as_the_same_samples_given_as_a_tensor():
    # The refit judges a layer called once at the last batch when it knows which batch is last;
    # a Dataset read through a loader must know it too, or its later layers see other weights.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(96, 3, 12, 12)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> torch.Tensor:
            return x[i]

    tensor = convtool.separate(model, x[:1], rank=1, calibration=x).model
    streamed = convtool.separate(model, x[:1], rank=1, calibration=Rows()).model
    for (key, a), b in zip(tensor.state_dict().items(), streamed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m, key=key: f"{key}: {m}")
