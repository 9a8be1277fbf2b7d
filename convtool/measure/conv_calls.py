"""What every conv call of a forward pass did: one recorder for the planner, the proof, calibration and reports.

A ``TorchFunctionMode`` sees each ``torch.conv{1,2,3}d`` / ``torch.conv_transpose{1,2,3}d``
call (``F.conv2d`` is ``torch.conv2d``) however it is reached:
from an ``nn.Conv2d``, a subclass, a pair's halves, or a functional call on a parameter. Calls
are keyed by the identity of their weight tensor, which is what a layer is: the proof asks
whether a pair's weights were used and the replaced weight was not; the planner sums a
weight's pixels over all its calls; calibration keeps the tensors of one weight's calls.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.inputs import eval_mode

CONV_FUNCTIONS = (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d)
TRANSPOSED_FUNCTIONS = (
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
)
ALL_CONV_FUNCTIONS = CONV_FUNCTIONS + TRANSPOSED_FUNCTIONS
CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
TRANSPOSED_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def conv_arguments(args: tuple, kwargs: dict | None, func: Any = None) -> dict[str, Any]:
    """The arguments of a conv call by name, defaults filled in; ``transposed`` says which kind.

    ``func`` tells a transposed conv, whose arguments come in another order, from a conv.
    """
    transposed = func in TRANSPOSED_FUNCTIONS
    bound = dict(_DEFAULTS, transposed=transposed)
    bound.update(zip(TRANSPOSED_ARGUMENTS if transposed else CONV_ARGUMENTS, args))
    bound.update(kwargs or {})
    return bound


def explicit_padding(padding: Any, kernel: Sequence[int], dilation: Any) -> tuple[int, ...]:
    """The zero padding of a conv call in ``F.pad``'s order (last dimension first, (before, after) each).

    ``"same"`` and ``"valid"`` included; ``"same"`` puts the odd pixel of an even total after,
    as torch does.
    """
    dims = len(kernel)
    dilation = (dilation,) * dims if isinstance(dilation, int) else tuple(dilation)
    if padding == "valid":
        return (0,) * (2 * dims)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple(x for t in reversed(totals) for x in (t // 2, t - t // 2))
    padding = (padding,) * dims if isinstance(padding, int) else tuple(padding)
    return tuple(x for p in reversed(padding) for x in (p, p))


def _pixels(shape: torch.Size, dims: int) -> int:
    """Batch x spatial positions; an unbatched input has dims + 1 dimensions."""
    batch = shape[0] if len(shape) == dims + 2 else 1
    return batch * math.prod(shape[-dims:])


@dataclass
class ConvCall:
    """One conv call. ``input`` / ``output`` are kept only for the weights asked for."""

    weight: Tensor
    bias: Tensor | None
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    input_shape: tuple[int, ...]
    in_pixels: int  # batch x spatial positions of the input
    out_pixels: int  # batch x spatial positions of the output
    flops: int  # fvcore's count: output elements x (M/g) x K; transposed, input elements x (N/g) x K
    index: int  # position in the pass: the execution order of calls on different weights
    input: Tensor | None = None
    output: Tensor | None = None
    transposed: bool = False
    output_padding: Any = 0


class _Stop(BaseException):
    """Ends a pass once the calls asked for are recorded; a BaseException so a model's ``except Exception`` lets it through."""


class ConvRecorder(TorchFunctionMode):
    """Records every conv call of the passes run inside it, in order.

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
        if func in ALL_CONV_FUNCTIONS:
            a = conv_arguments(args, kwargs, func)
            x, w = a["input"], a["weight"]
            keep, dims = id(w) in self.keep, w.dim() - 2
            self.calls.append(
                ConvCall(
                    weight=w, bias=a["bias"], stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                    groups=a["groups"], input_shape=tuple(x.shape), in_pixels=_pixels(x.shape, dims),
                    out_pixels=_pixels(out.shape, dims),
                    flops=(x if a["transposed"] else out).numel() * w[0].numel(), index=len(self.calls),
                    input=x.detach() if keep and self.keep_inputs else None, output=out.detach() if keep else None,
                    transposed=a["transposed"], output_padding=a["output_padding"],
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
    """Run ``model`` once without gradients and return what its conv calls did.

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

