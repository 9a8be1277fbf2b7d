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
    latency_provider: str | None = None,
) -> Plan:
    """Decide each candidate's (order, rank).

    ``rank`` an int or "full": that rank everywhere (order per ``order``). ``energy``: per layer
    the smallest rank keeping that share of spectral energy. ``flops_target``: the ranks that
    bring the model's FLOPs (fvcore's count on ``shape_inputs``) to that fraction with the
    least summed squared relative error, measured on ``calibration_batch`` activations when
    given. ``latency_provider``: with ``"auto"`` ranks, options not faster than the dense conv
    on that onnxruntime provider (measured at the layer's input shape) are dropped.
    """
    if rank != "auto" or energy is not None:
        picks: dict[str, tuple[str, int] | None] = {}
        for c in candidates:
            if energy is not None:
                ranks = {o: energy_rank(c.weight, c.groups, o, energy) for o in _orders(order)}
                best = min(ranks, key=lambda o: _unit_cost(c, o, ranks[o]))
                picks[c.name] = (best, ranks[best])
            else:
                r = 10**9 if rank == "full" else int(rank)
                best = _best_order(c, r, order)
                picks[c.name] = (best, min(r, max_rank(c.weight, c.groups, best)))
        reasons = _drop_slow(model, candidates, picks, shape_inputs, latency_provider) if latency_provider else {}
        return Plan(picks, reasons)
    return _budget_plan(model, candidates, order, flops_target, shape_inputs, calibration_batch, latency_provider)


def _drop_slow(model, candidates, picks, shape_inputs, provider) -> dict[str, str]:
    """Set to dense (None) each pick that onnxruntime does not run faster than the dense conv."""
    shapes = _require_shapes(model, shape_inputs)
    reasons = {}
    for c in candidates:
        pick, shape = picks[c.name], _shape_of(c, shapes)
        if pick is None or shape is None:
            continue
        single = Choice({DENSE: (0.0, 0.0), pick: (0.0, 0.0)})
        if pick not in faster_than_dense(c, single, shape, provider).options:
            picks[c.name] = None
            reasons[c.name] = f"kept dense: rank {pick[1]} ({pick[0]}) is not faster than the dense conv on {provider}"
    return reasons


def _require_shapes(model: nn.Module, shape_inputs: tuple, with_weights: bool = False):
    if not shape_inputs:
        raise InvalidOptionError("rank='auto' with a FLOP target or a latency provider needs example inputs (or calibration data) to cost each layer")
    shapes, weights, _ = conv_shapes(model, shape_inputs)
    return (shapes, weights) if with_weights else shapes


def _unit_cost(c: Candidate, order: str, r: int) -> float:
    """Cost per output pixel; a pointwise-first pair's pointwise runs at the input resolution."""
    from .ranks import separable_cost

    stride = c.options["stride"]
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    return separable_cost(order, r, tuple(c.weight.shape), c.groups, ConvShape(sh * sw, 1, 1))


def _shape_of(c: Candidate, shapes: dict[int, ConvShape]) -> ConvShape | None:
    """The candidate's recorded shape, with the input as the layer sees it before padding.

    A conv with a padding mode other than zeros pads its input before calling conv2d, so the
    recorder saw the padded size; the pair's pointwise (``"pw-dw"``) runs on the unpadded one.
    """
    shape = shapes.get(id(c.weight))
    if shape is None or c.options.get("padding_mode", "zeros") == "zeros" or len(shape.input_shape) < 2:
        return shape
    probe = nn.Conv2d(c.weight.shape[1] * c.groups, c.weight.shape[0], tuple(c.weight.shape[2:]), groups=c.groups,
                      device="meta", **c.options)
    left, right, top, bottom = probe._reversed_padding_repeated_twice
    *lead, h, w = shape.input_shape
    inner = (h - top - bottom) * (w - left - right)
    return ConvShape(
        in_pixels=round(shape.in_pixels * inner / (h * w)),
        out_pixels=shape.out_pixels,
        calls=shape.calls,
        input_shape=(*lead, h - top - bottom, w - left - right),
    )


def _budget_plan(model, candidates, order, flops_target, shape_inputs, calibration_batch, latency_provider) -> Plan:
    keep = [c.weight for c in candidates] if calibration_batch is not None else []
    shapes, weights = _require_shapes(model, shape_inputs, with_weights=True)
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
        shape = _shape_of(c, shapes)
        if shape is None:
            reasons[c.name] = "did not run on the example inputs, so its cost is unknown"
            continue
        choice = weight_options(c.weight, c.groups, _orders(order), shape)
        # A conv with a padding mode other than zeros receives its input already padded.
        if id(c.weight) in activations and c.options.get("padding_mode", "zeros") == "zeros":
            choice = _output_errors(c, activations[id(c.weight)], choice)
        if latency_provider is not None:
            choice = faster_than_dense(c, choice, shape, latency_provider)
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


def _latency(module: nn.Module, input_shape: tuple[int, ...], provider: str, key: tuple) -> float:
    from ..analysis.runtime import module_latency

    return module_latency(module, input_shape, provider, key)


def faster_than_dense(c: Candidate, choice: Choice, shape: ConvShape, provider: str) -> Choice:
    """Drop the options that onnxruntime does not run faster than the dense conv.

    Ranks are measured from 1 up, per order, and stop at the first that is not faster: higher
    ranks of the same order cost more still.
    """
    weight = c.weight.detach().cpu()
    bias = c.bias.detach().cpu() if c.bias is not None else None
    config = (tuple(weight.shape), c.groups, tuple(sorted((k, str(v)) for k, v in c.options.items())), shape.input_shape, provider)
    dense = nn.Conv2d(weight.shape[1] * c.groups, weight.shape[0], tuple(weight.shape[2:]), groups=c.groups,
                      bias=bias is not None, **c.options)
    with torch.no_grad():
        dense.weight.copy_(weight)
    dense_ms = _latency(dense.eval(), shape.input_shape, provider, ("dense", *config))
    kept = {DENSE: choice.options[DENSE]}
    for order in sorted({key[0] for key in choice.options if key != DENSE}):
        for r in sorted(key[1] for key in choice.options if key[0] == order):
            pair = SeparableConv2d.from_weight(weight, bias, groups=c.groups, rank=r, order=order, **c.options).eval()
            if _latency(pair, shape.input_shape, provider, (order, r, *config)) >= dense_ms:
                break
            kept[(order, r)] = choice.options[(order, r)]
    return Choice(kept)
