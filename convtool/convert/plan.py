"""Turn the user's rank options into one decision per layer: (order, rank), or stay dense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidOptionError
from .decompose import ORDERS, max_rank, rank_errors
from .modules import SeparableConv2d
from .ranks import DENSE, Choice, ConvShape, allocate, conv_shapes, dense_cost, energy_rank, weight_options


@dataclass
class Candidate:
    """A conv that may be separated: its weight, bias and options, however it is called."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    options: dict[str, Any]  # stride, padding, dilation, padding_mode


@dataclass(frozen=True)
class Plan:
    """Per candidate name: (order, rank) or None for 'stay dense', and why it stays dense."""

    picks: dict[str, tuple[str, int] | None]
    dense_reasons: dict[str, str]
    budget_met: bool | None = None
    flops_before: float | None = None  # the model's FLOPs on the example inputs, when costed
    flops_after: float | None = None


def _orders(order: str) -> tuple[str, ...]:
    return ORDERS if order == "auto" else (order,)


def _best_order(c: Candidate, rank: int, order: str) -> str:
    """Under a fixed rank, the order with the lower weight error ("auto"), else the one asked."""
    if order != "auto":
        return order
    errors = {o: float(rank_errors(c.weight, c.groups, o)[min(rank, max_rank(c.weight, c.groups, o))]) for o in ORDERS}
    return min(ORDERS, key=lambda o: (errors[o], o != "dw-pw"))


def _output_errors(c: Candidate, x: torch.Tensor, choice: Choice) -> Choice:
    """Replace weight-space errors by measured output errors on calibration activations."""
    with torch.no_grad():
        reference = torch.nn.functional.conv2d(
            x, c.weight, c.bias, c.options["stride"], c.options["padding"], c.options["dilation"], c.groups
        )
        norm = float(reference.double().pow(2).sum()) or 1.0
        options = {}
        for key, (cost, _) in choice.options.items():
            if key == DENSE:
                options[key] = (cost, 0.0)
                continue
            order, r = key
            pair = SeparableConv2d.from_weight(c.weight, c.bias, groups=c.groups, rank=r, order=order, **c.options)
            options[key] = (cost, float((pair(x) - reference).double().pow(2).sum()) / norm)
    return Choice(options)


def make_plan(
    model: nn.Module,
    candidates: list[Candidate],
    *,
    rank: int | str,
    order: str,
    flops_target: float | None,
    energy: float | None,
    shape_inputs: tuple,
    calibration_batch: tuple | None,
) -> Plan:
    """Decide each candidate's (order, rank).

    ``rank`` an int or "full": that rank everywhere (order per ``order``). ``energy``: per layer
    the smallest rank keeping that share of spectral energy. ``flops_target``: the ranks that
    bring the model's FLOPs (fvcore's count on ``shape_inputs``) to that fraction with the
    least summed squared relative error, measured on ``calibration_batch`` activations when
    given.
    """
    if rank != "auto":
        picks = {}
        for c in candidates:
            r = 10**9 if rank == "full" else int(rank)
            picked = _best_order(c, r, order)
            picks[c.name] = (picked, min(r, max_rank(c.weight, c.groups, picked)))
        return Plan(picks, {})
    if energy is not None:
        picks = {}
        for c in candidates:
            ranks = {o: energy_rank(c.weight, c.groups, o, energy) for o in _orders(order)}
            costs = {o: _unit_cost(c, o, ranks[o]) for o in ranks}
            best = min(ranks, key=lambda o: costs[o])
            picks[c.name] = (best, ranks[best])
        return Plan(picks, {})
    return _budget_plan(model, candidates, order, flops_target, shape_inputs, calibration_batch)


def _unit_cost(c: Candidate, order: str, r: int) -> float:
    from .ranks import separable_cost

    return separable_cost(order, r, tuple(c.weight.shape), c.groups, ConvShape(1, 1, 1))


def _budget_plan(model, candidates, order, flops_target, shape_inputs, calibration_batch) -> Plan:
    if not shape_inputs:
        raise InvalidOptionError("rank='auto' with a FLOP target needs example inputs (or calibration data) to cost each layer")
    keep = [c.weight for c in candidates] if calibration_batch is not None else []
    shapes, weights, _ = conv_shapes(model, shape_inputs)
    activations = conv_shapes(model, calibration_batch, keep)[2] if calibration_batch is not None else {}
    conv_total = sum(dense_cost(tuple(weights[k].shape), shapes[k]) for k in shapes)
    mine = {id(c.weight) for c in candidates}
    # The target is a fraction of the whole model's FLOPs as fvcore counts them (what the
    # report shows): everything but the separable convs is a fixed cost.
    total = _model_flops(model, shape_inputs, conv_total)
    fixed = total - conv_total + sum(dense_cost(tuple(weights[k].shape), shapes[k]) for k in shapes if k not in mine)
    choices, ran = [], []
    reasons: dict[str, str] = {}
    for c in candidates:
        shape = shapes.get(id(c.weight))
        if shape is None:
            reasons[c.name] = "did not run on the example inputs, so its cost is unknown"
            continue
        choice = weight_options(c.weight, c.groups, _orders(order), shape)
        # A conv with a padding mode other than zeros receives its input already padded.
        if id(c.weight) in activations and c.options.get("padding_mode", "zeros") == "zeros":
            choice = _output_errors(c, activations[id(c.weight)], choice)
        choices.append(choice)
        ran.append(c)
    picks_list, met = allocate(choices, flops_target * total - fixed)
    picks: dict[str, tuple[str, int] | None] = {c.name: None for c in candidates}
    after = fixed
    for c, choice, pick in zip(ran, choices, picks_list):
        after += choice.options[pick][0]
        if pick == DENSE:
            reasons[c.name] = "kept dense: the FLOP budget is better spent elsewhere"
        else:
            picks[c.name] = pick
    return Plan(picks, reasons, met, total, after)


def _model_flops(model: nn.Module, inputs: tuple, conv_total: float) -> float:
    """fvcore's count for the whole model; the convs alone where fvcore cannot trace it."""
    from ..analysis.counts import analyze

    try:
        return float(max(analyze(model, inputs).flops, conv_total))
    except Exception:  # fvcore's jit tracing refuses some models; their convs still count
        return conv_total
