"""Choosing a rank and an order for every layer: under a FLOP budget, or by spectral energy.

The budget is a multiple-choice knapsack: each layer has a few options (dense, or a rank and an
order), each with a cost in FLOPs and an error. Greedy by error saved per FLOP is near-optimal
and fast: it starts every layer at its cheapest option and buys the best upgrades that fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.overrides import TorchFunctionMode

from .decompose import ORDERS, max_rank, rank_errors

DENSE = ("dense", 0)  # the option of leaving a layer as it is


@dataclass(frozen=True)
class ConvShape:
    """What one conv weight processes per forward pass, summed over its calls."""

    in_pixels: int  # sum over calls of batch * H_in * W_in
    out_pixels: int  # sum over calls of batch * H_out * W_out
    calls: int
    input_shape: tuple[int, ...] = ()  # of the first call


class _RecordConvs(TorchFunctionMode):
    """Records every conv2d call: output pixels per weight, and optionally the inputs."""

    def __init__(self, keep_inputs: set[int] | None = None) -> None:
        super().__init__()
        self.shapes: dict[int, list] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.keep_inputs = keep_inputs or set()
        self.inputs: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.conv2d, torch.nn.functional.conv2d):
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            key = id(w)
            rec = self.shapes.setdefault(key, [0, 0, 0, tuple(x.shape)])
            batch = x.shape[0] if x.dim() == 4 else 1
            rec[0] += batch * x.shape[-2] * x.shape[-1]
            rec[1] += batch * out.shape[-2] * out.shape[-1]
            rec[2] += 1
            self.weights[key] = w
            if key in self.keep_inputs and key not in self.inputs:
                self.inputs[key] = x.detach()
        return out


def conv_shapes(model: torch.nn.Module, inputs: tuple, keep_inputs: Iterable[torch.Tensor] = ()) -> tuple[
    dict[int, ConvShape], dict[int, torch.Tensor], dict[int, torch.Tensor]
]:
    """Run ``model`` once and record every conv2d call, keyed by ``id(weight)``.

    Returns the shapes, the weight tensors (to cost convs convtool does not separate), and the
    first input of each weight in ``keep_inputs`` (for measuring output error).
    """
    from ..inputs import eval_mode

    recorder = _RecordConvs({id(w) for w in keep_inputs})
    with eval_mode(model), torch.no_grad(), recorder:
        model(*inputs)
    shapes = {k: ConvShape(*v) for k, v in recorder.shapes.items()}
    return shapes, recorder.weights, recorder.inputs


def dense_cost(weight_shape: tuple[int, ...], shape: ConvShape) -> float:
    """Multiply-adds of a dense conv: N * M/g * kh * kw per output pixel."""
    n, m_g, kh, kw = weight_shape
    return float(n * m_g * kh * kw * shape.out_pixels)


def separable_cost(order: str, rank: int, weight_shape: tuple[int, ...], groups: int, shape: ConvShape) -> float:
    """Multiply-adds of a rank-r pair.

    ``"dw-pw"``: M*r*k^2 + N*(M/g)*r per output pixel. ``"pw-dw"``: the pointwise runs at the
    input resolution (before the stride), N*r*(M/g) per input pixel, then N*r*k^2 per output
    pixel.
    """
    n, m_g, kh, kw = weight_shape
    k = kh * kw
    if order == "dw-pw":
        return float((m_g * groups * rank * k + n * m_g * rank) * shape.out_pixels)
    return float(n * rank * m_g * shape.in_pixels + n * rank * k * shape.out_pixels)


@dataclass
class Choice:
    """The options of one layer: (order, rank) -> (cost, error); ``DENSE`` keeps it."""

    options: dict[tuple[str, int], tuple[float, float]]


def weight_options(weight: torch.Tensor, groups: int, orders: Iterable[str], shape: ConvShape) -> Choice:
    """Options costed in FLOPs, with the weight-space squared relative error of each."""
    options = {DENSE: (dense_cost(tuple(weight.shape), shape), 0.0)}
    for order in orders:
        errors = rank_errors(weight, groups, order)
        for r in range(1, max_rank(weight, groups, order) + 1):
            cost = separable_cost(order, r, tuple(weight.shape), groups, shape)
            error = float(errors[r]) ** 2
            options[(order, r)] = (cost, error if error > 1e-12 else 0.0)  # float noise is not an error
    return Choice(options)


def _pareto(options: dict[Any, tuple[float, float]]) -> list[Any]:
    """Options no other option beats on both cost and error, cheapest first."""
    front: list[Any] = []
    for key in sorted(options, key=lambda k: (options[k][0], options[k][1])):
        if not front or options[key][1] < options[front[-1]][1]:
            front.append(key)
    return front


def allocate(choices: list[Choice], budget: float) -> tuple[list[tuple[str, int]], bool]:
    """Pick one option per layer with total cost within ``budget`` and little total error.

    Every layer starts at its cheapest option; each step buys the upgrade (to any better
    option of one layer) with the most error saved per extra FLOP that still fits. On convex
    fronts this is the classic hull greedy; jumping past options lets a layer take a smaller
    step when the next hull point does not fit.

    Returns the picks and whether the budget was met (when even the cheapest options exceed
    it, every layer gets its cheapest option).
    """
    fronts = [_pareto(c.options) for c in choices]
    position = [0] * len(choices)
    total = sum(c.options[f[0]][0] for c, f in zip(choices, fronts))
    if total > budget:
        return [f[0] for f in fronts], False
    while True:
        best, best_gain = None, 0.0
        for i, (choice, front) in enumerate(zip(choices, fronts)):
            now = choice.options[front[position[i]]]
            for j in range(position[i] + 1, len(front)):
                nxt = choice.options[front[j]]
                extra = nxt[0] - now[0]
                if total + extra > budget:
                    break  # the front is sorted by cost: the rest cost more still
                gain = (now[1] - nxt[1]) / max(extra, 1e-9)
                if gain > best_gain:
                    best, best_gain = (i, j), gain
        if best is None:
            break
        i, j = best
        total += choices[i].options[fronts[i][j]][0] - choices[i].options[fronts[i][position[i]]][0]
        position[i] = j
    return [f[p] for f, p in zip(fronts, position)], True


def energy_rank(weight: torch.Tensor, groups: int, order: str, energy: float) -> int:
    """The smallest rank keeping at least ``energy`` of the squared singular values."""
    errors = rank_errors(weight, groups, order)
    for r in range(1, len(errors)):
        if 1 - float(errors[r]) ** 2 >= energy - 1e-12:
            return r
    return len(errors) - 1


__all__ = [
    "DENSE",
    "ORDERS",
    "Choice",
    "ConvShape",
    "allocate",
    "conv_shapes",
    "dense_cost",
    "energy_rank",
    "separable_cost",
    "weight_options",
]
