"""A separated layer's record, built from the pairs that stand in for it and the calls they made.

The pass, the proof and the report all describe a layer through :func:`describe`, so a number
in a report is the number the proof measured on the model itself.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..core.costs import dense_flops
from ..core.modules import SeparableConv
from ..core.records import LayerChange
from .conv_calls import ConvCall


def pair_weights(pairs: Sequence[SeparableConv]) -> set[int]:
    """Ids of the weights of both halves of every pair (shared factors appear once)."""
    return {id(p.depthwise.weight) for p in pairs} | {id(p.pointwise.weight) for p in pairs}


def last_calls(pairs: Sequence[SeparableConv], calls: dict[int, list[ConvCall]]) -> list[ConvCall]:
    """The calls of the pairs' last convs: one per time the layer ran."""
    ids = {id(p.last.weight) for p in pairs}
    return [c for i in ids for c in calls.get(i, [])]


def _unique(tensors) -> list:
    return list({id(t): t for t in tensors if t is not None}.values())


def describe(
    name: str,
    aliases: Sequence[str],
    source: str,
    pairs: Sequence[SeparableConv],
    calls: dict[int, list[ConvCall]] | None,
    *,
    dense_weight: torch.Tensor | None = None,
    output_error: float | None = None,
    params_before: int | None = None,
) -> LayerChange:
    """The record of one separated layer.

    Args:
        name, aliases, source: see :class:`~convtool.LayerChange`.
        pairs: every pair standing in for the layer's weight (one per call setting or tied conv).
        calls: the conv calls of a run on the example inputs, by ``id(weight)``; ``None`` when
            the model was not run (FLOPs and calls are then unknown).
        dense_weight: the weight the layer replaced; the weight error is then that of what the
            pairs apply now (after a refit or fine-tuning), not of their SVD initialisation.
        output_error: the refit's output error, when calibrated.
        params_before: the dense layer's parameters, when known; else its weight's, plus the
            pairs' biases (which the refit may have added to a layer trained without one).
    """
    first = pairs[0]
    weight_shape = (first.out_channels, first.in_channels // first.groups, *first.kernel_size)
    biases = _unique(p.bias for p in pairs)
    params_after = sum(p.numel() for p in _unique(t for pair in pairs for t in pair.parameters()))
    flops_before = flops_after = runs = None
    if calls is not None:
        ran = last_calls(pairs, calls)
        runs = len(ran)
        if first.transposed:  # a transposed conv costs per input pixel: those of the pairs' first convs
            starts = {id((p.depthwise if p.order == "dw-pw" else p.pointwise).weight) for p in pairs}
            in_pixels = sum(c.in_pixels for i in starts for c in calls.get(i, []))
            flops_before = dense_flops(weight_shape, 0, in_pixels, transposed=True)
        else:
            flops_before = dense_flops(weight_shape, sum(c.out_pixels for c in ran))
        flops_after = sum(c.flops for i in pair_weights(pairs) for c in calls.get(i, []))
    return LayerChange(
        name=name,
        aliases=tuple(aliases),
        source=source,
        in_channels=first.in_channels,
        out_channels=first.out_channels,
        kernel_size=tuple(first.kernel_size),
        stride=tuple(first.stride),
        groups=first.groups,
        rank=first.rank,
        order=first.order,
        params_before=params_before if params_before is not None else math.prod(weight_shape) + sum(b.numel() for b in biases),
        params_after=params_after,
        flops_before=flops_before,
        flops_after=flops_after,
        calls=runs,
        weight_error=first.weight_error if dense_weight is None else relative_error(first.weight, dense_weight),
        output_error=output_error,
        transposed=first.transposed,
    )


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """||actual - reference|| / ||reference||, in float64 (0 for an all-zero pair)."""
    with torch.no_grad():
        a, r = actual.detach().double(), reference.detach().double().to(actual.device)
        norm = float(r.norm())
        return float((a - r).norm()) / norm if norm > 0 else float((a - r).norm())


def pair_groups(model: nn.Module) -> list[tuple[list[str], list[SeparableConv]]]:
    """The pairs of a model grouped by the factors they share: names and distinct pairs per group."""
    groups: dict[int, tuple[list[str], list[SeparableConv]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, SeparableConv):
            names, pairs = groups.setdefault(id(module.depthwise.weight), ([], []))
            names.append(name)
            if all(p is not module for p in pairs):
                pairs.append(module)
    return list(groups.values())
