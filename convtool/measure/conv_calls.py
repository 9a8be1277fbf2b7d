"""What every conv2d call of a forward pass did: one recorder for the planner, the proof, calibration and reports.

A ``TorchFunctionMode`` sees each ``F.conv2d`` / ``torch.conv2d`` call however it is reached:
from an ``nn.Conv2d``, a subclass, a pair's halves, or a functional call on a parameter. Calls
are keyed by the identity of their weight tensor, which is what a layer is: the proof asks
whether a pair's weights were used and the replaced weight was not; the planner sums a
weight's pixels over all its calls; calibration keeps the tensors of one weight's calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.inputs import eval_mode

CONV_FUNCTIONS = (torch.conv2d, F.conv2d)
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def conv_arguments(args: tuple, kwargs: dict | None) -> dict[str, Any]:
    """The arguments of a conv2d call by name, defaults filled in."""
    bound = dict(_DEFAULTS)
    bound.update(zip(_ARGS, args))
    bound.update(kwargs or {})
    return bound


def explicit_padding(padding: Any, kernel: Sequence[int], dilation: Any) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of a conv2d call, ``"same"`` and ``"valid"`` included.

    ``"same"`` puts the odd pixel of an even total on the right/bottom, as torch does.
    """
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th, tw = dh * (kernel[0] - 1), dw * (kernel[1] - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (pw, pw, ph, ph)


def _pixels(shape: torch.Size) -> int:
    batch = shape[0] if len(shape) == 4 else 1
    return batch * shape[-2] * shape[-1]


@dataclass
class ConvCall:
    """One conv2d call. ``input`` / ``output`` are kept only for the weights asked for."""

    weight: Tensor
    bias: Tensor | None
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    input_shape: tuple[int, ...]
    in_pixels: int  # batch x H x W of the input
    out_pixels: int  # batch x H x W of the output
    flops: int  # fvcore's count: output elements x (M/g) x kh x kw
    index: int  # position in the pass: the execution order of calls on different weights
    input: Tensor | None = None
    output: Tensor | None = None


class _Stop(BaseException):
    """Ends a pass once the calls asked for are recorded; a BaseException so a model's ``except Exception`` lets it through."""


class ConvRecorder(TorchFunctionMode):
    """Records every conv2d call of the passes run inside it, in order.

    Args:
        keep: ids of weights whose calls keep their input and output tensors (detached).
        stop_after: end the pass (quietly, see :func:`record`) once this many calls of the
            ``keep`` weights are recorded.
        keep_inputs: keep the inputs of those calls too, not only their outputs.
    """

    def __init__(self, keep: Iterable[int] = (), stop_after: int | None = None, keep_inputs: bool = True) -> None:
        super().__init__()
        self.keep = set(keep)
        self.keep_inputs = keep_inputs
        self.stop_after = stop_after
        self.calls: list[ConvCall] = []
        self.kept = 0
        self.output: Any = None  # the model's output, when the pass ran to the end

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in CONV_FUNCTIONS:
            a = conv_arguments(args, kwargs)
            x, w = a["input"], a["weight"]
            keep = id(w) in self.keep
            self.calls.append(
                ConvCall(
                    weight=w, bias=a["bias"], stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                    groups=a["groups"], input_shape=tuple(x.shape), in_pixels=_pixels(x.shape),
                    out_pixels=_pixels(out.shape), flops=out.numel() * w[0].numel(), index=len(self.calls),
                    input=x.detach() if keep and self.keep_inputs else None, output=out.detach() if keep else None,
                )
            )
            if keep:
                self.kept += 1
                if self.stop_after is not None and self.kept >= self.stop_after:
                    raise _Stop
        return out

    def by_weight(self) -> dict[int, list[ConvCall]]:
        """The calls grouped by ``id(weight)``, each group in call order."""
        groups: dict[int, list[ConvCall]] = {}
        for call in self.calls:
            groups.setdefault(id(call.weight), []).append(call)
        return groups


def record(
    model: nn.Module,
    inputs: tuple,
    *,
    keep: Iterable[int] = (),
    stop_after: int | None = None,
    keep_inputs: bool = True,
    own_mode: bool = False,
) -> ConvRecorder:
    """Run ``model`` once without gradients and return what its conv2d calls did.

    In eval mode unless ``own_mode`` (then the caller keeps the state it cares about).
    A pass ended by ``stop_after`` returns what was recorded until then.
    """
    recorder = ConvRecorder(keep, stop_after, keep_inputs)
    mode = contextlib.nullcontext() if own_mode else eval_mode(model)
    try:
        with mode, torch.no_grad(), recorder:
            recorder.output = model(*inputs)
    except _Stop:
        pass
    return recorder

