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
from .calibrate import calibration_batches, recalibrate_batchnorm, refit
from .modules import SeparableConv2d
from .plan import Candidate, make_plan
from .ranks import conv_shapes

if TYPE_CHECKING:
    from ..analysis.compare import Comparison

log = logging.getLogger(__name__)

Rank = int | str


@dataclass(frozen=True)
class PairShape:
    """What a separated layer is: the dense conv's shape and the pair that replaced it."""

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
    relative_error: float  # relative Frobenius error of the SVD initialisation's weights


@dataclass(frozen=True)
class LayerChange(PairShape):
    """One dense conv that was replaced by a separable pair."""

    source: str = "module"  # "module" (an nn.Conv2d) or "function" (an F.conv2d call on a parameter)


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
        budget_met: with a FLOP target, whether it was reached (None without one).
        flops_before, flops_after: with a FLOP target, the model's multiply-adds on the
            example inputs before and after, as the budget counted them.
    """

    model: nn.Module
    layers: tuple[LayerChange, ...]
    skipped: tuple[SkippedLayer, ...]
    original: nn.Module = field(repr=False, compare=False)
    budget_met: bool | None = None
    flops_before: float | None = None
    flops_after: float | None = None

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


def _check_options(rank, order, flops_target, energy) -> int | str:
    if rank is None:
        rank = "auto" if (flops_target is not None or energy is not None) else 1
    if rank != "auto":
        rank = _check_rank(rank)
        if flops_target is not None or energy is not None:
            raise InvalidOptionError("flops_target and energy choose the ranks: use them with rank='auto'")
    if order not in (*ORDERS, "auto"):
        raise InvalidOptionError(f"order must be one of {', '.join((*ORDERS, 'auto'))}; got {order!r}")
    if flops_target is not None and energy is not None:
        raise InvalidOptionError("give flops_target or energy, not both")
    if flops_target is not None and not 0 < flops_target <= 1:
        raise InvalidOptionError(f"flops_target is a fraction of the original FLOPs in (0, 1]; got {flops_target}")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidOptionError(f"energy is a share of spectral energy in (0, 1]; got {energy}")
    return rank


def _check_latency(latency_provider: str | None) -> None:
    if latency_provider is not None:
        from ..analysis.runtime import provider_name

        provider_name(latency_provider)


def separate(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    rank: Rank | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    order: str = "dw-pw",
    flops_target: float | None = None,
    energy: float | None = None,
    calibration: Any = None,
    recalibrate_bn: bool = False,
    latency_provider: str | None = None,
) -> Separation:
    """Replace every standard ``Conv2d`` of ``model`` by a depthwise-separable pair.

    Each pair is initialised from the trained weights by truncated SVD, so it is the closest
    rank-``rank`` separable conv to the original; ``rank="full"`` reproduces the original to
    float precision. The caller's model is never modified.

    Args:
        model: any ``nn.Module``, a bare ``nn.Conv2d`` included; parts fx cannot trace are
            kept and reported.
        example_inputs: a tensor or tuple of tensors; when given, the separated model is run
            on them to prove it still works, and FLOP budgets are costed on them.
        rank: separable filters per channel: a positive int, ``"full"`` (exact), or ``"auto"``
            (chosen per layer by ``flops_target`` or ``energy``). Default 1, or ``"auto"``
            when ``flops_target`` or ``energy`` is given. An explicit rank separates every
            eligible conv, even where it costs more than the dense conv.
        include: glob patterns on qualified names (``"layer1.*"``); when given, only matching
            convs are separated.
        exclude: glob patterns of convs to leave dense; they win over ``include``.
        order: ``"dw-pw"`` (depthwise then pointwise), ``"pw-dw"`` (pointwise then
            depthwise), or ``"auto"`` (per layer, the lower error at the rank or budget).
        flops_target: with ``rank="auto"``: the model's FLOPs after separation (fvcore's
            count on the example inputs), as a fraction of before (0.25 = four times fewer);
            layers may stay dense where that is cheaper.
        energy: with ``rank="auto"``: per layer, the smallest rank keeping this share of the
            squared singular values.
        calibration: unlabeled model inputs (a tensor, a tuple of tensors for several inputs,
            or an iterable of batches). The rank choice then weighs output error instead of
            weight error, and every separated layer's last conv is refit by least squares to
            reproduce the original layer's outputs.
        latency_provider: an onnxruntime provider (``"cpu"``, ``"cuda"``) on which each
            layer's separated forms are timed at the layer's input shape (needs example
            inputs); a layer whose separated form is not faster than its dense conv there stays
            dense, whatever the rank option. Without it, an explicit rank is applied everywhere.
        recalibrate_bn: after calibration, re-estimate BatchNorm statistics on the data. Off
            by default: the refit already matches each layer's original outputs, so the
            trained statistics still fit, and re-estimating them on a few hundred images
            lowered accuracy in every setting of benchmarks/accuracy.py.

    Returns:
        A :class:`Separation` with the new model, a record per separated layer and the
        reason for every conv left dense.

    Raises:
        InvalidOptionError: bad ``rank``, ``order``, ``flops_target``, ``energy`` or data.
        NothingToSeparateError: no conv can be separated under these options.
        SeparationError: the separated model fails on ``example_inputs``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        >>> result = separate(net, torch.randn(1, 3, 32, 32), rank="full")
        >>> [layer.name for layer in result.layers]
        ['0']
    """
    rank = _check_options(rank, order, flops_target, energy)
    _check_latency(latency_provider)
    if rank == "auto" and flops_target is None and energy is None:
        flops_target = 0.25
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    batches = calibration_batches(calibration) if calibration is not None else []
    work = _bake_parametrizations(copy.deepcopy(model))
    skipped: list[SkippedLayer] = []

    tracing, uses = (None, None) if isinstance(work, nn.Conv2d) else _trace(work, skipped)
    module_convs, functional = _candidates(work, uses, include, exclude, skipped)
    candidates = [c for c, _ in module_convs] + [c for c, _ in functional]
    if not candidates:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "the model has no Conv2d"
        raise NothingToSeparateError(f"nothing to separate ({detail})")

    shape_inputs = inputs or (tuple(t[:1] for t in batches[0]) if batches else ())
    plan = make_plan(
        work, candidates, rank=rank, order=order, flops_target=flops_target, energy=energy,
        shape_inputs=tuple(on_device(shape_inputs, model_device(work))),
        calibration_batch=tuple(on_device(batches[0], model_device(work))) if batches else None,
        latency_provider=latency_provider,
    )
    skipped += [SkippedLayer(name, reason) for name, reason in plan.dense_reasons.items()]

    layers: list[LayerChange] = []
    built: dict[str, SeparableConv2d] = {}

    def make_pair(c: Candidate, source: str) -> SeparableConv2d:
        order_, rank_ = plan.picks[c.name]
        pair = SeparableConv2d.from_weight(c.weight, c.bias, groups=c.groups, rank=rank_, order=order_, **c.options)
        pair.train(work.training)
        layers.append(_layer_change(c.name, pair, c.groups, c.weight, c.bias is not None, source))
        built[c.name] = pair
        return pair

    for c, names in module_convs:
        if plan.picks.get(c.name) is None:
            continue
        pair = make_pair(c, "module")
        for name in names:
            if name:
                set_module(work, name, pair)
            else:
                work = pair
    planned = [call for c, call in functional if plan.picks.get(c.name) is not None]
    if planned:
        by_call = {id(call): c for c, call in functional}
        work, done = rewrite_functional(
            work, tracing, planned, lambda call, w, b: make_pair(by_call[id(call)], "function")
        )
        skipped += [
            SkippedLayer(call.name, "conv2d call could not be rewritten where it is made") for call in planned if call not in done
        ]
    if not layers:
        reason = next(iter(plan.dense_reasons.values()), "every conv stays dense")
        raise NothingToSeparateError(f"nothing to separate: every conv stays dense ({reason})")

    work.train(model.training)
    if batches:
        _calibrate(model, work, built, batches, recalibrate_bn)
    if inputs:
        _check_runs(work, inputs)
    return Separation(
        model=work, layers=tuple(layers), skipped=tuple(skipped), original=model,
        budget_met=plan.budget_met, flops_before=plan.flops_before, flops_after=plan.flops_after,
    )


def _trace(work: nn.Module, skipped: list[SkippedLayer]):
    tracing = trace_regions(work)
    uses = find_conv_uses(tracing, work)
    skipped += [SkippedLayer(name, reason) for name, reason in tracing.untraced.items()]
    skipped += [SkippedLayer(name, reason) for name, reason in uses.unusable]
    return tracing, uses


def _candidates(work, uses, include, exclude, skipped):
    """Module convs (with all their names) and functional calls that may be separated."""
    read_directly = uses.read_directly if uses is not None else set()
    module_convs: list[tuple[Candidate, list[str]]] = []
    for names, conv in iter_convs(work):
        label = names[0] or "<model>"
        reason = _pattern_reason(names, include, exclude) or _module_reason(conv, any(n in read_directly for n in names))
        if reason:
            skipped.append(SkippedLayer(label, reason))
            continue
        options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)
        module_convs.append((Candidate(label, conv.weight, conv.bias, conv.groups, options), names))
    functional: list[tuple[Candidate, FunctionalConv]] = []
    for call in uses.functional if uses is not None else []:
        weight = work.get_parameter(call.name) if _is_param(work, call.name) else None
        bias = _tensor(work, call.bias_name) if call.bias_name else None
        if weight is None or weight.dim() != 4 or not weight.is_floating_point():
            reason = "weight is not a 4-d float parameter"
        else:
            reason = _pattern_reason([call.name], include, exclude) or _shape_reason(weight.shape, call.groups)
        if reason:
            skipped.append(SkippedLayer(call.name, reason))
            continue
        options = dict(stride=call.stride, padding=call.padding, dilation=call.dilation, padding_mode="zeros")
        # One weight called with several configurations gives several pairs: label each apart.
        seen = sum(c.name.split("@")[0] == call.name for c, _ in functional)
        label = f"{call.name}@{seen + 1}" if seen else call.name
        functional.append((Candidate(label, weight, bias, call.groups, options), call))
    return module_convs, functional


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or a buffer by qualified name (a functional conv's bias may be either)."""
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _bake_parametrizations(work: nn.Module) -> nn.Module:
    """Replace parametrized convs (weight_norm, spectral_norm...) of our copy by plain ones.

    Their weight is recomputed at each access, so it has no stable identity to match in calls;
    the pair that replaces such a conv holds the computed weight anyway. A new module is put in
    place rather than calling ``remove_parametrizations``, which edits the parametrized class
    that the caller's model shares with our deep copy.
    """
    from torch.nn.utils import parametrize

    for names, conv in list(iter_convs(work)):
        if not parametrize.is_parametrized(conv):
            continue
        plain = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        ).train(conv.training)
        with torch.no_grad():
            plain.weight.copy_(conv.weight)
            if conv.bias is not None:
                plain.bias.copy_(conv.bias)
        plain.weight.requires_grad_(conv.weight.requires_grad)
        for name in names:
            if name:
                set_module(work, name, plain)
            else:
                work = plain
    return work


