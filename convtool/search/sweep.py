"""``sweep``: the trade-off over FLOP budgets, measured where it ships.

Users ask "how much faster, and what does it cost me"; a FLOP fraction answers neither. For
each budget the model is separated (the layers costed once for every budget, as an
:class:`~convtool.AgreementTarget` search does), exported as :func:`~convtool.export_onnx`
ships it, timed on onnxruntime in one round-robin with the original's file (so every speed-up
shares one measurement of the original), and judged: top-1 agreement and SQNR against the
original on calibration data the refit never saw, and the user's own metric if given.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.inputs import as_inputs, eval_mode, model_device, on_device, tensors_of
from ..deploy.export import export_onnx
from ..errors import InvalidOptionError, NothingToSeparateError
from ..measure.onnx_file import check_export_options
from ..measure.onnxrt import feed, require_provider, time_sessions, timing_session
from ..plan.budgets import FlopsTarget
from ..plan.costing import Costing
from .fronts import PyTorchFront
from .trials import HeldOut, split_held_out

TARGETS = (0.75, 0.5, 0.35, 0.25)
HELD_OUT = 0.25  # the share of calibration data kept from the refit to judge by, as AgreementTarget's default

# A metric the user computes on a model: fn(model, data) -> float, higher or lower as they define.
Metric = Callable[[nn.Module, Any], float]


@dataclass(frozen=True)
class SweepPoint:
    """One FLOP budget of a :func:`sweep`, or the original model (``target`` None), as measured.

    Attributes:
        target: the FLOP fraction asked (:class:`~convtool.FlopsTarget`); None for the original.
        flops_fraction: the model's FLOPs after over before, as reached (above ``target`` when
            the budget is below what separation can reach; see ``budget_met``).
        flops, params: the whole model's multiply-adds on the example inputs, and parameters.
        latency_ms: median of the exported file on the provider, timed with every other point's.
        speedup: the original's latency over this one's, from that same round-robin run.
        top1_agreement: share of judged samples whose top class is the original's (a model
            returning one (batch, classes) float output), else None.
        sqnr_db: signal-to-error ratio of all outputs against the original's; None: identical.
        metric: the user's metric on this model, when one was given.
        layers: convs separated.
        budget_met: whether the FLOP target was reached (None for the original).
        seconds: wall time of this point's separation (with its refit), export and judging;
            the first point's includes the costing every point shares.
    """

    target: float | None
    flops_fraction: float
    flops: float
    params: int
    latency_ms: float
    speedup: float
    top1_agreement: float | None
    sqnr_db: float | None
    metric: float | None
    layers: int
    budget_met: bool | None
    seconds: float


@dataclass(frozen=True)
class Sweep:
    """What :func:`sweep` measured: the original's point and one per FLOP budget, in the order asked.

    Attributes:
        original: the original model's point (FLOPs fraction 1, speed-up 1).
        points: one per target.
        metric_name: the user's metric's name (its ``__name__``), or None without one.
        judged_on: what top-1 agreement and SQNR were measured on, in words.
        provider, runs, threads: where and how the exported files were timed.
        input_shapes: the example inputs' shapes, which FLOPs and latency are measured at.
        seconds: the whole sweep's wall time, timing included.
    """

    original: SweepPoint
    points: tuple[SweepPoint, ...]
    metric_name: str | None
    judged_on: str
    provider: str
    runs: int
    threads: int | None
    input_shapes: tuple[tuple[int, ...], ...]
    seconds: float

    @property
    def measure(self) -> str:
        """The figure a plot shows against speed: the user's metric, else top-1 agreement, else SQNR."""
        if self.metric_name is not None:
            return self.metric_name
        return "top-1 agreement" if self.original.top1_agreement is not None else "SQNR (dB)"

    def value(self, point: SweepPoint) -> float | None:
        """``point``'s figure for :attr:`measure` (an SQNR of identical outputs is None: infinite)."""
        if self.metric_name is not None:
            return point.metric
        return point.top1_agreement if self.original.top1_agreement is not None else point.sqnr_db


