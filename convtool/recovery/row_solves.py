"""The ridge least squares of few rows, solved in the rows' terms: a system of the rows, not of the features.

A wide layer fit on its first calibration batch has fewer rows than features (a pitch
tracker's: 4,128 rows for 10,241 features); its Gram matrix of rows is taken once and serves
every strength a judged refit tries (:class:`~convtool.recovery.equations.NormalEquations`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..core.threads import one_thread_for


def ridge_scale(xx: Tensor, ridge: float) -> Tensor:
    """λ of :func:`~convtool.recovery.equations.solve_normal_equations` per system: ``ridge`` times the mean of X Xᵀ's diagonal."""
    return ridge * xx.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)


def row_solver(x: Tensor, y: Tensor) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The ridge least squares of rows ``x`` (groups, features, n) and targets ``y`` (groups, outputs, n) at any λ, for few rows.

    The solution of (X Xᵀ + λI) W = X Yᵀ + λ W0 is W0 + X z with (Xᵀ X + λI) z = (Y - W0ᵀ X)ᵀ:
    a system of n rows instead of one of the features, and its Gram matrix Xᵀ X is taken once
    for every λ. The returned function takes λ per group (:func:`ridge_scale` of the
    equations' X Xᵀ, so both forms solve the same system) and W0 (None: zero).
    """
    gram = x.transpose(1, 2) @ x
    return lambda scale, prior: _solve_rows(gram, x, y, scale, prior)


def _solve_rows(gram: Tensor, x: Tensor, y: Tensor, scale: Tensor, prior: Tensor | None) -> Tensor:
    """:func:`row_solver`'s solve at one λ per group."""
    residual = (y if prior is None else y - prior.to(x).transpose(1, 2) @ x).transpose(1, 2)
    z = shifted_solve(gram, residual, scale.to(gram))
    return x @ z if prior is None else prior.to(x) + x @ z


def shifted_solve(a: Tensor, rhs: Tensor, scale: Tensor) -> Tensor:
    """Solve (a + λI) X = rhs for a batch of symmetric positive semi-definite ``a``, λ = ``scale`` per system.

    Cholesky where it succeeds (``cholesky_ex`` reports instead of raising), a pseudo-inverse for
    the rest; ``a`` is left as it was. The feature-space and the row-space solves share it.
    """
    a = a.clone()
    a.diagonal(dim1=1, dim2=2).add_(scale[:, None])
    with one_thread_for(a):
        factor, info = torch.linalg.cholesky_ex(a)
        solution = torch.cholesky_solve(rhs, factor)
        failed = info != 0
        if bool(failed.any()):
            solution[failed] = torch.linalg.pinv(a[failed], hermitian=True) @ rhs[failed]
    return solution
