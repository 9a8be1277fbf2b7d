"""What a conv costs: parameters, and multiply-adds counted as fvcore counts them.

fvcore counts a conv call as (output elements) x (input channels per group) x K multiply-adds
(K the kernel's size), and a transposed conv's as (input elements) x (output channels per group)
x K; the pair's two convs are counted the same way, so these formulas agree with
``convtool.analyze`` call for call. ``in_pixels`` / ``out_pixels`` are batch x spatial positions
summed over a weight's calls.
"""

from __future__ import annotations

import math
from typing import Sequence


def dense_params(weight_shape: Sequence[int], bias: bool) -> int:
    """N * M/g * K (+ N), for ``weight_shape`` in a conv's layout (N, M/g, *k)."""
    return math.prod(weight_shape) + (weight_shape[0] if bias else 0)


def dense_flops(weight_shape: Sequence[int], out_pixels: float, in_pixels: float = 0, transposed: bool = False) -> float:
    """N * M/g * K multiply-adds per output pixel; a transposed conv's, per input pixel.

    ``weight_shape`` is in a conv's layout, (N, M/g, *k), for transposed convs too.
    """
    return math.prod(weight_shape) * (in_pixels if transposed else out_pixels)


def pair_flops(
    order: str, rank: int, weight_shape: Sequence[int], groups: int, in_pixels: float, out_pixels: float,
    transposed: bool = False,
) -> float:
    """Multiply-adds of a rank-r pair standing in for a dense conv of ``weight_shape`` (a conv's layout).

    ``"dw-pw"``: M*r*K per pixel of the spatial conv, then N*(M/g)*r per output pixel.
    ``"pw-dw"``: the pointwise runs at the input resolution, N*r*(M/g) per input pixel, then
    N*r*K per pixel of the spatial conv. The spatial conv's pixels are its output's, or its
    input's when it is transposed (each input pixel scatters a K-window).
    """
    n, m_g = weight_shape[0], weight_shape[1]
    k = math.prod(weight_shape[2:])
    spatial = in_pixels if transposed else out_pixels
    if order == "dw-pw":
        return m_g * groups * rank * k * spatial + n * m_g * rank * out_pixels
    return n * rank * m_g * in_pixels + n * rank * k * spatial
