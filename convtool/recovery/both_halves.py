"""Refitting both convs of a pair by alternating least squares (``separate(..., refit="both")``).

The one-sided refit (:mod:`.calibrate`) leaves the first conv of each pair at its SVD
initialisation; here each eligible pair's two halves take turns, each an exact least-squares
step on the dense conv's normal equations (:mod:`.equations`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..core.inputs import eval_mode, model_device, on_device
from ..core.modules import SeparableConv
from ..measure.conv_calls import record
from .calibrate import Layer
from .distributed import all_reduce_sum, world
from .equations import NormalEquations, as_solution, columns, solve_normal_equations

ALS_LIMIT = 4096  # features (M x K) and filter weights (M x r x K) above which a pair keeps the one-sided refit
# Pointwise-first pairs: N·r·(M·K)² multiply-adds per step. Memory is that over K (the
# N·r·K·M·M intermediate) in float64: up to about 1.8 GB for 3x3 kernels at the limit.
PER_OUTPUT_LIMIT = 2e9


def refit_both_halves(
    reference: nn.Module, separated: nn.Module, layers: Sequence[Layer], batches: list[tuple], rounds: int = 3,
) -> dict[str, float]:
    """Refit both convs of each pair by alternating least squares, layer by layer in order.

    For each eligible layer (one ungrouped, untransposed pair called once per pass, of at most
    :data:`ALS_LIMIT` features), the dense conv's normal equations are gathered over the pair's
    input in ``separated`` (earlier layers already refit, so their error is absorbed) and the
    original conv's output in ``reference``. Then ``rounds`` times, each step exact least squares
    with the refit's ridge: for a depthwise-first pair the depthwise filters given the pointwise
    mix (Hessian (P^T P) x G), then the mix and bias given the filters; for a pointwise-first
    pair, per output, the spatial filters and bias given the mixes, then the mixes
    (:func:`_alternate_pointwise_first`, within :data:`PER_OUTPUT_LIMIT`). The result is kept only where it fits the data better
    than the pair's current weights on a held-out quarter of each batch. Costs two passes up to
    each layer per batch.

    Returns the relative output error left, per layer refit this way.
    """
    device = model_device(separated)
    errors: dict[str, float] = {}
    with eval_mode(separated), torch.no_grad():
        for layer in layers:
            pair = layer.pairs[0]
            m, r, k, n = pair.in_channels, pair.rank, math.prod(pair.kernel_size), pair.out_channels
            if len(layer.pairs) > 1 or pair.groups != 1 or pair.transposed or m * k > ALS_LIMIT:
                continue
            if pair.order == "dw-pw" and m * r * k > ALS_LIMIT:
                continue
            if pair.order == "pw-dw" and (n * r * m * m * k * k > PER_OUTPUT_LIMIT or pair.depthwise.padding_mode != "zeros"):
                continue  # a padding mode pads inside the depthwise half, after the pointwise: not the dense conv's columns
            equations = _dense_equations(reference, separated, layer, batches, device)
            if world().size > 1:  # fit on every process's data, so every process ends with the same pair
                failed = float(all_reduce_sum(torch.tensor([float(equations is None)], device=device)))
                if failed:
                    continue
                equations = (equations[0].all_reduce(), equations[1].all_reduce())
            if equations is None:
                continue
            alternate = _alternate if pair.order == "dw-pw" else _alternate_pointwise_first
            error = alternate(pair, *equations, rounds)
            if error is not None:
                errors[layer.name] = error
    return errors


def _dense_equations(reference, separated, layer: Layer, batches, device) -> "tuple[NormalEquations, NormalEquations] | None":
    """The dense conv's normal equations over the pair's input in ``separated`` and the original's output:
    those to fit on, and those of a held-out quarter of each batch to judge the fit on."""
    pair = layer.pairs[0]
    slots = 1 if pair.bias is not None else 0  # the pair's bias is fit with the half that holds it
    equations, held = NormalEquations(slots), NormalEquations(slots)
    first = pair.depthwise if pair.order == "dw-pw" else pair.pointwise  # it receives the pair's input
    for batch in batches:
        batch = on_device(batch, device)
        target = record(reference, batch, keep={id(layer.reference_weight)}, stop_after=2, keep_inputs=False)
        seen = record(separated, batch, keep={id(first.weight)}, stop_after=2, own_mode=True)
        outputs = [c.output for c in target.calls if c.output is not None]
        inputs = [c for c in seen.calls if c.input is not None]
        spatial = [c for c in seen.calls if c.weight is pair.depthwise.weight]
        if len(outputs) != 1 or len(inputs) != 1 or len(spatial) != 1:  # called more than once a pass: not this refit's case
            return None
        # The spatial half's call carries the stride, padding and dilation (padding 0 where a
        # padding mode padded its input first, as for a depthwise-first pair's own input).
        call, options = inputs[0], spatial[0]
        dense = dict(input=call.input, weight=layer.reference_weight, stride=options.stride, padding=options.padding,
                     dilation=options.dilation, groups=1)
        cols, target = columns(dense), outputs[0]
        cut = cols.shape[0] - max(cols.shape[0] // 4, 1)  # a quarter of each batch is held out to judge the fit
        if cut < 1:
            return None
        equations.add(cols[:cut], target[:cut], 0 if slots else None)
        held.add(cols[cut:], target[cut:], 0 if slots else None)
    return (equations, held) if equations.xx is not None else None


def _alternate(pair: SeparableConv, equations: "NormalEquations", held: "NormalEquations", rounds: int) -> float | None:
    """Alternate least squares on ``pair``'s depthwise filters D (M, r, K) and pointwise mix P (N, M, r) with bias c.

    Fit on ``equations``, judged on ``held``: the pair changes only if the held-out error falls.
    Returns the error on all the data, or None where the pair keeps its weights.
    """
    m, r, k, n = pair.in_channels, pair.rank, math.prod(pair.kernel_size), pair.out_channels
    f, slots = m * k, equations.slots  # features: M*K, then the bias's 1 when the pair has a bias
    xx, xy = equations.xx[0].cpu(), equations.xy[0].cpu()
    d = pair.depthwise.weight.detach().double().reshape(m, r, k).cpu()
    p = pair.pointwise.weight.detach().double().reshape(n, m, r).cpu()
    c = pair.bias.detach().double().cpu() if slots else torch.zeros(n, dtype=torch.float64)

    def solution(d: Tensor, p: Tensor, c: Tensor) -> Tensor:
        return as_solution(torch.einsum("nmi,mik->nmk", p, d), [c] if slots else [], 1)

    before = solution(d, p, c)
    g = xx[:f, :f].reshape(m, k, m, k)
    shift = xx[:f, f:] @ c[None, :] if slots else torch.zeros(f, n, dtype=torch.float64)  # the bias's share of X Y^T
    for _ in range(rounds):
        # D given P and c: H[(m,i,k),(m',i',k')] = (P^T P)[(m,i),(m',i')] G[(m,k),(m',k')]
        h = torch.einsum("mioj,mkol->mikojl", torch.einsum("nmi,noj->mioj", p, p), g).reshape(m * r * k, m * r * k)
        b = torch.einsum("nmi,mkn->mik", p, (xy[:f] - shift).reshape(m, k, n)).reshape(-1)
        d = solve_normal_equations(h[None], b[None, :, None])[0, :, 0].reshape(m, r, k)
        # P (and c) given D: the features are the depthwise outputs z_(m,i) (and the bias's 1)
        lift = torch.zeros(m * r + slots, f + slots, dtype=torch.float64)
        for channel in range(m):
            lift[channel * r:(channel + 1) * r, channel * k:(channel + 1) * k] = d[channel]
        if slots:
            lift[-1, -1] = 1
        mix = solve_normal_equations((lift @ xx @ lift.t())[None], (lift @ xy)[None])[0]  # (M*r + slots, N)
        p = mix[: m * r].t().reshape(n, m, r)
        if slots:
            c = mix[-1]
            shift = xx[:f, f:] @ c[None, :]
    return _keep_if_better(pair, equations, held, before, solution(d, p, c), d, p, c)


def _keep_if_better(pair: SeparableConv, equations, held, before: Tensor, after: Tensor,
                    depthwise: Tensor, pointwise: Tensor, bias: Tensor) -> float | None:
    """Install the alternated weights only if they fit the held-out data better; the error on all the data, or None."""
    if held.xx is None or not held.relative_error(after) < held.relative_error(before):
        return None  # no better on data it was not fit to: keep what the pair has
    fitted = equations.plus(held).relative_error(after)
    with torch.no_grad():
        pair.depthwise.weight.copy_(depthwise.reshape(pair.depthwise.weight.shape).to(pair.depthwise.weight))
        pair.pointwise.weight.copy_(pointwise.reshape(pair.pointwise.weight.shape).to(pair.pointwise.weight))
        if equations.slots:
            pair.bias.copy_(bias.to(pair.bias))
    return fitted


def _alternate_pointwise_first(pair: SeparableConv, equations: "NormalEquations", held: "NormalEquations", rounds: int) -> float | None:
    """Alternate least squares on a pointwise-first pair: mixes P (N, r, M), spatial filters S (N, r, K), bias c.

    Output n applies W_n = P_nᵀ S_n, so the objective splits over outputs: every step is N
    small exact least-squares problems, batched (size r·M for the mixes, r·K + 1 for the
    filters with the bias, which the depthwise half holds). Fit on ``equations``, judged on
    ``held`` as :func:`_alternate` is.
    """
    m, r, k, n = pair.in_channels, pair.rank, math.prod(pair.kernel_size), pair.out_channels
    f, slots = m * k, equations.slots
    xx, xy = equations.xx[0].cpu(), equations.xy[0].cpu()
    g = xx[:f, :f].reshape(m, k, m, k)
    g0 = xx[:f, f] if slots else torch.zeros(f, dtype=torch.float64)  # the bias's column: the input's sums
    p = pair.pointwise.weight.detach().double().reshape(n, r, m).cpu()
    s = pair.depthwise.weight.detach().double().reshape(n, r, k).cpu()
    c = pair.bias.detach().double().cpu() if slots else torch.zeros(n, dtype=torch.float64)
    target = xy[:f].reshape(m, k, n)

    def solution(p: Tensor, s: Tensor, c: Tensor) -> Tensor:
        return as_solution(torch.einsum("nim,nik->nmk", p, s), [c] if slots else [], 1)

    before = solution(p, s, c)
    for _ in range(rounds):
        # S (and c) given P: features (i, k) of output n, and the bias's 1
        h = torch.einsum("nikol,njo->nikjl", torch.einsum("nim,mkol->nikol", p, g), p).reshape(n, r * k, r * k)
        b = torch.einsum("nim,mkn->nik", p, target).reshape(n, r * k)
        if slots:
            cross = torch.einsum("nim,mk->nik", p, g0.reshape(m, k)).reshape(n, r * k, 1)
            h = torch.cat([torch.cat([h, cross], 2), torch.cat([cross.transpose(1, 2), xx[f:, f:].expand(n, 1, 1)], 2)], 1)
            b = torch.cat([b, xy[f:].t()], 1)
        solved = solve_normal_equations(h, b[:, :, None])[:, :, 0]
        s = solved[:, : r * k].reshape(n, r, k)
        if slots:
            c = solved[:, -1]
        # P given S (c fixed): features (i, m) of output n
        h = torch.einsum("nimol,njl->nimjo", torch.einsum("nik,mkol->nimol", s, g), s).reshape(n, r * m, r * m)
        shifted = target - c[None, None, :] * g0.reshape(m, k, 1)
        b = torch.einsum("nik,mkn->nim", s, shifted).reshape(n, r * m)
        p = solve_normal_equations(h, b[:, :, None])[:, :, 0].reshape(n, r, m)
    return _keep_if_better(pair, equations, held, before, solution(p, s, c), s, p, c)
