"""What a conv costs: parameters, and multiply-adds counted as fvcore counts them.

fvcore counts a conv call as (output elements) x (input channels per group) x kh x kw
multiply-adds; the pair's two convs are counted the same way, so these formulas agree with
``convtool.analyze`` call for call. ``in_pixels`` / ``out_pixels`` are batch x H x W summed over
a weight's calls.
"""

from __future__ import annotations

from typing import Sequence


def dense_params(weight_shape: Sequence[int], bias: bool) -> int:
    """N * M/g * kh * kw (+ N)."""
    n, m_g, kh, kw = weight_shape
    return n * m_g * kh * kw + (n if bias else 0)


def dense_flops(weight_shape: Sequence[int], out_pixels: int) -> int:
    """N * M/g * kh * kw multiply-adds per output pixel."""
    n, m_g, kh, kw = weight_shape
    return n * m_g * kh * kw * out_pixels


def pair_flops(order: str, rank: int, weight_shape: Sequence[int], groups: int, in_pixels: int, out_pixels: int) -> int:
    """Multiply-adds of a rank-r pair standing in for a dense conv of ``weight_shape``.

    ``"dw-pw"``: M*r*k^2 + N*(M/g)*r per output pixel. ``"pw-dw"``: the pointwise runs at the
    input resolution (before the stride), N*r*(M/g) per input pixel, then N*r*k^2 per output pixel.
    """
    n, m_g, kh, kw = weight_shape
    k = kh * kw
    if order == "dw-pw":
        return (m_g * groups * rank * k + n * m_g * rank) * out_pixels
    return n * rank * m_g * in_pixels + n * rank * k * out_pixels


def pair_params(order: str, rank: int, weight_shape: Sequence[int], groups: int, bias: bool) -> int:
    """Parameters of a rank-r pair: its FLOPs per output pixel at stride 1, plus the bias."""
    return pair_flops(order, rank, weight_shape, groups, 1, 1) + (weight_shape[0] if bias else 0)
