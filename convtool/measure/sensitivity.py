"""How much one layer's change moves the model's output, measured by running the model.

The rank planner spends a FLOP budget where error costs least. Summed layer errors treat an
error in the stem like one next to the classifier; what matters is the model's output. Here
the model runs on one calibration batch with a single conv's weight swapped for another (the
dense weight a rank-r pair computes) and everything else dense, and its output is compared
with the dense model's: the mean KL divergence per sample for logits, the relative squared error for
any other float output (feature maps, flow, audio); a model with several outputs adds them up.
Any 2-d float output with two or more columns is taken to be logits: a detector's (N, 4) box
tensor is scored by KL too, which misses a shift of a whole row.

Why run the model rather than estimate from gradients: the changes that matter are not small.
A first-order estimate (random output probes, the Fisher information at the dense output) was
tried on the digits CNN and missed the true divergence of a rank-1 layer by three orders of
magnitude, both ways: a confident classifier is flat near its output and steep a little further
away (benchmarks/RESULTS.md, "Sensitivity-aware allocation").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..core.inputs import eval_mode
from .conv_calls import ALL_CONV_FUNCTIONS, CONV_ARGUMENTS, TRANSPOSED_ARGUMENTS, conv_arguments


class _Swap(TorchFunctionMode):
    """Every conv call on ``weight`` (by identity) uses ``replacement`` instead, and ``bias`` when given."""

    def __init__(self, weight: Tensor, replacement: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight, self.replacement, self.bias = weight, replacement, bias

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ALL_CONV_FUNCTIONS:
            call = conv_arguments(args, kwargs, func)
            if call["weight"] is self.weight:
                call["weight"] = self.replacement
                if self.bias is not None:
                    call["bias"] = self.bias
                names = TRANSPOSED_ARGUMENTS if call.pop("transposed") else CONV_ARGUMENTS
                return func(*(call[name] for name in names))
        return func(*args, **(kwargs or {}))


def _leaves(output: object) -> list[Tensor]:
    return [t.detach() for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def _logits(leaf: Tensor) -> bool:
    return leaf.dim() == 2 and leaf.shape[1] >= 2


def divergence(reference: list[Tensor], changed: list[Tensor]) -> float:
    """How far a model's outputs moved: mean KL per sample for logits, relative squared error otherwise, summed."""
    total = 0.0
    for ref, new in zip(reference, changed):
        ref, new = ref.double(), new.double()
        if _logits(ref):
            log_p, log_q = torch.log_softmax(ref, 1), torch.log_softmax(new, 1)
            total += float((log_p.exp() * (log_p - log_q)).sum(1).mean())
        else:
            total += float((new - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
    return total


class OutputError:
    """The model's output divergence on one batch when a single conv's weight is replaced.

    Args:
        model: run in eval mode, without gradients; never changed.
        inputs: one batch of model inputs (the dense output is computed once, here).

    Raises:
        ValueError: the model's output holds no float tensor to compare.
    """

    def __init__(self, model: nn.Module, inputs: tuple) -> None:
        self.model, self.inputs = model, inputs
        with eval_mode(model), torch.no_grad():
            self.reference = _leaves(model(*inputs))
        if not self.reference:
            raise ValueError("the model's output has no float tensor to measure a change on")
        self.runs = 0

    def __call__(self, weight: Tensor, replacement: Tensor, bias: Tensor | None = None) -> float:
        """The divergence with every call of ``weight`` (by identity) using ``replacement`` (and ``bias``, when given)."""
        self.runs += 1
        bias = bias.to(weight.dtype) if bias is not None else None
        with eval_mode(self.model), torch.no_grad(), _Swap(weight, replacement.to(weight.dtype), bias):
            changed = _leaves(self.model(*self.inputs))
        return divergence(self.reference, changed)
