"""The normal equations: float32 products summed in float64 for lossy pairs, float64 where the pair is exact, and the judged walk."""

import pytest
import torch
from torch import nn

import convtool
import convtool.recovery.calibrate as calibrate
import convtool.recovery.equations as equations
from convtool.recovery.calibrate import Layer, _Fit
from convtool.recovery.equations import SHRINKAGE, NormalEquations, _gram, _walk


def _products(cols: torch.Tensor, target: torch.Tensor, slots: int, slot: int | None):
    """X Xᵀ and X Yᵀ of a call in float64, the bias slots as rows of ones: what the equations sum."""
    b, g, f, length = cols.shape
    x = cols.permute(1, 2, 0, 3).reshape(g, f, b * length).double()
    ones = x.new_zeros(g, slots, b * length)
    if slot is not None:
        ones[:, slot] = 1
    x = torch.cat([x, ones], 1)
    y = target.reshape(b, g, -1, length).permute(1, 2, 0, 3).reshape(g, -1, b * length).double()
    return x @ x.transpose(1, 2), x @ y.transpose(1, 2)


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("slots, slot", [(0, None), (1, 0), (2, 1), (1, None)])
def test_the_sums_are_the_products_of_the_columns(precise, slots, slot, monkeypatch):
    monkeypatch.setattr(equations, "BLOCK", 20)  # several float32 blocks per call
    monkeypatch.setattr(equations, "SYMMETRIC_BLOCK", 3)  # and the Gram matrix in blocks
    torch.manual_seed(0)
    cols, target = torch.randn(6, 2, 9, 13), torch.randn(6, 2 * 3, 13)
    e = NormalEquations(slots, precise=precise)
    e.add(cols[:4], target[:4], slot)
    e.add(cols[4:], target[4:], slot)
    xx, xy = _products(cols, target, slots, slot)
    tolerance = dict(rtol=1e-12, atol=1e-12) if precise else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.xx, xx, **tolerance)
    torch.testing.assert_close(e.xy, xy, **tolerance)
    assert e.xx.dtype == torch.float64 and e.rows == 6 * 13
    assert e.yy == pytest.approx(float(target.double().pow(2).sum()))


def test_only_the_upper_blocks_of_a_wide_gram_matrix_are_multiplied(monkeypatch):
    monkeypatch.setattr(equations, "SYMMETRIC_BLOCK", 64)
    x = torch.randn(3, 200, 50, dtype=torch.float64)
    torch.testing.assert_close(_gram(x), x @ x.transpose(1, 2))
    products = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: products.append(a.shape[1] * b.shape[2]) or real(a, b))
    _gram(x)
    assert sum(products) < 0.7 * 200 * 200


