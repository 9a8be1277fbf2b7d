"""``separate``: the public entry point of the conversion, and its result records."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch
from torch import nn

from ..inputs import as_inputs, eval_mode, model_device, on_device
from ..errors import InvalidOptionError, NothingToSeparateError, SeparationError
from .decompose import ORDERS, dense_params
from .fx_pass import (
    FunctionalConv,
    find_conv_uses,
    iter_convs,
    rewrite_functional,
    set_module,
    trace_regions,
)
from .modules import SeparableConv2d

if TYPE_CHECKING:
    from ..analysis.compare import Comparison

log = logging.getLogger(__name__)

Rank = int | str


@dataclass(frozen=True)
class LayerChange:
    """One dense conv that was replaced by a separable pair."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    rank: int
    order: str
    params_before: int
    params_after: int
    relative_error: float
    source: str  # "module" (an nn.Conv2d) or "function" (an F.conv2d call on a parameter)


class SkippedLayer(NamedTuple):
    """A conv, or a part of the model, left as it was, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Separation:
    """What :func:`separate` did.

    Attributes:
        model: the separated model, on the input's device, dtype and train/eval mode.
        layers: one record per separated conv, in model order.
        skipped: every conv left dense and every part of the model fx could not trace.
        original: the caller's model, untouched (kept for :meth:`report`).
    """

    model: nn.Module
    layers: tuple[LayerChange, ...]
    skipped: tuple[SkippedLayer, ...]
    original: nn.Module = field(repr=False, compare=False)

    @property
    def params_before(self) -> int:
        """Parameters of the separated layers before separation."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the separated layers after separation."""
        return sum(layer.params_after for layer in self.layers)

    def report(self, example_inputs: Any) -> "Comparison":
        """The before/after comparison of the whole model on ``example_inputs``."""
        from ..analysis.compare import compare

        comparison = compare(self.original, self.model, example_inputs)
        return dataclasses.replace(comparison, skipped=tuple((s.name, s.reason) for s in self.skipped))


def _check_rank(rank: Rank) -> Rank:
    if rank == "full":
        return rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidOptionError(f"rank must be a positive integer or 'full', got {rank!r}")
    return rank