def sweep(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    targets: Sequence[float] = TARGETS,
    calibration: Any = None,
    metric: Metric | None = None,
    metric_data: Any = None,
    sensitivity: bool | None = None,
    order: str = "dw-pw",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    refit: str = "last",
    provider: str = "cpu",
    runs: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    exporter: str = "auto",
    on_step: Callable[[int, int, str], None] | None = None,
    allow_slower: bool = False,
) -> Sweep:
    """Separate ``model`` at each FLOP budget, export each, time it against the original, and judge it.

    Args:
        model: any ``nn.Module`` :func:`~convtool.separate` takes; never modified.
        example_inputs: the inputs FLOPs are costed and latency timed on (without them, the
            first calibration sample).
        targets: FLOP fractions in (0, 1], each a :class:`~convtool.FlopsTarget`.
        calibration: unlabeled model inputs, or ``"synthetic"``. A quarter is held out: the
            rest is refit on, the held-out part judges top-1 agreement and SQNR. Without it
            the pairs are SVD-only and judged on the example inputs.
        metric: ``fn(model, data) -> float`` (accuracy on your labelled test set, say), called
            on the original and on each separated model in eval mode, without gradients.
        metric_data: what ``metric`` receives; the held-out calibration inputs (a tensor, or a
            tuple for several inputs) when not given.
        sensitivity, order, include, exclude, refit: as for :func:`~convtool.separate` and its
            :class:`~convtool.FlopsTarget` (``sensitivity`` None: at the model's output with calibration).
        allow_slower: keep layers whose separated form is not faster than their dense conv on
            ``provider`` (by default they stay dense: each point is at most its FLOPs, spent
            only where they buy time).
        provider: the onnxruntime provider every file is timed on.
        runs, warmup: timed runs of each file, all files in turn, after ``warmup`` runs each.
        threads: onnxruntime intra-op threads; its default when None.
        exporter: as for :func:`~convtool.export_onnx` (``"torchscript"`` for a model
            torch.export refuses, or to export faster).
        on_step: called as ``on_step(done, total, what)`` before each step (the original's
            export, each target's separation, then the timing) and once at the end, for a
            progress bar.

    Returns:
        A :class:`Sweep`: the original's point and one :class:`SweepPoint` per target.

    Raises:
        InvalidOptionError: a target outside (0, 1], no targets, a metric that does not return
            a finite number, or bad options for ``separate``.
        ProviderUnavailableError: ``provider`` cannot run here (refused before any work).
        NothingToSeparateError: the model has no conv to separate.

    Example:
        >>> result = convtool.sweep(model, x, targets=(0.5, 0.25), calibration=images)
        >>> [(p.target, round(p.speedup, 2), p.top1_agreement) for p in result.points]
    """
    started = time.perf_counter()
    fractions = _checked_targets(targets)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1 or not isinstance(warmup, int) or warmup < 0:
        raise InvalidOptionError(f"runs must be a positive integer and warmup a non-negative one; got {runs!r}, {warmup!r}")
    name = require_provider(provider)
    check_export_options(exporter, None)
    front = PyTorchFront(model, example_inputs, calibration, order=order, include=include, exclude=exclude,
                         recalibrate_bn=False, latency_provider=None, refit=refit)
    FlopsTarget(fractions[0], sensitivity).check(inputs=front.has_inputs, data=front.has_data)
    if not allow_slower:
        front.time_on(provider)  # never slower: the layers timed where the files will be
    calibration = front.calibration()
    inputs = as_inputs(example_inputs)
    fit = None
    if calibration is not None:
        fit, held_batches = split_held_out(front, calibration, HELD_OUT)
        inputs = inputs or tuple(t[:1] for t in fit[0])  # as separate does: the first sample it fits on
    elif inputs:
        held_batches = [inputs]
    else:
        raise InvalidOptionError("a sweep costs FLOPs and times the model on example inputs: pass them, or calibration data")
    front.example_inputs = inputs
    held = HeldOut(front, held_batches)
    judged_on = (f"{held.samples} held-out calibration samples (not used by the refit)" if fit is not None
                 else f"the example inputs ({held.samples} sample{'s' if held.samples != 1 else ''}; pass calibration data "
                      "for a figure that means something)")
    data = metric_data if metric_data is not None else _joined(held_batches)
    with tempfile.TemporaryDirectory(prefix="convtool-sweep-") as tmp:
        reference, points, files, costing = _separated_points(front, fractions, fit, held, metric, data, Path(tmp), exporter, sensitivity,
                                                   on_step)
        if on_step:
            on_step(len(fractions) + 1, len(fractions) + 2, f"timing {len(files)} ONNX files on {name}")
        original_ms, *latencies = _timed(files, inputs, name, runs, warmup, threads)
    if on_step:
        on_step(len(fractions) + 2, len(fractions) + 2, "done")
    original = SweepPoint(None, 1.0, costing.flops_total if costing.filled else math.nan, _params(model), original_ms, 1.0, *reference, 0,
                          None, 0.0)
    points = [dataclasses.replace(p, latency_ms=ms, speedup=original_ms / ms) for p, ms in zip(points, latencies)]
    shapes = tuple(tuple(t.shape) for t in tensors_of(inputs))
    return Sweep(original, tuple(points), None if metric is None else _metric_name(metric), judged_on, name, runs, threads, shapes,
                 time.perf_counter() - started)


