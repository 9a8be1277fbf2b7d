"""The algebra of separation: SVD factors of a convolution weight.

A dense conv weight W has shape (N, M/g, *k) for 1-, 2- or 3-d kernels k; K = prod(k) below.
Two factorisations are exact at full rank:

* ``"dw-pw"`` (depthwise then pointwise, MobileNet): for each input channel m, the slice
  W[:, m] is an (N/g) x K matrix A = U S V^T. Its rank-r truncation gives r depthwise
  filters for channel m (rows of V^T) and the pointwise weights that mix them (columns of U).
* ``"pw-dw"`` (pointwise then depthwise, BSConv-U / Network Decoupling): for each output channel
  n, the slice W[n] is an (M/g) x K matrix; its rank-r truncation gives r pointwise
  combinations of the input channels and one spatial filter per combination.

A transposed conv's weight is stored (M, N/g, *k), and output n sums, over the inputs m of its
group, the transposed conv of input m with filter W[m, n]. That is linear in the filter just as
a conv is, so the same slices (read from the other storage order) factor it: a depthwise
*transposed* conv (groups = its input channels, keeping stride, padding, output padding and
dilation) carries the spatial factors, and the pointwise half is an ordinary 1x1 conv, which
commutes with nothing but needs no transposition (stride 1, no padding).

By Eckart-Young the truncation is the best rank-r approximation of every slice in Frobenius
norm, so the relative error of the whole weight is a function of the discarded singular values
alone. The singular values are split evenly (sqrt(S) to each factor) so neither factor carries
the whole dynamic range, which matters when the factors are cast to float16.

Everything here is pure: tensors in, tensors out, computed in float64 and cast back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .threads import one_thread_for

Order = Literal["dw-pw", "pw-dw"]
ORDERS: tuple[str, ...] = ("dw-pw", "pw-dw")


@dataclass(frozen=True)
class Factors:
    """The weights of a separable pair.

    For ``"dw-pw"``: ``spatial`` is the depthwise weight (M*r, 1, *k), applied with
    groups=M; ``mixing`` is the pointwise weight (N, M/g*r, 1, ...), applied with groups=g.
    For ``"pw-dw"``: ``mixing`` is the pointwise weight (N*r, M/g, 1, ...), applied with groups=g;
    ``spatial`` is the weight (N, r, *k) applied with groups=N. For a transposed conv the
    spatial weight is stored as transposed convs store theirs: (M, r, *k) and (N*r, 1, *k).
    """

    spatial: Tensor
    mixing: Tensor
    rank: int
    order: str
    weight_error: float


def _check(weight: Tensor, groups: int, order: str) -> None:
    if weight.dim() not in (3, 4, 5):
        raise ValueError(f"expected a 1-, 2- or 3-d conv weight (3 to 5 dimensions), got shape {tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"the weight's first dimension {weight.shape[0]} is not divisible by groups={groups}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def as_conv_weight(weight: Tensor, groups: int = 1) -> Tensor:
    """A transposed conv's weight (M, N/g, *k) in a conv's layout (N, M/g, *k).

    Entry [n, j] is the filter from input j of n's group to output n, as in a conv weight.
    Its own inverse, with the roles of M and N swapped.
    """
    m, n_g, *k = weight.shape
    m_g = m // groups
    return weight.reshape(groups, m_g, n_g, *k).transpose(1, 2).reshape(groups * n_g, m_g, *k)


def _slices(weight: Tensor, groups: int, order: str) -> Tensor:
    """The batch of matrices whose SVDs give the factors, in float64.

    ``"dw-pw"``: one (N/g) x K matrix per input channel, shape (M, N/g, K), channels in order.
    ``"pw-dw"``: one (M/g) x K matrix per output channel, shape (N, M/g, K).
    """
    n, m_g, *k = weight.shape
    w = weight.detach().to(torch.float64).reshape(n, m_g, -1)
    if order == "pw-dw":
        return w
    # (g, N/g, M/g, K) -> (g, M/g, N/g, K): input channel m = gi * M/g + j sits at index m.
    return as_conv_weight(w, groups)


def _conv_layout(weight: Tensor, groups: int, transposed: bool) -> Tensor:
    return as_conv_weight(weight, groups) if transposed else weight


def max_rank(weight: Tensor, groups: int = 1, order: str = "dw-pw", transposed: bool = False) -> int:
    """The rank at which the factorisation is exact: min of the slice matrix's two sides."""
    _check(weight, groups, order)
    n, m_g, *k = _conv_layout(weight, groups, transposed).shape
    rows = n // groups if order == "dw-pw" else m_g
    return min(rows, math.prod(k))


def singular_values(weight: Tensor, groups: int = 1, order: str = "dw-pw", transposed: bool = False) -> Tensor:
    """Singular values of every slice, shape (slices, max_rank), descending, float64."""
    _check(weight, groups, order)
    slices = _slices(_conv_layout(weight, groups, transposed), groups, order)
    with one_thread_for(slices):
        return torch.linalg.svdvals(slices)


