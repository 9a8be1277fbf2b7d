"""The judged solve: which shrinkage it picks, and how few solves it spends picking it."""

import math

import pytest
import torch

import convtool.recovery.equations as equations
from convtool.recovery.equations import SHRINKAGE, NormalEquations


def _equations(groups: int, features: int, rows: int, noise: float, seed: int) -> tuple[NormalEquations, NormalEquations, torch.Tensor]:
    """Fit and held-out equations of a linear problem per group, and a prior near the true weights."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(groups, features, 1, generator=g, dtype=torch.float64)
    prior = truth + 0.3 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    made = []
    for n in (rows, rows):
        x = torch.randn(1, groups, features, n, generator=g, dtype=torch.float64)
        y = (truth.transpose(1, 2) @ x[0])[None] + noise * torch.randn(1, groups, 1, n, generator=g, dtype=torch.float64)
        e = NormalEquations(0)
        e.add(x, y, None)
        made.append(e)
    return made[0], made[1], prior


def _held_error(fit: NormalEquations, held: NormalEquations, strength: float | None, prior: torch.Tensor) -> float:
    return held.relative_error(prior if strength is None else fit.solve(strength, prior))


@pytest.mark.parametrize("rows, noise", [(12, 1.0), (40, 0.5), (400, 0.01)])
def test_the_strength_judged_on_a_sample_of_groups_is_near_the_best_on_all(rows, noise):
    fit, held, prior = _equations(groups=256, features=24, rows=rows, noise=noise, seed=rows)
    _, chosen = fit.solve_judged(prior, held)
    every = {s: _held_error(fit, held, s, prior) for s in (*SHRINKAGE, None)}
    assert _held_error(fit, held, chosen, prior) <= min(every.values()) * 1.05


def test_well_determined_equations_stop_after_a_few_solves(monkeypatch):
    fit, held, prior = _equations(groups=8, features=10, rows=2000, noise=1e-3, seed=0)
    calls = []
    solve = equations.solve_normal_equations
    monkeypatch.setattr(equations, "solve_normal_equations", lambda *a, **k: calls.append(1) or solve(*a, **k))
    _, chosen = fit.solve_judged(prior, held)
    assert chosen == SHRINKAGE[0]
    assert len(calls) <= 3 + 1 < len(SHRINKAGE) + 1  # judged until the error rose, then the one on all the data


def test_the_prior_wins_when_the_data_say_nothing():
    fit, held, prior = _equations(groups=4, features=30, rows=3, noise=50.0, seed=1)
    solution, chosen = fit.solve_judged(prior, held)
    assert chosen is None or chosen >= 1.0
    if chosen is None:
        torch.testing.assert_close(solution, prior)
    assert math.isfinite(held.relative_error(solution))