def test_a_lossy_pair_sums_in_float32_and_an_exact_one_in_float64():
    conv = nn.Conv2d(8, 16, 3)
    lossy = convtool.SeparableConv.from_conv(conv, rank=1)
    exact = convtool.SeparableConv.from_conv(conv, rank=9)
    assert not _Fit(Layer("lossy", conv.weight, [lossy])).precise
    assert _Fit(Layer("exact", conv.weight, [exact])).precise


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_the_full_rank_refit_stays_exact_on_a_wide_tall_kernel_layer(order):
    """Many features and 64-tap kernels, as the pitch tracker's: the exact refit's float64 sums keep it exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(24, 32, (64, 1), padding=(32, 0)), nn.ReLU(), nn.Conv2d(32, 16, (9, 1), padding=(4, 0))).eval()
    data = torch.randn(40, 24, 96, 1)
    result = convtool.separate(model, data[:1], rank="full", order=order, calibration=data)
    with torch.no_grad():
        torch.testing.assert_close(result.model(data), model(data), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("curve", [
    [5, 4, 3, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1], [3, 3, 2, 2, 5, 6, 7], [9, 8, 8, 8, 9, 10, 11],
])
@pytest.mark.parametrize("first", range(len(SHRINKAGE)))
def test_the_walk_finds_the_minimum_of_a_curve_that_falls_then_rises_from_any_start(curve, first):
    scored = []
    index, best = _walk(lambda i: scored.append(i) or curve[i], first)
    assert best == min(curve) and len(scored) == len(set(scored))
    if first == 0:  # the walk of weakest first: up to the first rise, ties to the stronger
        rise = next((i for i in range(1, len(curve)) if curve[i] > curve[i - 1]), len(curve))
        assert index == rise - 1 and sorted(scored) == list(range(min(rise + 1, len(curve))))


def test_a_layer_called_once_is_judged_at_its_first_and_last_batch_only(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    data = torch.randn(96, 8, 10, 10)  # three batches
    judged = []
    real = NormalEquations.solve_judged
    monkeypatch.setattr(NormalEquations, "solve_judged", lambda self, *a, **k: judged.append(self.xx.shape[1]) or real(self, *a, **k))
    result = convtool.separate(model, data[:1], rank=1, calibration=data)
    # The first layer at the first batch and the last (it feeds the second); the second, which
    # feeds no refit layer, at the last batch only; none at the end.
    assert len(result.layers) == 2 and sorted(judged) == sorted([8 + 1, 8 + 1, 16 + 1])
    with torch.no_grad():  # the error reported is that of the weights installed
        expected = float((result.model[0](data) - model[0](data)).norm() / model[0](data).norm())
    assert result.layers[0].output_error == pytest.approx(expected, rel=1e-4)


def test_the_last_refit_layer_installed_at_its_last_batch_only_gets_the_weights_it_got_installed_at_every_batch(monkeypatch):
    """Its installs before the last batch fed no refit layer: skipping them changes no weights, only the solves spent."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3, padding=1)).eval()
    data = torch.randn(96, 8, 10, 10)  # three batches
    solves = []
    real = equations.solve_normal_equations
    monkeypatch.setattr(equations, "solve_normal_equations", lambda xx, *a: solves.append(xx.shape[1]) or real(xx, *a))

    def separated():
        solves.clear()
        result = convtool.separate(model, data[:1], rank=1, calibration=data)
        return result, solves.count(16 + 1)

    skipped, spent = separated()
    monkeypatch.setattr(calibrate, "_feeding", lambda targets, wanted: {k for k in targets if k in wanted})  # every layer installed at every batch
    every, spent_before = separated()
    assert spent < spent_before
    for a, b in zip(skipped.model.state_dict().values(), every.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("with_prior", [True, False])
def test_few_rows_solved_in_their_own_terms_give_the_least_squares_of_the_features(with_prior):
    """W0 + X z with (XᵀX + λI) z = (Y - W0ᵀX)ᵀ is the solution of (XXᵀ + λI) W = XYᵀ + λW0, at every strength."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 15, generator=g, dtype=torch.float64) @ torch.randn(3, 15, 15, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, 15, generator=g, dtype=torch.float64)
    prior = torch.randn(3, 40, 5, generator=g, dtype=torch.float64) if with_prior else None
    xx, xy = x @ x.transpose(1, 2), x @ y.transpose(1, 2)
    solve = equations.row_solver(x, y)
    for strength in SHRINKAGE:
        torch.testing.assert_close(solve(equations.ridge_scale(xx, strength), prior),
                                   equations.solve_normal_equations(xx, xy, strength, prior), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("slots, slot", [(0, None), (2, 1)])
def test_equations_of_few_rows_judge_and_solve_as_their_float64_sums_do(slots, slot, precise):
    """Kept rows (fewer than half the features) choose the strength and the weights the Gram matrices do.

    Those of float64 sums: the rows are kept in float64 for lossy pairs too, so a few-row
    system (ill-conditioned at weak strengths) is solved as if its sums were exact.
    """
    g = torch.Generator().manual_seed(1)
    features, outputs = 80, 4
    truth = torch.randn(1, features + slots, outputs, generator=g, dtype=torch.float64)
    prior = truth + 0.3 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    kept, summed = [], []
    for samples in (2, 1):  # 2 x 12 rows to fit, 12 held out: fewer than half the features, together too
        calls = [(torch.randn(1, 1, features, 12, generator=g), torch.randn(1, outputs, 12, generator=g)) for _ in range(samples)]
        for made, exact in ((kept, precise), (summed, True)):
            e = NormalEquations(slots, precise=exact)
            for cols, target in calls:
                e.add(cols, target, slot)
            made.append(e)
    fit, held = kept
    assert fit.kept and held.kept and fit.rows == 24
    judged, solved = fit.solve_judged(prior, held), fit.solve(1e-2, prior)
    with fit.including(held) as every:
        assert sum(x.shape[2] for x, _ in every.kept) == every.rows == 36  # both's rows, let go after the block
    assert sum(x.shape[2] for x, _ in fit.kept) == fit.rows == 24
    fit, held = summed
    fit.kept = held.kept = None  # the Gram matrices alone
    expected = fit.solve_judged(prior, held)
    assert judged[1] == expected[1] is not None
    torch.testing.assert_close(judged[0], expected[0])
    torch.testing.assert_close(solved, fit.solve(1e-2, prior))


def test_equations_let_their_rows_go_once_they_are_many():
    e = NormalEquations(1, precise=False)
    e.add(torch.randn(2, 1, 20, 5), torch.randn(2, 3, 5), 0)  # 10 rows for 21 features
    assert e.kept is not None and e.kept[0][0].shape == (1, 21, 10)
    other = NormalEquations(1, precise=False)
    other.add(torch.randn(1, 1, 20, 5), torch.randn(1, 3, 5), 0)
    assert e.plus(other).kept is None  # 15 rows: more than half the features
    with e.including(other) as every:
        assert every.kept is None
    assert e.kept is not None
    e.add(torch.randn(1, 1, 20, 5), torch.randn(1, 3, 5), None)
    assert e.kept is None
    e.add(torch.randn(1, 1, 20, 1), torch.randn(1, 3, 1), None)
    assert e.kept is None  # never kept again: some rows are gone
