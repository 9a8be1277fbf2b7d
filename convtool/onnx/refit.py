"""Calibration for models given as ONNX: each separated node pair's last conv refit on data, in onnxruntime.

The same least squares as the PyTorch path (:class:`~convtool.recovery.equations.NormalEquations`
over :func:`~convtool.recovery.equations.columns`): the original graph runs once per batch with
every separated conv's output read out as an extra output (the targets; a conv in an ``If``
branch or a ``Loop`` body included, :mod:`~convtool.onnx.probes`, on the batches where its
graph runs); then, layer by layer in execution order, the separated graph runs with that
layer's last conv's input read out and the already-refit weights fed in (its weights are
graph inputs with the initializers as defaults), so later layers see the activations of refit
earlier ones, as in the PyTorch path. A last conv that is a ``ConvTranspose`` is fitted as the
stride-1 conv of its spread input, as there. As in the PyTorch path, a quarter of the data is
held out to judge how far the least squares are shrunk towards the SVD initialisation
(:func:`~convtool.recovery.equations.fitted`), then they are solved on all of it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.modules import SamePadded
from ..core.names import describe_error
from ..errors import ConvtoolError, InvalidOptionError
from ..measure.onnxrt import open_session
from ..recovery.equations import NormalEquations, add_held_out, as_solution, columns, conv_layout, fitted, from_solution, spread
from .counts import node_attributes
from .files import write_proto
from .probes import Probe, Trail, exposed, in_order, quiet_run, samples


@dataclass(frozen=True)
class LastConv:
    """What the refit needs of one separated layer: its last conv node and the dense output it must match."""

    layer: str
    node: Any  # the onnx NodeProto of the pair's last conv
    target: str  # the dense conv's output value, written by the pair's last conv in the separated graph
    trail: Trail = ()  # where the graph holding both lies (:mod:`~convtool.onnx.probes`): () for the main graph


def last_convs(graph, outputs: dict[str, str], trails: dict[str, Trail]) -> list[LastConv]:
    """Per layer, the node writing its output (``outputs``) in the graph its trail leads to; in execution order."""
    wanted = {(trails[layer], value): layer for layer, value in outputs.items()}
    found = []
    for node, trail in in_order(graph):
        layer = wanted.get((trail, node.output[0])) if node.output else None
        if layer is not None:
            found.append(LastConv(layer, node, node.output[0], trail))
    return found


def refit_onnx(original, separated, lasts: Sequence[LastConv], batches: Sequence[list[np.ndarray]],
               ) -> tuple[dict[str, float | None], dict[str, str]]:
    """Refit every layer's last conv of ``separated`` (changed in place) on ``batches``, in the order given
    (execution order): per layer, the error left, and per layer left as it was, why.

    The error is ``||y - y_dense|| / ||y_dense||`` of the layer's output on the data, the inputs
    as the refit pass met them. A layer in a branch no batch took, or in a graph its values
    cannot be read out of, keeps its SVD factors.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in separated.graph.initializer}
    why_not: dict[str, str] = {}
    for last in lasts:
        reason = _geometry_reason(last.node)
        if reason:
            why_not[last.layer] = reason
    lasts = [last for last in lasts if last.layer not in why_not]
    if not lasts:  # nothing to fit: the data need not run
        return {}, why_not
    probe = lambda last, value: Probe(value, last.trail, inits[last.node.input[1]].data_type, len(inits[last.node.input[1]].dims))  # noqa: E731
    errors: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="convtool-onnx-refit-") as tmp:
        targets, failed = _reference(original, {last.layer: probe(last, last.target) for last in lasts}, batches, Path(tmp))
        why_not |= failed
        for last in lasts:
            if last.layer not in why_not and all(t.get(last.layer) is None for t in targets):
                why_not[last.layer] = "its branch did not run on the calibration data" if last.trail else "its output never came out of the runs"
        lasts = [last for last in lasts if last.layer not in why_not]
        weights = [name for last in lasts for name in last.node.input[1:] if name]
        current = {name: numpy_helper.to_array(inits[name]) for name in weights}
        for number, last in enumerate(lasts):
            reading = probe(last, last.node.input[0])
            model, carried, _ = exposed(separated, [reading], overridable=weights)  # its target came out: so will its input
            try:
                session = None
                session = _session(model, Path(tmp) / f"{number}.onnx")
                del model
                errors[last.layer] = _refit_layer(session, last, carried[reading], reading.rank, batches,
                                                  [t.get(last.layer) for t in targets], current)
            except _RunFailed as error:
                why_not[last.layer] = str(error)
                continue
            finally:
                del session
            if errors[last.layer] is None:
                why_not[last.layer] = "its input never came out of the runs"
    for name, value in current.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(inits[name]).dtype), name))
    return {layer: error for layer, error in errors.items() if layer not in why_not}, why_not


