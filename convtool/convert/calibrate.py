"""Calibration: refit separated layers on real activations, then re-estimate BatchNorm.

After the SVD initialisation each pair is the best separable approximation of the weights, not
of what the layer computes on data. With a few unlabeled inputs, the last conv of each pair
(the pointwise of ``"dw-pw"``, the spatial conv of ``"pw-dw"``) is refit by least squares so
the pair's outputs match the original layer's outputs. Layers are taken in execution order and
each is fed the activations of the already-refit layers before it, so later layers also absorb
the error of earlier ones.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..errors import InvalidOptionError
from ..inputs import eval_mode, model_device, on_device
from .modules import SeparableConv2d

BATCH = 32


def calibration_batches(calibration: Any, batch_size: int = BATCH) -> list[tuple]:
    """Normalise calibration data to a list of input tuples.

    A tensor is one input, cut into batches along dim 0; a tuple of tensors is a model's
    several inputs, cut alike; a list or any other iterable yields batches (each a tensor, or
    a tuple/list of tensors).
    """
    if isinstance(calibration, Tensor):
        calibration = (calibration,)
    if isinstance(calibration, tuple) and all(isinstance(t, Tensor) for t in calibration):
        n = calibration[0].shape[0]
        if n == 0 or any(t.shape[0] != n for t in calibration):
            raise InvalidOptionError("calibration tensors must share a non-empty first (batch) dimension")
        return [tuple(t[i : i + batch_size] for t in calibration) for i in range(0, n, batch_size)]
    try:
        batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration]
    except TypeError:
        raise InvalidOptionError(f"calibration must be a tensor or an iterable of batches, got {type(calibration).__name__}") from None
    if not batches or not all(isinstance(t, Tensor) for b in batches for t in b):
        raise InvalidOptionError("calibration batches must be tensors or tuples of tensors")
    return batches


class _Stop(BaseException):
    """Raised by a capture hook to end a forward pass once it has what it needs.

    A BaseException, so a model's own ``except Exception`` cannot swallow it.
    """


class _CaptureOutput(TorchFunctionMode):
    """Captures the output of the first conv2d call on one weight, then stops the pass."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.key, self.output = id(weight), None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.conv2d, F.conv2d):
            w = args[1] if len(args) > 1 else kwargs["weight"]
            if id(w) == self.key:
                self.output = out.detach()
                raise _Stop
        return out


def _hooked(model: nn.Module, module: nn.Module, batch: tuple, *, before: bool) -> Tensor | None:
    """Run ``model`` until ``module`` is first called; its input (``before``) or its output."""
    captured: list[Tensor] = []

    def keep(value: Tensor) -> None:
        captured.append(value.detach())
        raise _Stop

    if before:
        handle = module.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, output: keep(output))
    try:
        model(*batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def _original_output(model: nn.Module, source: nn.Module | Tensor, batch: tuple) -> Tensor:
    """The output of the original layer: a conv module (hooked) or a functional conv's weight."""
    if isinstance(source, nn.Module):
        output = _hooked(model, source, batch, before=False)
    else:
        capture = _CaptureOutput(source)
        try:
            with capture:
                model(*batch)
        except _Stop:
            pass
        output = capture.output
    if output is None:
        raise RuntimeError("the original layer did not run on the calibration batch")
    return output


def _input_of(model: nn.Module, module: nn.Module, batch: tuple) -> Tensor:
    z = _hooked(model, module, batch, before=True)
    if z is None:
        raise RuntimeError("the separated layer did not run on the calibration batch")
    return z


def _columns(conv: nn.Conv2d, z: Tensor) -> Tensor:
    """The conv's input as (batch, groups, features per group, output pixels)."""
    kh, kw = conv.kernel_size
    if (kh, kw) == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid"):
        cols = z.flatten(2)
    else:
        pad = conv._reversed_padding_repeated_twice
        if any(pad):
            z = F.pad(z, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        cols = F.unfold(z, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    b, _, length = cols.shape
    return cols.reshape(b, conv.groups, -1, length)


class _NormalEquations:
    """Accumulates X X^T and X Y^T per group over batches, in float64."""

    def __init__(self) -> None:
        self.xx: Tensor | None = None
        self.xy: Tensor | None = None

    def add(self, cols: Tensor, target: Tensor, bias: bool) -> None:
        b, g, f, length = cols.shape
        x = cols.permute(1, 2, 0, 3).reshape(g, f, b * length).double()
        if bias:
            x = torch.cat([x, x.new_ones(g, 1, b * length)], 1)
        y = target.reshape(b, g, -1, length).permute(1, 2, 0, 3).reshape(g, -1, b * length).double()
        xx, xy = x @ x.transpose(1, 2), x @ y.transpose(1, 2)
        self.xx = xx if self.xx is None else self.xx + xx
        self.xy = xy if self.xy is None else self.xy + xy

    def solve(self) -> Tensor:
        """Ridge-regularised least squares, shape (groups, features, outputs per group)."""
        diag = self.xx.diagonal(dim1=1, dim2=2)
        ridge = 1e-6 * diag.mean(1).clamp_min(1e-12)
        eye = torch.eye(self.xx.shape[1], dtype=self.xx.dtype, device=self.xx.device)
        return torch.linalg.solve(self.xx + ridge[:, None, None] * eye, self.xy)


def _last_conv(pair: SeparableConv2d) -> nn.Conv2d:
    return pair.pointwise if pair.order == "dw-pw" else pair.depthwise


def refit(
    original: nn.Module,
    separated: nn.Module,
    layers: Sequence[tuple[nn.Module | Tensor, SeparableConv2d]],
    batches: list[tuple],
) -> list[tuple[float, float]]:
    """Refit each pair's last conv so its outputs match the original layer's, in order.

    Args:
        original: the dense model (run, never changed).
        separated: the model holding the pairs.
        layers: (original conv module, or a functional conv's weight; pair), in execution order.
        batches: calibration input tuples.

    Returns:
        Per layer, the relative output error on the calibration data before and after.
    """
    errors = []
    device = model_device(separated)
    with eval_mode(original), eval_mode(separated), torch.no_grad():
        for source, pair in layers:
            conv = _last_conv(pair)
            equations = _NormalEquations()
            targets, inputs = [], []
            for batch in batches:
                batch = on_device(batch, device)
                target = _original_output(original, source, batch)
                z = _input_of(separated, conv, batch)
                equations.add(_columns(conv, z), target, conv.bias is not None)
                targets.append(target)
                inputs.append(z)
            before = _relative_error(conv, inputs, targets)
            solution = equations.solve()  # (g, f[+1], o_g)
            f = conv.weight[0].numel()
            weight_new = solution[:, :f, :].permute(0, 2, 1).reshape(conv.weight.shape)
            old_w = conv.weight.detach().clone()
            old_b = conv.bias.detach().clone() if conv.bias is not None else None
            conv.weight.copy_(weight_new.to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.copy_(solution[:, f, :].reshape(-1).to(conv.bias.dtype))
            after = _relative_error(conv, inputs, targets)
            if not after <= before:  # ill-conditioned data: keep the SVD initialisation
                conv.weight.copy_(old_w)
                if old_b is not None:
                    conv.bias.copy_(old_b)
                after = before
            errors.append((before, after))
    return errors


def _relative_error(conv: nn.Conv2d, inputs: list[Tensor], targets: list[Tensor]) -> float:
    num = sum(float((conv(z) - t).double().pow(2).sum()) for z, t in zip(inputs, targets))
    den = sum(float(t.double().pow(2).sum()) for t in targets)
    return (num / den) ** 0.5 if den > 0 else 0.0


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