def _separated_points(front: PyTorchFront, fractions: list[float], fit: Any, held: HeldOut, metric: Metric | None, data: Any,
                      folder: Path, exporter: str, sensitivity: bool, on_step) -> tuple[tuple, list[SweepPoint], list[Path], Costing]:
    """The original judged, and each budget separated (one costing for all), exported and judged; the files to time,
    the original's first."""
    model, inputs, total = front.model, front.example_inputs, len(fractions) + 2
    if on_step:
        on_step(0, total, "exporting and judging the original")
    files = [_export(model, inputs, folder / "original.onnx", exporter)]
    reference = _judged(model, held, metric, data, is_original=True)
    costing = Costing()  # filled by the first separation, reused by every later one
    points: list[SweepPoint] = []
    for i, fraction in enumerate(fractions):
        if on_step:
            on_step(i + 1, total, f"separating at {fraction:g} of the FLOPs")
        began = time.perf_counter()
        try:
            result, costing = front.separate(FlopsTarget(fraction, sensitivity), fit, costing, shared=True)
        except NothingToSeparateError:
            if not costing.layers:  # nothing to separate at any budget: the model's own reason
                raise
            files.append(files[0])  # this budget keeps every conv dense: the point is the original's
            points.append(SweepPoint(fraction, 1.0, costing.flops_total, _params(model), math.nan, math.nan, *reference, 0,
                                     fraction >= 1, time.perf_counter() - began))
            continue
        files.append(_export(result.model, inputs, folder / f"{i}.onnx", exporter))
        judged = _judged(result.model, held, metric, data, is_original=False)
        points.append(SweepPoint(fraction, result.flops_after / result.flops_before, result.flops_after,
                                 _params(result.model), math.nan, math.nan, *judged, len(result.layers),
                                 bool(result.budget_met), time.perf_counter() - began))
        del result  # one separated model in memory at a time
    return reference, points, files, costing


def _checked_targets(targets: Sequence[float]) -> list[float]:
    """The FLOP fractions, each checked as a :class:`FlopsTarget` is, refusing none or repeats."""
    try:
        if isinstance(targets, (str, bytes)):
            raise TypeError
        fractions = [FlopsTarget(t).fraction for t in targets]
    except TypeError:
        raise InvalidOptionError(f"targets must be a sequence of FLOP fractions in (0, 1]; got {targets!r}") from None
    if not fractions:
        raise InvalidOptionError("a sweep needs at least one FLOP target")
    if len(set(fractions)) < len(fractions):
        raise InvalidOptionError(f"the FLOP targets repeat: {', '.join(f'{t:g}' for t in fractions)}")
    return [float(t) for t in fractions]


def _joined(batches: list[tuple]) -> Any:
    """Batches of inputs as one tensor (one input) or a tuple of tensors (several)."""
    joined = tuple(torch.cat(parts) for parts in zip(*batches))
    return joined[0] if len(joined) == 1 else joined


def _judged(model: nn.Module, held: HeldOut, metric: Metric | None, data: Any, is_original: bool) -> tuple:
    """(top-1 agreement, SQNR, metric) of ``model``; the original agrees with itself by definition."""
    top1, sqnr = held.measure(None if is_original else _Model(model))
    if is_original:
        sqnr = None  # identical outputs
    value = None
    if metric is not None:
        with eval_mode(model), torch.no_grad():
            value = metric(model, data)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidOptionError(f"the metric {_metric_name(metric)} returned {value!r}; it must return a finite number")
        value = float(value)
    return top1, sqnr, value


@dataclass(frozen=True)
class _Model:
    """A separated model as the held-out measure takes a separation."""

    model: nn.Module


def _metric_name(metric: Metric) -> str:
    return getattr(metric, "__name__", None) or type(metric).__name__


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _export(model: nn.Module, inputs: tuple, path: Path, exporter: str) -> Path:
    """The model as :func:`export_onnx` ships it, at the example inputs' fixed batch (as ``benchmark`` times it)."""
    return export_onnx(model, on_device(inputs, model_device(model)), path, dynamic_batch=False, exporter=exporter).path


def _timed(files: list[Path], inputs: tuple, provider: str, runs: int, warmup: int, threads: int | None) -> list[float]:
    """Median milliseconds of each file, all timed round-robin in one run (a file listed twice is opened once)."""
    unique = list(dict.fromkeys(files))
    sessions = [timing_session(f, provider, threads) for f in unique]
    medians = dict(zip(unique, time_sessions(sessions, feed(sessions[0], inputs), runs, warmup)))
    return [medians[f] for f in files]