def rank_errors(weight: Tensor, groups: int = 1, order: str = "dw-pw", transposed: bool = False) -> Tensor:
    """Relative Frobenius error of the rank-r truncation for r = 0 .. max_rank (float64).

    Entry r is sqrt(sum of the discarded squared singular values / ||W||^2); entry 0 is 1
    (or 0 for an all-zero weight) and the last entry is 0.
    """
    s2 = singular_values(weight, groups, order, transposed).pow(2)
    total = s2.sum()
    # tail[r] = sum over slices of the squared singular values from index r on.
    tail = torch.flip(torch.cumsum(torch.flip(s2.sum(0), [0]), 0), [0])
    tail = torch.cat([tail, tail.new_zeros(1)])
    if total == 0:
        return torch.zeros_like(tail)
    return (tail / total).clamp_min(0).sqrt()


def separable_factors(
    weight: Tensor, rank: int, groups: int = 1, order: str = "dw-pw", transposed: bool = False
) -> Factors:
    """The rank-``rank`` separable factors of a dense conv weight.

    Args:
        weight: dense conv weight (N, M/g, *k), or a transposed conv's (M, N/g, *k) with
            ``transposed``; any float dtype and device.
        rank: factors per slice; clamped to :func:`max_rank`, where the result is exact.
        groups: the dense conv's groups; the mixing factor keeps them.
        order: ``"dw-pw"`` or ``"pw-dw"``.
        transposed: the weight is a transposed conv's.

    Returns:
        :class:`Factors` in the weight's dtype and device, with its relative Frobenius error (``weight_error``)
        of the approximation.

    Example:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> f = separable_factors(w, rank=9)
        >>> f.spatial.shape, f.mixing.shape, f.weight_error < 1e-12
        (torch.Size([32, 1, 3, 3]), torch.Size([8, 32, 1, 1]), True)
    """
    _check(weight, groups, order)
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    conv = _conv_layout(weight, groups, transposed)
    n, m_g, *k = conv.shape
    ones = (1,) * len(k)
    r = min(rank, max_rank(conv, groups, order))
    slices = _slices(conv, groups, order)
    with one_thread_for(slices):
        u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    root = s[:, :r].sqrt()
    left = u[:, :, :r] * root[:, None, :]  # (slices, rows, r)
    right = vh[:, :r, :] * root[:, :, None]  # (slices, r, K)

    s2 = s.pow(2)
    total = s2.sum()
    error = float((s2[:, r:].sum() / total).sqrt()) if total > 0 else 0.0

    if order == "dw-pw":
        # Depthwise channel m*r + i holds filter i of input channel m.
        # A transposed depthwise conv stores the same filters as (in = M, out/groups = r, *k).
        spatial = right.reshape(groups * m_g, r, *k) if transposed else right.reshape(groups * m_g * r, 1, *k)
        n_g = n // groups
        # Pointwise: output n of group gi reads channels (m, i) of that group's inputs, in order.
        mixing = (
            left.reshape(groups, m_g, n_g, r).permute(0, 2, 1, 3).reshape(n, m_g * r, *ones)
        )
    else:
        # Pointwise channel n*r + i is combination i for output channel n; the grouped
        # spatial conv (groups=N, r inputs each) sums the r filtered combinations.
        mixing = left.transpose(1, 2).reshape(n * r, m_g, *ones)
        spatial = right.reshape(n * r, 1, *k) if transposed else right.reshape(n, r, *k)
    cast = dict(dtype=weight.dtype, device=weight.device)
    return Factors(
        spatial=spatial.to(**cast).contiguous(),
        mixing=mixing.to(**cast).contiguous(),
        rank=r,
        order=order,
        weight_error=error,
    )


def dense_weight(
    spatial: Tensor, mixing: Tensor, rank: int, groups: int = 1, order: str = "dw-pw", transposed: bool = False
) -> Tensor:
    """The dense conv weight a pair of factors computes: the inverse of :func:`separable_factors`.

    Exact for any factors, truncated or refit, so code that reads a separated layer's
    ``weight`` sees what the pair really applies; in the transposed conv's layout with
    ``transposed``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    k = tuple(spatial.shape[2:])
    kk = math.prod(k)
    n = mixing.shape[0] if order == "dw-pw" else mixing.shape[0] // rank
    if order == "dw-pw":
        m_g = mixing.shape[1] // rank
        s = spatial.reshape(groups, m_g, rank, kk)
        p = mixing.reshape(groups, n // groups, m_g, rank)
        dense = torch.einsum("gnjr,gjrk->gnjk", p, s).reshape(n, m_g, *k)
    else:
        m_g = mixing.shape[1]
        p = mixing.reshape(n, rank, m_g)
        s = spatial.reshape(n, rank, kk)
        dense = torch.einsum("nrj,nrk->njk", p, s).reshape(n, m_g, *k)
    return as_conv_weight(dense, groups) if transposed else dense