class _RunFailed(Exception):
    """onnxruntime could not run a graph with a subgraph's value passed out of it."""

    def __init__(self, message: str, refused: ConvtoolError | None = None):
        super().__init__(message)
        self.refused = refused  # onnxruntime's refusal to load it: the user's own to see where no subgraph is involved


def _reference(original, probes: dict[str, Probe], batches, tmp: Path) -> tuple[list[dict[str, np.ndarray | None]], dict[str, str]]:
    """The dense convs' outputs per batch (per layer, samples of the value's rank; None where it did not run),
    and the layers whose outputs could not be read out, with why.

    Read all at once; where that fails (a loop whose iterations take different branches gives a
    scan output of changing shape), the main graph's alone.
    """
    try:
        return _run_probes(original, probes, batches, tmp)
    except _RunFailed as error:
        inner = [layer for layer, p in probes.items() if p.trail]
        if not inner:
            _raise_plain(error)
        main = {layer: p for layer, p in probes.items() if not p.trail}
        try:
            targets, failed = _run_probes(original, main, batches, tmp) if main else ([{} for _ in batches], {})
        except _RunFailed as again:
            _raise_plain(again)
        return targets, failed | {layer: f"its dense output could not be read out of the subgraph ({error})" for layer in inner}


def _raise_plain(error: _RunFailed):
    """The error a run of the main graph alone gives the user (no subgraph value was passed out)."""
    if error.refused is not None:
        raise error.refused from None
    raise InvalidOptionError(f"the ONNX model does not run on the calibration data ({error}); check its shapes") from None


def _run_probes(model, probes: dict[str, Probe], batches, tmp: Path) -> tuple[list[dict[str, np.ndarray | None]], dict[str, str]]:
    copy, carried, refused = exposed(model, list(probes.values()))
    session = _session(copy, tmp / "reference.onnx")
    names = [o.name for o in session.get_outputs()]
    targets = []
    for batch in batches:
        try:
            values = dict(zip(names, session.run(None, _feed(session, batch), quiet_run())))
        except Exception as error:
            raise _RunFailed(f"onnxruntime: {describe_error(error)}") from None
        targets.append({layer: samples(values[carried[p]], p.rank) for layer, p in probes.items() if p in carried})
    return targets, {layer: refused[p] for layer, p in probes.items() if p in refused}


def _refit_layer(session, last: LastConv, reading: str, rank: int, batches, targets, current: dict[str, np.ndarray]) -> float | None:
    """Refit one layer's last conv on the batches where its values came out; None when they never did."""
    weight_name = last.node.input[1]
    bias_name = last.node.input[2] if len(last.node.input) > 2 and last.node.input[2] else None
    transposed = last.node.op_type == "ConvTranspose"
    attrs = node_attributes(last.node)
    groups = int(attrs.get("group", 1))
    weight = current[weight_name]
    layout = conv_layout(torch.from_numpy(np.array(weight, dtype=np.float64)), groups, transposed)
    fit, held = NormalEquations(1 if bias_name else 0), NormalEquations(1 if bias_name else 0)
    names = [o.name for o in session.get_outputs()]
    # onnxruntime lists initializers that are also inputs apart from the inputs it requires
    overridable = {i.name for i in session.get_overridable_initializers()}
    used = 0
    for batch, target in zip(batches, targets):
        feed = _feed(session, batch) | {n: v for n, v in current.items() if n in overridable}
        try:
            x = samples(dict(zip(names, session.run(None, feed, quiet_run())))[reading], rank)
        except Exception as error:
            raise _RunFailed(f"its input could not be read out of the subgraph (onnxruntime: {describe_error(error)})") from None
        if x is None or target is None:  # a branch this batch did not take
            continue
        used += 1
        call = _call(torch.from_numpy(x), layout, attrs, transposed)
        add_held_out(fit, held, columns(call), torch.from_numpy(target), 0 if bias_name else None, used)
    if not used:
        return None
    initial = as_solution(layout, [torch.from_numpy(np.array(current[bias_name], dtype=np.float64))] if bias_name else [], groups)
    solution, strength = fitted(fit, held, initial)
    with fit.including(held) as every:
        error = every.relative_error(solution)
    if strength is None:  # the initialisation kept
        return error
    new_weight, new_biases = from_solution(solution, layout.shape, 1 if bias_name else 0)
    current[weight_name] = conv_layout(new_weight, groups, transposed).numpy().astype(weight.dtype)
    if bias_name:
        current[bias_name] = new_biases[0].numpy().astype(current[bias_name].dtype)
    return error


