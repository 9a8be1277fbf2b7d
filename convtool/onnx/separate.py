"""``separate_onnx``: separate the convs of a model held only as ONNX, and prove the result in onnxruntime.

Each ``Conv`` node (in the main graph or a subgraph) whose weight is a constant becomes two
``Conv`` nodes named after it: a depthwise one carrying the kernel, strides, dilations and
padding (``pads`` or ``auto_pad``), and a pointwise one carrying the groups and the bias, in
either order; a ``ConvTranspose`` node's depthwise half is a ``ConvTranspose`` keeping its
output padding too. The
factors come from the same SVD as the torch path (:func:`~convtool.core.decompose.separable_factors`).
Every other node, initializer, input, output, opset import and metadata entry is kept as it was.

Ranks are decided by the torch path's planner (:func:`~convtool.plan.ranks.make_plan`): a
fixed rank, an energy, or a FLOP target costed from the shapes onnx infers, counted as fvcore
counts (:mod:`~convtool.onnx.counts`); calibration refits with the same least squares
(:mod:`~convtool.onnx.refit`), in subgraphs too. Not yet here (see docs/limitations.md):
distillation, the latency filter, and BatchNorm folding inside subgraphs.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.decompose import ORDERS
from ..core.records import Benchmark, FlopsTarget, LayerChange, Rank, SkippedLayer, check_rank
from ..errors import AnalysisError, InvalidOptionError, NothingToSeparateError, OnnxFileError, SeparationError
from ..measure.compare import Comparison
from ..measure.fidelity import Fidelity, output_fidelity
from ..measure.onnxrt import missing_reason, open_session, provider_name, release_freed_memory, time_sessions
from ..plan.ranks import make_plan
from .counts import count_onnx, onnx_analysis
from .feeds import calibration_feeds, example_feeds, given_values
from .files import load_onnx, passes_check, read_with_weights_beside, write_proto, write_with_weights_beside
from .graph import fold_batchnorm, install_pairs, live_nodes
from .refit import last_convs, refit_onnx
from .sites import find_sites, model_scopes, site_stats


@dataclass(frozen=True)
class OnnxRun:
    """Both models run on one onnxruntime provider, or why they were not: ``ran`` False is never a pass."""

    provider: str
    ran: bool
    max_abs_error: float | None = None
    relative_error: float | None = None
    reason: str | None = None
    fidelity: Fidelity | None = field(default=None, repr=False)


@dataclass(frozen=True)
class OnnxSeparation:
    """What :func:`separate_onnx` did.

    Attributes:
        model: the separated ``onnx.ModelProto``, checked by ``onnx.checker`` (with shape
            inference, the full check, whenever the original passes it).
        layers: one record per separated ``Conv`` node, named after the node.
        skipped: every ``Conv`` node left as it was, with why.
        verified: the separated model ran in onnxruntime on the example inputs (on the CPU
            provider at least), every new node lies on a path to a graph output, and its
            outputs were compared with the original's (``max_abs_error``, ``relative_error``,
            the CPU run's).
        verification: how the claim was checked, or why it could not be; it names the separated
            layers the inputs did not run (``not_run``: in an ``If`` branch they did not take),
            whose pairs reach an output and pass the checker but were not compared.
        runs: one record per provider asked for, run or not (and why not).
    """

    model: Any = field(repr=False)
    layers: tuple[LayerChange, ...]
    skipped: tuple[SkippedLayer, ...]
    verified: bool = False
    verification: str = ""
    max_abs_error: float | None = None
    relative_error: float | None = None
    budget_met: bool | None = None
    flops_before: int | None = None  # the whole graph's, on the example inputs, when their shapes are known
    flops_after: int | None = None
    runs: tuple[OnnxRun, ...] = ()
    original: Any = field(default=None, repr=False, compare=False)  # the input proto; None when it was a file (``source``)
    folded_batchnorms: tuple[str, ...] = ()  # BatchNormalization nodes folded into the pair before them
    not_refit: tuple[SkippedLayer, ...] = ()  # layers calibration did not refit, with why (a branch no batch took, say): their SVD factors stay
    branches: tuple[str, ...] = ()  # which branch of each If (and how many loop iterations) the FLOPs count
    not_run: tuple[str, ...] = ()  # separated layers the check's inputs did not run (a branch not taken): not compared
    feeds: tuple = field(default=(), repr=False, compare=False)  # the inputs it ran on, in the graph's order
    source: Path | None = field(default=None, repr=False, compare=False)  # the file the model was read from

    def original_model(self):
        """The model as given: the proto, or read again from its file (not held in memory meanwhile)."""
        return self.original if self.original is not None else load_onnx(self.source)

    def _feeds(self, example_inputs: Any) -> tuple[list[np.ndarray] | None, str | None]:
        """The inputs given, else those the separation ran on."""
        if example_inputs is None and self.feeds:
            return list(self.feeds), None
        return example_feeds(self.model, example_inputs)  # the separated graph takes the same inputs

    def report(self, example_inputs: Any = None) -> Comparison:
        """The before/after comparison a PyTorch separation gets (:meth:`~convtool.Separation.report`).

        Counts on ``example_inputs`` (or the inputs the separation ran on); output agreement from the
        CPU run. Raises InvalidOptionError without input shapes, or when the CPU run did not happen.
        """
        feeds, why_not = self._feeds(example_inputs)
        cpu = next((r for r in self.runs if r.provider == "CPUExecutionProvider" and r.ran), None)
        if feeds is None or cpu is None:
            raise InvalidOptionError(f"no report without a run on the CPU: {why_not or self.verification}")
        return Comparison(onnx_analysis(self.original_model(), feeds), onnx_analysis(self.model, feeds), self.layers, cpu.fidelity,
                          self.skipped, self.verified)

    def timed(self, example_inputs: Any = None, runs: int = 20) -> Benchmark:
        """Both graphs on onnxruntime CPU (2 threads), interleaved, medians (:func:`time_onnx`)."""
        feeds, why_not = self._feeds(example_inputs)
        if feeds is None:
            raise InvalidOptionError(f"nothing to time on: {why_not}")
        with tempfile.TemporaryDirectory(prefix="convtool-onnx-time-") as tmp:
            separated = Path(tmp) / "separated.onnx"
            write_with_weights_beside(self.model, separated)
            return time_onnx(self.original_model, separated, feeds, runs)


def time_onnx(original: Callable[[], Any], separated: Path, feeds: Sequence[np.ndarray], runs: int = 20) -> Benchmark:
    """The original (its proto made by ``original()``) and the separated graph (a file, its weights
    beside it) on onnxruntime CPU, 2 threads, interleaved, medians.

    The separated graph comes as a file so that a caller done with its proto (the CLI, once the
    output is written) can let it go first: the two full sessions timed side by side are then all
    the memory held.
    """
    with tempfile.TemporaryDirectory(prefix="convtool-onnx-time-") as tmp:
        path = Path(tmp) / "original.onnx"
        proto = original()
        write_with_weights_beside(proto, path)  # onnxruntime maps the weights: two sessions, one copy each
        del proto
        release_freed_memory()
        sessions = [open_session(p, "CPUExecutionProvider", threads=2) for p in (path, separated)]
        names = [i.name for i in sessions[0].get_inputs()]
        original_ms, separated_ms = time_sessions(sessions, dict(zip(names, feeds)), runs, warmup=3)
    return Benchmark("CPUExecutionProvider", original_ms, separated_ms, runs, 2)


def separate_onnx(
    model: Any,
    example_inputs: Any = None,
    *,
    rank: Rank = 1,
    order: str = "dw-pw",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    calibration: Any = None,
    providers: Sequence[str] = ("cpu",),
    layout: str = "branches",
    fold_bn: bool = True,
) -> OnnxSeparation:
    """Replace every standard ``Conv`` node of an ONNX model by a depthwise-separable pair, and check it.

    Args:
        model: a path to a ``.onnx`` file, or an ``onnx.ModelProto`` (not modified).
        example_inputs: the graph's inputs, in order (a sequence) or by name (a dict): each an
            array, tensor or number, or a tuple of ints, a shape filled with seeded noise (float
            inputs). Float inputs of static shape not given get noise; any other input not
            given (an int64 sample rate, a dynamic dimension) is refused, naming each, when some
            inputs were given, and leaves the result unverified (saying why) when none were
            (:mod:`~convtool.onnx.feeds`).
        rank: a positive int, ``"full"`` (exact), :class:`~convtool.Energy` or
            :class:`~convtool.FlopsTarget` (the whole graph's FLOPs after, as a fraction of
            before; needs input shapes).
        order: ``"dw-pw"``, ``"pw-dw"`` or ``"auto"`` (per node, the lower weight error).
        include, exclude: glob patterns on node names, as in :func:`~convtool.separate`.
        calibration: unlabeled inputs (an array or tensor, a tuple of them for several inputs,
            a dict of them by input name, or an iterable of batches; an array of an input's whole
            declared shape, a state say, goes with every batch; an input the data lacks takes its
            value from ``example_inputs``): each pair's last conv is then refit by least squares to
            reproduce the original node's outputs, layer by layer in execution order
            (:mod:`~convtool.onnx.refit`).
        layout: ``"branches"`` (rank > 1 depthwise-first pairs of 1-d and 2-d convs as
            multiplier-1 branches, the form onnxruntime runs fastest) or ``"multiplier"``.
        fold_bn: fold a BatchNormalization that alone reads a separated pair's output into the
            pair's last conv (the runtime form; onnxruntime does it on loading too).
        providers: onnxruntime providers to run both models on (``"cpu"``, ``"cuda"``); one
            this build lacks, or that falls back to the CPU, is reported as not run.

    Raises:
        OnnxFileError: the file is not a valid ONNX model.
        InvalidOptionError: a bad option, a FLOP target without input shapes, or inputs that do
            not fit the graph.
        NothingToSeparateError: no ``Conv`` node can be separated.
        SeparationError: the separated model does not run in onnxruntime.
    """
    rank = check_rank(rank)
    if order not in (*ORDERS, "auto"):
        raise InvalidOptionError(f"order must be one of {', '.join((*ORDERS, 'auto'))}; got {order!r}")
    if layout not in ("branches", "multiplier"):
        raise InvalidOptionError(f"layout must be 'branches' or 'multiplier'; got {layout!r}")
    with tempfile.TemporaryDirectory(prefix="convtool-onnx-") as staging:  # the files onnxruntime and the checker read
        return _separate(model, example_inputs, rank, order, include, exclude, calibration, providers, layout, fold_bn, Path(staging))


def _separate(model, example_inputs, rank, order, include, exclude, calibration, providers, layout, fold_bn, staging: Path) -> OnnxSeparation:
    """:func:`separate_onnx`, its options checked, with a folder for the files it writes on the way."""
    import onnx

    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    original = load_onnx(model)
    feeds, why_not = example_feeds(original, example_inputs)
    fixed = given_values(original, example_inputs)
    if feeds is None and example_inputs is None and calibration is not None:  # the first calibration batch, then
        feeds, why_not = calibration_feeds(calibration, original, fixed)[0], None
    # Written for onnx's checker and onnxruntime now, while the proto is at hand (the rewrite reuses it).
    original_file = staging / "original.onnx"
    write_with_weights_beside(original, original_file)
    release_freed_memory()
    checks = _checks_passed(original_file)
    counts = None
    if feeds is not None:
        try:
            counts = count_onnx(original, feeds)
        except AnalysisError as error:
            why_not = str(error)
    if isinstance(rank, FlopsTarget) and counts is None:
        raise InvalidOptionError(f"a FLOP target needs the graph's FLOPs counted: {why_not}")
    if source is not None:  # the file is the original: rewrite the proto read from it, holding no second copy
        work, original = original, None
    else:  # the caller's proto is not modified
        work = onnx.ModelProto()
        work.CopyFrom(original)
    graph = work.graph
    initializers = {init.name for init in graph.initializer}
    # Before IR 4 every initializer had to be listed as an input too: those are constants in practice.
    overridable = {i.name for i in graph.input} - (initializers if work.ir_version < 4 else set())
    scopes = model_scopes(work)
    sites, where, skipped = find_sites(scopes, overridable, include, exclude)
    if not sites:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "the graph has no Conv node"
        raise NothingToSeparateError(f"nothing to separate ({detail})")
    stats = site_stats(where, counts) if counts is not None else {}
    plan = make_plan(list(sites.values()), rank, order, stats=stats, total_flops=counts.flops if counts else None)
    skipped += [SkippedLayer(name, reason) for name, reason in plan.dense_reasons.items()]
    layers, outputs, created = install_pairs(work, scopes, where, sites, plan.picks, layout)
    if not layers:
        reason = next((s.reason for s in reversed(skipped)), "every conv stays dense")
        raise NothingToSeparateError(f"nothing to separate: every conv stays dense ({reason})")
    trails = {layer.name: where[layer.name].scope.trail for layer in layers}
    main = [layer for layer in layers if not trails[layer.name]]
    del scopes, sites, where  # their arrays of every weight: not needed past the rewrite (peak memory)
    release_freed_memory()
    not_refit: tuple[SkippedLayer, ...] = ()
    if calibration is not None:
        lasts = last_convs(graph, {layer.name: outputs[layer.name][-1] for layer in layers}, trails)
        batches = calibration_feeds(calibration, work, fixed, feeds[0].shape[0] if feeds and feeds[0].ndim else None)
        errors, kept = refit_onnx(original if original is not None else load_onnx(source), work, lasts, batches)
        not_refit = tuple(SkippedLayer(layer.name, kept[layer.name]) for layer in layers if layer.name in kept)
        layers = [dataclasses.replace(layer, output_error=errors.get(layer.name)) for layer in layers]
    renamed = fold_batchnorm(graph, [outputs[layer.name] for layer in main], work.ir_version < 4) if fold_bn else {}
    folded = [bn for bn, _ in renamed.values()]
    # Written once, then checked and run from the file: no serialised copy of the proto beside it.
    written = staging / "separated.onnx"
    write_with_weights_beside(work, written, typed_lists=False)  # read back below: the same proto
    dead = created - live_nodes(graph)
    # The rewritten proto still holds every replaced weight (protobuf frees none of a message's
    # memory while any part of it lives): it is dropped while onnxruntime runs, then read back
    # from the file, compact.
    del work, graph
    lasts = None  # noqa: F841 (its LastConv records hold the proto's nodes)
    release_freed_memory()
    try:
        for full in checks:
            onnx.checker.check_model(str(written), full_check=full)
    except Exception as error:  # a bug of this pass, not the user's
        raise SeparationError(f"the separated ONNX model fails onnx.checker ({error}); please report it") from None
    runs, verification = _verify(original_file, written, dead, feeds, why_not, providers)
    work = read_with_weights_beside(written)
    cpu = next((r for r in runs if r.provider == "CPUExecutionProvider" and r.ran), None)
    verified, max_abs, relative = cpu is not None, cpu.max_abs_error if cpu else None, cpu.relative_error if cpu else None
    flops: tuple[int | None, int | None] = (None, None)
    not_run: tuple[str, ...] = ()
    if counts is not None:
        after = count_onnx(work, feeds)  # the original's shapes were inferred: the separated graph's are too
        folded_outputs = {y: value for y, (_, value) in renamed.items()}  # a folded layer's conv writes the BatchNorm's output
        key = lambda layer, value: (trails[layer.name], folded_outputs.get(value, value))  # noqa: E731
        layers = [_with_flops(layer, counts.nodes.get((trails[layer.name], outputs[layer.name][-1])),
                              [after.nodes.get(key(layer, v)) for v in outputs[layer.name]])
                  for layer in layers]
        flops = (counts.flops, after.flops)
        # A pair in a branch the inputs did not take was separated but not run by the check: say which.
        unrun = [layer.name for layer in layers if not after.runs.get(key(layer, outputs[layer.name][-1]))]
        if unrun and verified:
            verification += (f"; {len(unrun)} separated layers did not run on these inputs (in a branch they did not take) or"
                             f" could not be seen to, so their outputs were not compared: {', '.join(unrun)}")
        not_run = tuple(unrun)
    return OnnxSeparation(work, tuple(layers), tuple(skipped), verified, verification, max_abs, relative, plan.budget_met, *flops,
                          runs=tuple(runs), original=original, folded_batchnorms=tuple(folded), not_refit=not_refit, not_run=not_run,
                          branches=counts.branches if counts is not None else (), feeds=tuple(feeds or ()), source=source)


def _with_flops(layer: LayerChange, dense: int | None, pair: list[int | None]) -> LayerChange:
    """The layer with its node's multiply-adds before and its two nodes' after, when both were counted."""
    if dense is None or None in pair:
        return layer
    return dataclasses.replace(layer, flops_before=dense, flops_after=sum(pair), calls=1)


def _checks_passed(path: Path) -> list[bool]:
    """The check the result is held to: the full one (with shape inference), the plain one, or none.

    What the original meets: none for a file onnxruntime runs but the checker refuses. Read from
    ``path``, the original's file with its weights beside (one check costs the proto's size, not
    three times the weights); the separated file is checked in the same form.
    """
    return next(([full] for full in (True, False) if passes_check(str(path), full)), [])


def _verify(original: Path, separated: Path, dead: set[str], feeds, why_not: str | None, providers: Sequence[str],
            ) -> tuple[list[OnnxRun], str]:
    """Run both models on each provider and compare, unless a new node (``dead``) feeds no graph output.

    ``original`` and ``separated``: the paths of the two models' files. The CPU is always among
    the providers: it is what ``verified`` stands on.
    """
    names = list(dict.fromkeys(["CPUExecutionProvider", *(provider_name(p) for p in providers)]))
    if feeds is None:
        return [OnnxRun(n, False, reason=f"not run: {why_not}") for n in names], f"not run: {why_not}"
    if dead:
        reason = f"not proven: nodes {sorted(dead)} reach no graph output"
        return [OnnxRun(n, False, reason=reason) for n in names], reason
    runs = [_run_on(name, [original, separated], feeds) for name in names]
    shapes = ", ".join("x".join(map(str, f.shape)) for f in feeds)
    ran = [r.provider for r in runs if r.ran]
    return runs, f"ran in onnxruntime ({', '.join(ran) or 'nowhere'}) on inputs {shapes}; every new node feeds a graph output"


def _run_on(provider: str, paths: list[Path], feeds) -> OnnxRun:
    """Both models on one provider: their outputs compared, or why they could not run there."""
    reason = missing_reason(provider)
    if reason:
        return OnnxRun(provider, False, reason=reason)
    outputs = []
    for label, path in zip(("original", "separated"), paths):
        session = open_session(path, provider, lean=True)
        if session.get_providers()[0] != provider:
            return OnnxRun(provider, False, reason=f"onnxruntime could not load {provider} and fell back to the CPU")
        names = [i.name for i in session.get_inputs()]
        try:
            outputs.append(session.run(None, dict(zip(names, feeds))))
        except Exception as error:
            if label == "original":
                raise InvalidOptionError(f"the ONNX model does not run on the example inputs ({error}); check --input-shape") from None
            raise SeparationError(f"the separated ONNX model fails in onnxruntime ({error}); please report it") from None
        del session  # one session at a time: each holds a copy of the weights
        release_freed_memory()
    agreement = output_fidelity([torch.from_numpy(np.asarray(a)) for a in outputs[1]], [torch.from_numpy(np.asarray(b)) for b in outputs[0]])
    return OnnxRun(provider, True, agreement.max_abs_error, agreement.relative_error, fidelity=agreement)


def save_onnx(result: OnnxSeparation, path: str | os.PathLike) -> Path:
    """Write the separated model to ``path`` (external data beside it when over 2 GB)."""
    path = Path(path)
    write_proto(result.model, path)
    return path
