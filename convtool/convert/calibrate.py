"""Calibration: refit separated layers on real activations, then re-estimate BatchNorm.

After the SVD initialisation each pair is the best separable approximation of the weights, not
of what the layer computes on data. With a few unlabeled inputs, the last conv of each pair
(the pointwise of ``"dw-pw"``, the spatial conv of ``"pw-dw"``) is refit by least squares so
the pair's outputs match the original layer's outputs. Layers are taken in execution order and
each is fed the activations of the already-refit layers before it, so later layers also absorb
the error of earlier ones.

Every call of a layer counts: a conv module run three times, or a weight called with two
settings, is refit on all its calls at once. The calls are read by the conv recorder, keyed by
weight, so a layer that did not run on the data is never "refit" on nothing: it keeps its SVD
initialisation and says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.inputs import eval_mode, model_device, on_device
from ..core.modules import SeparableConv2d
from ..errors import InvalidOptionError
from ..measure.conv_calls import ConvCall, explicit_padding, record

log = logging.getLogger(__name__)

BATCH = 32


def calibration_batches(calibration: Any, batch_size: int = BATCH) -> list[tuple]:
    """Normalise calibration data to a list of input tuples, refusing empty or non-finite data.

    A tensor is one input, cut into batches along dim 0; a tuple of tensors is a model's
    several inputs, cut alike; a list or any other iterable yields batches (each a tensor, or
    a tuple/list of tensors).
    """
    if isinstance(calibration, Tensor):
        calibration = (calibration,)
    if isinstance(calibration, tuple) and all(isinstance(t, Tensor) for t in calibration):
        n = calibration[0].shape[0] if calibration[0].dim() else 0
        if n == 0 or any(t.dim() == 0 or t.shape[0] != n for t in calibration):
            raise InvalidOptionError("calibration tensors must share a non-empty first (batch) dimension")
        batches = [tuple(t[i : i + batch_size] for t in calibration) for i in range(0, n, batch_size)]
    else:
        try:
            batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration]
        except TypeError:
            raise InvalidOptionError(f"calibration must be a tensor or an iterable of batches, got {type(calibration).__name__}") from None
        if not batches or not all(isinstance(t, Tensor) for b in batches for t in b):
            raise InvalidOptionError("calibration batches must be tensors or tuples of tensors")
    for batch in batches:
        for t in batch:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InvalidOptionError("calibration data holds NaN or infinite values; check its normalisation (--mean/--std)")
    return batches


def columns(call: ConvCall) -> Tensor:
    """A call's input as (batch, groups, features per group, output pixels): the conv is then a matmul."""
    x, w = call.input, call.weight
    kernel = tuple(w.shape[-2:])
    if x.dim() == 3:
        x = x[None]
    pad = explicit_padding(call.padding, kernel, call.dilation)
    stride = (call.stride, call.stride) if isinstance(call.stride, int) else tuple(call.stride)
    if kernel == (1, 1) and stride == (1, 1) and not any(pad):
        cols = x.flatten(2)
    else:
        if any(pad):
            x = F.pad(x, pad)
        cols = F.unfold(x, kernel, dilation=call.dilation, stride=call.stride)
    b, _, length = cols.shape
    return cols.reshape(b, call.groups, -1, length)


class NormalEquations:
    """Accumulates X X^T, X Y^T and Y.Y over calls, in float64, with one bias column per bias tensor.

    They hold all the data says about a linear fit: the error of any weights can be read off
    them, so no activation needs keeping past its batch.
    """

    def __init__(self, bias_slots: int) -> None:
        self.slots = bias_slots
        self.xx: Tensor | None = None
        self.xy: Tensor | None = None
        self.yy = 0.0

    def add(self, cols: Tensor, target: Tensor, slot: int | None) -> None:
        b, g, f, length = cols.shape
        x = cols.permute(1, 2, 0, 3).reshape(g, f, b * length).double()
        if self.slots:
            ones = x.new_zeros(g, self.slots, b * length)
            if slot is not None:
                ones[:, slot] = 1
            x = torch.cat([x, ones], 1)
        y = target.reshape(b, g, -1, length).permute(1, 2, 0, 3).reshape(g, -1, b * length).double()
        xx, xy = x @ x.transpose(1, 2), x @ y.transpose(1, 2)
        self.xx = xx if self.xx is None else self.xx + xx
        self.xy = xy if self.xy is None else self.xy + xy
        self.yy += float(y.pow(2).sum())

    def relative_error(self, w: Tensor) -> float:
        """||Y - W^T X|| / ||Y|| for weights ``w`` shaped like :meth:`solve`'s result."""
        w = w.to(self.xx)
        residual = self.yy - 2 * float((w * self.xy).sum()) + float((w * (self.xx @ w)).sum())
        return math.sqrt(max(residual, 0.0) / self.yy) if self.yy > 0 else 0.0

    def solve(self) -> Tensor:
        """Ridge-regularised least squares, shape (groups, features + bias slots, outputs per group)."""
        return solve_normal_equations(self.xx, self.xy)