def _pattern_reason(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> str | None:
    for pattern in exclude:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return f"excluded by pattern {pattern!r}"
    if include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
        return "not matched by any include pattern"
    return None


def _shape_reason(weight_shape: Sequence[int], groups: int) -> str | None:
    n, m_g, kh, kw = weight_shape
    if (kh, kw) == (1, 1):
        return "1x1 conv: already pointwise"
    if m_g == 1:
        return "already depthwise" if groups > 1 else "already depthwise (a single input channel)"
    return None


def _module_reason(conv: nn.Conv2d, read_directly: bool) -> str | None:
    cls = type(conv)
    if cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward:
        return f"{cls.__name__} overrides Conv2d's forward, so the separated pair may not compute the same thing"
    if conv._forward_hooks or conv._forward_pre_hooks or getattr(conv, "_forward_hooks_with_kwargs", None):
        return "has forward hooks, which the separated pair would not run"
    if not conv.weight.is_floating_point():
        return f"weight dtype {conv.weight.dtype} is not a float type"
    if read_directly:
        return "the model reads this conv's weight directly, so replacing the module would break it"
    return _shape_reason(conv.weight.shape, conv.groups)


def _layer_change(name: str, pair: SeparableConv2d, groups: int, weight: torch.Tensor, has_bias: bool, source: str) -> LayerChange:
    n, m_g, kh, kw = weight.shape
    return LayerChange(
        name=name,
        in_channels=m_g * groups,
        out_channels=n,
        kernel_size=(kh, kw),
        stride=tuple(pair.stride),
        groups=groups,
        rank=pair.rank,
        order=pair.order,
        params_before=dense_params(n, m_g * groups, (kh, kw), groups, has_bias),
        params_after=sum(p.numel() for p in pair.parameters()),
        relative_error=pair.relative_error,
        source=source,
    )


def separate(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    rank: Rank = 1,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    order: str = "dw-pw",
) -> Separation:
    """Replace every standard ``Conv2d`` of ``model`` by a depthwise-separable pair.

    Each pair is initialised from the trained weights by truncated SVD, so it is the closest
    rank-``rank`` separable conv to the original; ``rank="full"`` reproduces the original to
    float precision. The caller's model is never modified.

    Args:
        model: any ``nn.Module``, a bare ``nn.Conv2d`` included; parts fx cannot trace are
            kept and reported.
        example_inputs: a tensor or tuple of tensors; when given, the separated model is run
            on them to prove it still works.
        rank: separable filters per channel, a positive int or ``"full"``; an explicit rank
            separates every eligible conv, even where it costs more than the dense conv.
        include: glob patterns on qualified names (``"layer1.*"``); when given, only matching
            convs are separated.
        exclude: glob patterns of convs to leave dense; they win over ``include``.
        order: ``"dw-pw"`` (depthwise then pointwise) or ``"pw-dw"`` (pointwise then depthwise).

    Returns:
        A :class:`Separation` with the new model, a record per separated layer and the
        reason for every conv left dense.

    Raises:
        InvalidOptionError: bad ``rank`` or ``order``.
        NothingToSeparateError: no conv can be separated under these options.
        SeparationError: the separated model fails on ``example_inputs``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        >>> result = separate(net, torch.randn(1, 3, 32, 32), rank="full")
        >>> [layer.name for layer in result.layers]
        ['0']
    """
    rank = _check_rank(rank)
    if order not in ORDERS:
        raise InvalidOptionError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    work = copy.deepcopy(model)
    layers: list[LayerChange] = []
    skipped: list[SkippedLayer] = []

    def pair_rank(weight: torch.Tensor, groups: int) -> int:
        return 10**9 if rank == "full" else int(rank)  # clamped to the exact rank in from_weight

    if isinstance(work, nn.Conv2d):
        tracing, uses = None, None
        read_directly: set[str] = set()
    else:
        tracing = trace_regions(work)
        uses = find_conv_uses(tracing, work)
        read_directly = uses.read_directly
        skipped += [SkippedLayer(name, reason) for name, reason in tracing.untraced.items()]
        skipped += [SkippedLayer(name, reason) for name, reason in uses.unusable]

    for names, conv in list(iter_convs(work)):
        reason = _pattern_reason(names, include, exclude) or _module_reason(
            conv, any(n in read_directly for n in names)
        )
        label = names[0] or "<model>"
        if reason:
            skipped.append(SkippedLayer(label, reason))
            continue
        pair = SeparableConv2d.from_conv(conv, rank=pair_rank(conv.weight, conv.groups), order=order)
        layers.append(_layer_change(label, pair, conv.groups, conv.weight, conv.bias is not None, "module"))
        for name in names:
            if name:
                set_module(work, name, pair)
            else:
                work = pair

    if uses is not None and uses.functional:
        eligible: list[FunctionalConv] = []
        for call in uses.functional:
            weight = work.get_parameter(call.name) if _is_param(work, call.name) else None
            reason = _pattern_reason([call.name], include, exclude) or (
                "weight is not a 4-d float parameter" if weight is None or weight.dim() != 4 or not weight.is_floating_point()
                else _shape_reason(weight.shape, call.groups)
            )
            if reason:
                skipped.append(SkippedLayer(call.name, reason))
            else:
                eligible.append(call)

        def build(call: FunctionalConv, weight: torch.Tensor, bias: torch.Tensor | None) -> SeparableConv2d:
            pair = SeparableConv2d.from_weight(
                weight, bias, stride=call.stride, padding=call.padding, dilation=call.dilation,
                groups=call.groups, rank=pair_rank(weight, call.groups), order=order,
            ).train(work.training)
            layers.append(_layer_change(call.name, pair, call.groups, weight, bias is not None, "function"))
            return pair

        work, done = rewrite_functional(work, tracing, eligible, build)
        for call in eligible:
            if call not in done:
                skipped.append(SkippedLayer(call.name, "conv2d call could not be rewritten where it is made"))

    if not layers:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "the model has no Conv2d"
        raise NothingToSeparateError(f"nothing to separate ({detail})")
    work.train(model.training)
    if inputs:
        _check_runs(work, inputs)
    return Separation(model=work, layers=tuple(layers), skipped=tuple(skipped), original=model)


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _check_runs(model: nn.Module, inputs: tuple) -> None:
    """Run the separated model once, in eval mode so BatchNorm statistics stay as trained."""
    try:
        with eval_mode(model), torch.no_grad():
            model(*on_device(inputs, model_device(model)))
    except Exception as error:
        raise SeparationError(
            f"the separated model fails on the example inputs ({type(error).__name__}: {error}); "
            "exclude the layer involved with exclude=[...] / --exclude"
        ) from error