def _geometry_reason(node) -> str | None:
    """Why a transposed last conv's padding cannot be read off its attributes (then it is not refit)."""
    attrs = node_attributes(node)
    if node.op_type == "ConvTranspose" and ("output_shape" in attrs or _auto_pad(attrs) not in ("NOTSET", "VALID")):
        return "its last conv is a ConvTranspose sized by output_shape or auto_pad: its SVD factors stay"
    return None


def _call(x: torch.Tensor, layout: torch.Tensor, attrs: dict, transposed: bool) -> dict[str, Any]:
    """A conv call (as :func:`columns` takes it) for an ONNX Conv's input, ``layout`` its weight as a conv's:
    its padding applied to ``x`` first; a ConvTranspose's input spread by its strides first, its
    padding read as the equivalent conv's (what the kernel overhangs, less the pads, plus the output padding)."""
    kernel = list(layout.shape[2:])
    dims = len(kernel)
    strides = list(attrs.get("strides", [1] * dims))
    dilations = list(attrs.get("dilations", [1] * dims))
    pads = input_pads(attrs, list(x.shape[2:]), kernel, strides, dilations)  # F.pad's order: last dimension first, begin then end
    if transposed:  # explicit pads (or VALID): output_shape and SAME are not refit (_geometry_reason)
        x = spread(x, strides)
        extra = list(attrs.get("output_padding", [0] * dims))
        dim = lambda j: dims - 1 - j // 2  # noqa: E731 - the dimension F.pad's j-th entry pads
        pads = [dilations[dim(j)] * (kernel[dim(j)] - 1) - p + (extra[dim(j)] if j % 2 else 0) for j, p in enumerate(pads)]
        strides = [1] * dims
    if any(pads):
        x = F.pad(x, pads)  # negative pads crop
    return dict(input=x, weight=torch.empty(layout.shape, dtype=torch.float64), stride=tuple(strides), padding=0,
                dilation=tuple(dilations), groups=int(attrs.get("group", 1)))


def input_pads(attrs: dict, size: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """An ONNX Conv's padding as ``F.pad``'s argument (last dimension first)."""
    auto = _auto_pad(attrs)
    dims = len(kernel)
    if auto in ("SAME_UPPER", "SAME_LOWER"):  # TensorFlow's SAME: the odd pixel after (UPPER) or before (LOWER)
        pads = SamePadded.padding_for(size, kernel, strides, dilations)
        return pads if auto == "SAME_UPPER" else [p for i in range(0, len(pads), 2) for p in (pads[i + 1], pads[i])]
    if auto == "VALID":
        begins, ends = [0] * dims, [0] * dims
    else:
        pads = list(attrs.get("pads", [0] * (2 * dims)))
        begins, ends = pads[:dims], pads[dims:]
    return [p for b, e in reversed(list(zip(begins, ends))) for p in (b, e)]


def _auto_pad(attrs: dict) -> str:
    auto = attrs.get("auto_pad", b"NOTSET")
    return auto.decode() if isinstance(auto, bytes) else auto


def _session(model, path: Path):
    """A session on ``model`` with values passed out of its subgraphs; _RunFailed where onnxruntime refuses
    the graph (an ``If`` of opset < 11 whose branches give one output of different shapes, say)."""
    write_proto(model, path)
    try:
        return open_session(path, "CPUExecutionProvider")
    except ConvtoolError as error:
        raise _RunFailed(f"onnxruntime cannot load the graph with it passed out: {describe_error(error.__cause__ or error)}", error) from None


def _feed(session, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return dict(zip(names, batch))
