"""One separation of an ONNX model at one budget, proven in onnxruntime: the ONNX front end's single step.

Each ``Conv`` node (in the main graph or a subgraph) whose weight is a constant becomes two
``Conv`` nodes named after it: a depthwise one carrying the kernel, strides, dilations and
padding (``pads`` or ``auto_pad``), and a pointwise one carrying the groups and the bias, in
either order; a ``ConvTranspose`` node's depthwise half is a ``ConvTranspose`` keeping its
output padding too. The factors come from the same SVD as the PyTorch front end
(:func:`~convtool.core.decompose.separable_factors`). Every other node, initializer, input,
output, opset import and metadata entry is kept as it was.

Ranks are decided by the same planner as the PyTorch front end's, over this graph's
:class:`~convtool.onnx.dense.DenseGraph` (costs from the counts of a run,
:mod:`~convtool.onnx.counts`; errors read out of onnxruntime runs; layers timed as the nodes
written here); calibration refits with the same least squares (:mod:`~convtool.onnx.refit`), in
subgraphs too. Budgets that try several plans, and the public ``convtool.separate_onnx``, are
above (``convtool.search``). Not here (see docs/limitations.md): distillation, and BatchNorm
folding inside subgraphs.
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
from ..core.records import Benchmark, LayerChange, Search, SkippedLayer
from ..deploy.int8 import Int8Form
from ..errors import AnalysisError, InvalidOptionError, NothingToSeparateError, SeparationError
from ..measure.compare import Comparison
from ..measure.fidelity import Fidelity, output_fidelity
from ..measure.onnxrt import missing_reason, open_session, provider_name, release_freed_memory, require_provider, time_sessions
from ..plan.budget import Budget, make_plan
from ..plan.costing import Costing
from .counts import OnnxCounts, count_onnx, onnx_analysis
from .dense import DenseGraph, planning_batches
from .feeds import calibration_feeds, example_feeds, given_values, graph_inputs
from .files import load_onnx, passes_check, read_with_weights_beside, write_proto, write_with_weights_beside
from .graph import fold_batchnorm, install_pairs, live_nodes
from .refit import last_convs, refit_onnx
from .sites import find_sites, model_scopes

LAYOUTS = ("branches", "multiplier")


class Feeds(list):
    """Calibration data already as batches of feeds (one array per graph input, in the graph's order)."""


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
    """What :func:`~convtool.separate_onnx` did; its fields mean what :class:`~convtool.Separation`'s do.

    Attributes:
        model: the separated ``onnx.ModelProto``, checked by ``onnx.checker`` (with shape
            inference, the full check, whenever the original passes it).
        layers: one record per separated ``Conv`` node, named after the node.
        skipped: every ``Conv`` node left as it was, with why.
        verified: the separated model ran in onnxruntime (on the CPU provider at least) on the
            example inputs, every new node lies on a path to a graph output, and every separated
            layer's nodes ran (the dense node is gone from the graph): as for a PyTorch model,
            every layer is proven to run. Its outputs were compared with the original's
            (``max_abs_error``, ``relative_error``, the CPU run's).
        verification: how the claim was checked, or why it could not be; it names the separated
            layers the inputs did not run (``not_run``: in an ``If`` branch they did not take).
        budget_met, flops_before, flops_after: as for a PyTorch model; the whole graph's FLOPs.
        search: with a target met by measurement, how it was found (None otherwise).
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
    search: Search | None = None

    def original_model(self):
        """The model as given: the proto, or read again from its file (not held in memory meanwhile)."""
        return self.original if self.original is not None else load_onnx(self.source)

    def _feeds(self, example_inputs: Any) -> tuple[list[np.ndarray] | None, str | None]:
        """The inputs given, else those the separation ran on."""
        if example_inputs is None and self.feeds:
            return list(self.feeds), None
        return example_feeds(self.model, example_inputs)  # the separated graph takes the same inputs

    def report(self, example_inputs: Any = None) -> Comparison:
        """The before/after comparison of the whole graph on ``example_inputs`` (or the inputs it ran on).

        Counts on those inputs; output agreement from the CPU run. Raises InvalidOptionError
        without input shapes, or when the CPU run did not happen.
        """
        feeds, why_not = self._feeds(example_inputs)
        cpu = next((r for r in self.runs if r.provider == "CPUExecutionProvider" and r.ran), None)
        if feeds is None or cpu is None:
            raise InvalidOptionError(f"no report without a run on the CPU: {why_not or self.verification}")
        return Comparison(onnx_analysis(self.original_model(), feeds), onnx_analysis(self.model, feeds), self.layers, cpu.fidelity,
                          self.skipped, self.verified, search=self.search, not_refit=self.not_refit, counted=self.branches,
                          not_run=self.not_run)

    def timed(self, example_inputs: Any = None, runs: int = 20) -> Benchmark:
        """Both graphs on onnxruntime CPU (2 threads), interleaved, medians (:func:`time_onnx`)."""
        feeds, why_not = self._feeds(example_inputs)
        if feeds is None:
            raise InvalidOptionError(f"nothing to time on: {why_not}")
        with tempfile.TemporaryDirectory(prefix="convtool-onnx-time-") as tmp:
            separated = Path(tmp) / "separated.onnx"
            write_with_weights_beside(self.model, separated)
            return time_onnx(self.original_model, separated, feeds, runs)


def time_onnx(original: Callable[[], Any] | Path, separated: Path, feeds: Sequence[np.ndarray], runs: int = 20,
              provider: str = "cpu", threads: int | None = 2) -> Benchmark:
    """The original (its file, or its proto made by ``original()``) and the separated graph (a file, its weights
    beside it) on onnxruntime, interleaved, medians.

    The separated graph comes as a file so that a caller done with its proto (the CLI, once the
    output is written) can let it go first: the two full sessions timed side by side are then all
    the memory held.
    """
    from ..measure.onnxrt import timing_session

    name = require_provider(provider)
    with tempfile.TemporaryDirectory(prefix="convtool-onnx-time-") as tmp:
        if not isinstance(original, Path):
            path = Path(tmp) / "original.onnx"
            proto = original()
            write_with_weights_beside(proto, path)  # onnxruntime maps the weights: two sessions, one copy each
            del proto
            release_freed_memory()
            original = path
        sessions = [timing_session(p, name, threads) for p in (original, separated)]
        names = [i.name for i in sessions[0].get_inputs()]
        original_ms, separated_ms = time_sessions(sessions, dict(zip(names, feeds)), runs, warmup=3)
    return Benchmark(name, original_ms, separated_ms, runs, threads)


def check_options(order: str, layout: str, latency_provider: str | None) -> str | None:
    """The options checked before any work; onnxruntime's name of the latency provider (None without one)."""
    if order not in (*ORDERS, "auto"):
        raise InvalidOptionError(f"order must be one of {', '.join((*ORDERS, 'auto'))}; got {order!r}")
    if layout not in LAYOUTS:
        raise InvalidOptionError(f"layout must be 'branches' or 'multiplier'; got {layout!r}")
    return require_provider(latency_provider) if latency_provider is not None else None


@dataclass
class OnnxOriginal:
    """The model as given, read once for every separation of it: the file onnxruntime and the checker read
    (``file``, weights beside), the checks it passes, its example feeds and the counts of a run on them."""

    source: Path | None  # the file given, or None for a proto
    proto: Any  # the caller's proto (None when a file was given: read again from it when needed)
    file: Path
    checks: list[bool]
    feeds: list[np.ndarray] | None
    why_not: str | None  # why there are no feeds (or no counts)
    fixed: dict[str, np.ndarray]  # example inputs given as values, which calibration batches may lack
    counts: OnnxCounts | None
    inputs: Any  # a model holding only the graph's inputs that need values: their declarations, for calibration feeds

    def load(self) -> Any:
        """A working copy to rewrite: read from the file again, or a copy of the caller's proto (not modified)."""
        import onnx

        if self.proto is None:
            return load_onnx(self.source)
        work = onnx.ModelProto()
        work.CopyFrom(self.proto)
        return work

    def model(self) -> Any:
        """The original itself (read again from its file where it was given as one)."""
        return self.proto if self.proto is not None else load_onnx(self.source)


def read_original(model: Any, example_inputs: Any, calibration: Any, staging: Path) -> OnnxOriginal:
    """Read ``model`` (a path or a proto), stage its file, and count it on the example inputs (else the first calibration batch)."""
    import onnx

    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    proto = load_onnx(model)
    feeds, why_not = example_feeds(proto, example_inputs)
    fixed = given_values(proto, example_inputs)
    if feeds is None and example_inputs is None and calibration is not None:  # the first calibration batch, then
        feeds, why_not = _as_feeds(calibration, proto, fixed, None)[0], None
    # Written for onnx's checker and onnxruntime now, while the proto is at hand.
    file = staging / "original.onnx"
    write_with_weights_beside(proto, file)
    release_freed_memory()
    counts = None
    if feeds is not None:
        try:
            counts = count_onnx(proto, feeds)
        except AnalysisError as error:
            why_not = str(error)
    inputs = onnx.ModelProto()  # the inputs needing values alone: no weight, in initializers or Constant nodes
    inputs.graph.input.extend(graph_inputs(proto))
    return OnnxOriginal(source, proto if source is None else None, file, _checks_passed(file), feeds, why_not, fixed, counts, inputs)


def _as_feeds(calibration: Any, model: Any, fixed: dict, batch: int | None) -> list[list[np.ndarray]]:
    return list(calibration) if isinstance(calibration, Feeds) else calibration_feeds(calibration, model, fixed, batch)


def calibration_batches(original: OnnxOriginal, calibration: Any) -> list[list[np.ndarray]]:
    """Calibration data as batches of feeds for ``original``."""
    feeds = original.feeds
    return _as_feeds(calibration, original.inputs, original.fixed, feeds[0].shape[0] if feeds and feeds[0].ndim else None)


def separate_onnx_at(original: OnnxOriginal, budget: Budget, *, order: str, include: Sequence[str], exclude: Sequence[str],
                     calibration: Any, providers: Sequence[str], layout: str, fold_bn: bool, provider: str | None,
                     staging: Path, costing: Costing | None = None, shared: bool = False,
                     int8: Int8Form | None = None) -> tuple[OnnxSeparation, Costing]:
    """``original`` separated at one budget (its options checked by :func:`check_options`), and the costing planned from.

    ``provider``: onnxruntime's name of the provider layers are timed on (None: not timed);
    ``costing``: one a search filled, reused; ``shared``: the costing will serve other budgets;
    ``int8``: the form layers are quantized in before they are timed (None: fp32).
    """
    work = original.load()
    scopes = model_scopes(work)
    initializers = {init.name for init in work.graph.initializer}
    # Before IR 4 every initializer had to be listed as an input too: those are constants in practice.
    overridable = {i.name for i in work.graph.input} - (initializers if work.ir_version < 4 else set())
    sites, where, skipped = find_sites(scopes, overridable, include, exclude)
    if not sites:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "the graph has no Conv node"
        raise NothingToSeparateError(f"nothing to separate ({detail})")
    batches = calibration_batches(original, calibration) if calibration is not None else None
    view = DenseGraph(work, sites, where, original.counts, original.why_not, planning_batches(batches) if batches else None, provider, staging,
                      int8)
    plan, costing = make_plan(list(sites.values()), budget, order, view, costing, shared)
    del view
    skipped += [SkippedLayer(name, reason) for name, reason in plan.dense_reasons.items()]
    layers, outputs, created = install_pairs(work, scopes, where, sites, plan.picks, layout)
    if not layers:
        reason = next((s.reason for s in reversed(skipped)), "every conv stays dense")
        raise NothingToSeparateError(f"nothing to separate: every conv stays dense ({reason})")
    trails = {layer.name: where[layer.name].scope.trail for layer in layers}
    del scopes, sites, where  # their arrays of every weight: not needed past the rewrite (peak memory)
    release_freed_memory()
    not_refit: tuple[SkippedLayer, ...] = ()
    if batches is not None:
        lasts = last_convs(work.graph, {layer.name: outputs[layer.name][-1] for layer in layers}, trails)
        errors, kept = refit_onnx(original.model(), work, lasts, batches)
        del lasts  # its LastConv records hold the proto's nodes
        not_refit = tuple(SkippedLayer(layer.name, kept[layer.name]) for layer in layers if layer.name in kept)
        layers = [dataclasses.replace(layer, output_error=errors.get(layer.name)) for layer in layers]
    main = [layer for layer in layers if not trails[layer.name]]
    renamed = fold_batchnorm(work.graph, [outputs[layer.name] for layer in main], work.ir_version < 4) if fold_bn else {}
    work, runs, verification = _write_and_verify(original, work, created, providers, staging)
    result = OnnxSeparation(work, tuple(layers), tuple(skipped), False, verification, budget_met=plan.budget_met, runs=tuple(runs),
                            original=original.proto, folded_batchnorms=tuple(bn for bn, _ in renamed.values()), not_refit=not_refit,
                            feeds=tuple(original.feeds or ()), source=original.source)
    return _counted(result, original, outputs, trails, renamed), costing


def _write_and_verify(original: OnnxOriginal, work: Any, created: set[str], providers: Sequence[str], staging: Path):
    """Write the rewritten graph once, check and run it from the file, and read it back compact.

    The rewritten proto still holds every replaced weight (protobuf frees none of a message's
    memory while any part of it lives): it is dropped while onnxruntime runs, then read back from
    the file. Returns the compact proto, the runs and the verification.
    """
    import onnx

    written = staging / "separated.onnx"
    write_with_weights_beside(work, written, typed_lists=False)  # read back below: the same proto
    dead = created - live_nodes(work.graph)
    del work
    release_freed_memory()
    try:
        for full in original.checks:
            onnx.checker.check_model(str(written), full_check=full)
    except Exception as error:  # a bug of this pass, not the user's
        raise SeparationError(f"the separated ONNX model fails onnx.checker ({error}); please report it") from None
    runs, verification = _verify(original.file, written, dead, original.feeds, original.why_not, providers)
    return read_with_weights_beside(written), runs, verification


def _counted(result: OnnxSeparation, original: OnnxOriginal, outputs: dict[str, list[str]], trails: dict, renamed: dict) -> OnnxSeparation:
    """The result with each layer's FLOPs from the counts of both graphs, the layers the check did not run, and ``verified``."""
    cpu = next((r for r in result.runs if r.provider == "CPUExecutionProvider" and r.ran), None)
    ran = cpu is not None
    fields: dict[str, Any] = dict(max_abs_error=cpu.max_abs_error if cpu else None, relative_error=cpu.relative_error if cpu else None)
    counts = original.counts
    if counts is None:
        return dataclasses.replace(result, verified=ran, **fields)
    after = count_onnx(result.model, original.feeds)  # the original's shapes were inferred: the separated graph's are too
    folded = {y: value for y, (_, value) in renamed.items()}  # a folded layer's conv writes the BatchNorm's output
    key = lambda layer, value: (trails[layer.name], folded.get(value, value))  # noqa: E731
    layers = [_with_flops(layer, counts.nodes.get((trails[layer.name], outputs[layer.name][-1])),
                          [after.nodes.get(key(layer, v)) for v in outputs[layer.name]]) for layer in result.layers]
    # A pair in a branch the inputs did not take was separated but not run by the check: say which.
    unrun = tuple(layer.name for layer in layers if not after.runs.get(key(layer, outputs[layer.name][-1])))
    verification = result.verification
    if unrun and ran:
        verification += (f"; {len(unrun)} separated layers did not run on these inputs (in a branch they did not take) or"
                         f" could not be seen to, so they are not proven and their outputs were not compared: {', '.join(unrun)}")
    return dataclasses.replace(result, layers=tuple(layers), verified=ran and not unrun, verification=verification, not_run=unrun,
                               flops_before=counts.flops, flops_after=after.flops, branches=counts.branches, **fields)


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