def _calibrate(original, work, built, batches, recalibrate_bn) -> None:
    """Refit the pairs in the order the original model first runs their convs, then BatchNorm.

    The original layer's output is caught by a hook on its module (a functional conv's by its
    weight); a weight called with several configurations keeps its SVD initialisation, as
    its calls cannot be told apart.
    """
    shared = {name.split("@")[0] for name in built if "@" in name}
    sources = {name: _original_layer(original, name) for name in built if name.split("@")[0] not in shared}
    shapes, _, _ = conv_shapes(original, tuple(on_device(tuple(t[:1] for t in batches[0]), model_device(original))))
    position = {key: i for i, key in enumerate(shapes)}

    def first_run(name: str) -> int:
        source = sources[name]
        weight = source.weight if isinstance(source, nn.Module) else source
        return position.get(id(weight), len(position))

    ordered = sorted(sources, key=first_run)
    refit(original, work, [(sources[name], built[name]) for name in ordered], batches)
    if recalibrate_bn:
        recalibrate_batchnorm(work, batches)


def _original_layer(original: nn.Module, name: str) -> nn.Module | torch.Tensor:
    """The original conv module at ``name``, or the weight parameter of a functional conv."""
    if name == "<model>":
        return original
    try:
        return original.get_submodule(name)
    except AttributeError:
        return original.get_parameter(name)


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