def solve_normal_equations(xx: Tensor, xy: Tensor, ridge: float = 1e-6) -> Tensor:
    """Solve (XX^T + λI) W = XY^T for a batch of symmetric positive semi-definite systems.

    Cholesky, the solver for such systems, where it succeeds (``cholesky_ex`` reports instead
    of raising); a pseudo-inverse for the rest. Not an LU solve: batched float64 LU in MKL fails
    on well-conditioned systems once a program has called ``torch.set_num_threads``.
    """
    diag = xx.diagonal(dim1=1, dim2=2)
    scale = ridge * diag.mean(1).clamp_min(1e-12)
    a = xx + scale[:, None, None] * torch.eye(xx.shape[1], dtype=xx.dtype, device=xx.device)
    factor, info = torch.linalg.cholesky_ex(a)
    solution = torch.cholesky_solve(xy, factor)
    failed = info != 0
    if bool(failed.any()):
        solution[failed] = torch.linalg.pinv(a[failed], hermitian=True) @ xy[failed]
    return solution


@dataclass
class Layer:
    """A layer to refit: the dense weight in the reference model, and the pairs standing in for it."""

    name: str
    reference_weight: Tensor
    pairs: list[SeparableConv2d]
    calls: int  # calls per pass on the example inputs: when to stop a pass early


def refit(reference: nn.Module, separated: nn.Module, layers: Sequence[Layer], batches: list[tuple]) -> dict[str, float | None]:
    """Refit each layer's last conv so its outputs match the reference layer's, in order.

    Args:
        reference: the dense model (run, never changed).
        separated: the model holding the pairs.
        layers: in execution order.
        batches: calibration input tuples.

    Returns:
        Per layer name, the relative output error on the calibration data after the refit;
        None for a layer that did not run on the data (it keeps its SVD initialisation).
    """
    errors: dict[str, float | None] = {}
    device = model_device(separated)
    for layer in layers:
        last = layer.pairs[0].last  # the pairs share its weight
        biases = list({id(p.last.bias): p.last.bias for p in layer.pairs if p.last.bias is not None}.values())
        slot_of = {id(b): i for i, b in enumerate(biases)}
        equations = NormalEquations(len(biases))
        matched = 0
        for batch in batches:
            batch = on_device(batch, device)
            targets = record(reference, batch, keep={id(layer.reference_weight)}, stop_after=layer.calls)
            inputs = record(separated, batch, keep={id(last.weight)}, stop_after=layer.calls)
            wanted = [c for c in targets.calls if c.output is not None]
            got = [c for c in inputs.calls if c.input is not None]
            if not got or len(got) != len(wanted):
                continue  # the batch took another path through the model: its calls cannot be matched
            for call, target in zip(got, wanted):
                equations.add(columns(call), target.output, slot_of.get(id(call.bias)) if call.bias is not None else None)
                matched += 1
        if not matched:
            log.info("%s did not run on the calibration data; it keeps its SVD initialisation", layer.name)
            errors[layer.name] = None
            continue
        before = equations.relative_error(_as_solution(last, biases))
        solution = equations.solve()  # (g, f + slots, o_g)
        f = last.weight[0].numel()
        old = [last.weight.detach().clone(), *(b.detach().clone() for b in biases)]
        with torch.no_grad():
            last.weight.copy_(solution[:, :f, :].permute(0, 2, 1).reshape(last.weight.shape).to(last.weight.dtype))
            for i, bias in enumerate(biases):
                bias.copy_(solution[:, f + i, :].reshape(-1).to(bias.dtype))
        after = equations.relative_error(_as_solution(last, biases))  # of the weights as stored, cast included
        if not after <= before:  # ill-conditioned data: keep the SVD initialisation
            with torch.no_grad():
                for tensor, saved in zip([last.weight, *biases], old):
                    tensor.copy_(saved)
            after = before
        errors[layer.name] = after
    return errors


def _as_solution(conv: nn.Conv2d, biases: list[Tensor]) -> Tensor:
    """A conv's weight and bias slots in the (groups, features + slots, outputs per group) form of a solution."""
    g = conv.groups
    w = conv.weight.detach().double().reshape(g, conv.out_channels // g, -1).transpose(1, 2)
    return torch.cat([w, *(b.detach().double().reshape(g, 1, -1) for b in biases)], 1)


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches``; returns how many.

    Only the BatchNorm layers run in train mode (dropout and the rest stay in eval), with a
    cumulative average, so the result does not depend on the order of the batches.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = model_device(model)
    saved = [(m, m.momentum) for m in norms]
    with eval_mode(model), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for batch in batches:
                model(*on_device(batch, device))
        finally:
            for m, momentum in saved:
                m.momentum = momentum
    return len(norms)
