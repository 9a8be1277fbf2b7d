"""Baking: convs whose weight is computed made plain, on the working copy (``core.working_copy``).

A weight recomputed at each access (``parametrizations.weight_norm`` / ``spectral_norm``, or
the old hook-based ``nn.utils.weight_norm`` / ``spectral_norm``) has no stable identity to
match in calls; the pair that replaces such a conv holds the computed weight anyway. The
weight is read in eval mode, where spectral norm uses its stored vectors instead of running a
power iteration, so the plain conv computes what the model computes at inference.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ..core.inputs import eval_mode
from ..core.modules import CONV_TYPES, SamePadded, plain_conv, runs_as_standard
from ..core.references import swap_module
from ..measure.conv_calls import ALL_CONV_FUNCTIONS, ConvRecorder, conv_arguments


def _norm_hooks(conv: nn.Module) -> list:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return [h for h in conv._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]


def _computed_weight(conv: nn.Module) -> torch.Tensor | None:
    """The eval-mode weight of a conv whose weight is computed; None for a plain conv."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    if parametrize.is_parametrized(conv, "weight"):
        with eval_mode(conv), torch.no_grad():
            return conv.weight.detach().clone()
    hooks = _norm_hooks(conv)
    if not hooks or len(hooks) != len(conv._forward_pre_hooks):
        return None
    (hook,) = hooks
    with torch.no_grad():
        if isinstance(hook, SpectralNorm):
            return hook.compute_weight(conv, do_power_iteration=False).detach().clone()
        return hook.compute_weight(conv).detach().clone()


def bake(work: nn.Module) -> tuple[nn.Module, list[tuple[nn.Module, nn.Module]]]:
    """Replace each conv of ``work`` whose weight is computed by a plain conv holding that weight.

    A new module is put in place rather than calling ``remove_parametrizations``, which edits
    the parametrized class that the caller's model shares with the deep copy. Returns the
    model and each (plain, original) pair, so :func:`unbake` can restore the convs that end
    up dense.
    """
    baked = []
    for conv in [m for m in work.modules() if isinstance(m, CONV_TYPES)]:
        if not runs_as_standard(conv):
            plain = _rebased(conv)
            if plain is not None:
                work = swap_module(work, conv, plain)
                baked.append((plain, conv))
            continue
        weight = _computed_weight(conv)
        if weight is None:
            continue
        plain = plain_conv(conv, weight)
        work = swap_module(work, conv, plain)
        baked.append((plain, conv))
    return work, baked


def unbake(work: nn.Module, baked: list[tuple[nn.Module, nn.Module]]) -> nn.Module:
    """Put back the original (parametrized, or subclass) conv wherever its plain stand-in was left dense."""
    for plain, original in baked:
        if isinstance(plain, SamePadded) and not isinstance(plain.conv, CONV_TYPES):
            continue  # its conv was separated: the padding step stays with the pair
        work = swap_module(work, plain, original)
    return work


def _rebased(conv: nn.Module) -> nn.Module | None:
    """A conv subclass's forward as a standard conv (behind the padding step it keeps), or None.

    The subclass is probed in eval mode on two input sizes: its forward must make exactly one
    conv call of its own kind and return that call's output as it is, with the same weight
    values and options both times (a weight
    computed from its parameters alone, as weight standardisation does), on either its input
    itself or its input padded TensorFlow-"SAME" style (timm's ``Conv2dSame``). Anything else
    returns None: the conv then stays dense, with the reason the sites give.
    """
    if isinstance(conv.weight, nn.parameter.UninitializedParameter) or conv.transposed:
        return None
    dims = conv.weight.dim() - 2
    base_size = [d * (k - 1) + s + 3 for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation)]
    probes = []
    for extra in (0, 1):
        generator = torch.Generator().manual_seed(extra)  # the caller's random state is not touched
        x = torch.randn(1, conv.in_channels, *(n + extra for n in base_size), generator=generator,
                        dtype=conv.weight.dtype).to(conv.weight.device)
        given = x.clone()
        try:
            with eval_mode(conv), torch.no_grad(), ConvRecorder(keep=(), keep_inputs=False) as recorder:
                probe = _Probe()
                with probe:
                    out = conv(x)
        except Exception:  # a forward that needs more than an input of its channels: not ours to guess
            return None
        calls = recorder.calls
        if len(calls) != 1 or calls[0].transposed or calls[0].weight.dim() != dims + 2 or out is not probe.output:
            return None  # not one conv, or something more happens after it
        if not torch.equal(out, probe.value) or not torch.equal(x, given):
            return None  # the output or the input was changed in place after the conv (an in-place activation)
        probes.append((x, calls[0], probe.input, probe.input_value))
    (x0, c0, in0, v0), (x1, c1, in1, v1) = probes
    same = lambda a, b: a.shape == b.shape and torch.equal(a, b)  # noqa: E731
    if not same(c0.weight, c1.weight) or (c0.stride, c0.padding, c0.dilation, c0.groups) != (c1.stride, c1.padding, c1.dilation, c1.groups):
        return None
    if (c0.bias is None) != (c1.bias is None) or (c0.bias is not None and not same(c0.bias, c1.bias)):
        return None
    if in0 is x0 and in1 is x1:
        padded = False
    else:
        k, s, d = conv.kernel_size, conv.stride, conv.dilation
        expected = [F.pad(x, SamePadded.padding_for(x.shape[2:], k, s, d)) for x in (x0, x1)]
        if not (same(v0, expected[0]) and same(v1, expected[1])):
            return None
        padded = True
    plain = plain_conv(conv, c0.weight, bias=c0.bias, stride=c0.stride, padding=c0.padding, dilation=c0.dilation,
                       groups=c0.groups, padding_mode="zeros")
    return SamePadded(plain) if padded else plain


class _Probe(TorchFunctionMode):
    """Catches the input and output of the conv call of a probe, and the values they had then."""

    def __init__(self) -> None:
        super().__init__()
        self.input = self.input_value = self.output = self.value = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ALL_CONV_FUNCTIONS:
            x = conv_arguments(args, kwargs, func)["input"]
            self.input, self.input_value, self.output, self.value = x, x.clone(), out, out.clone()
        return out
