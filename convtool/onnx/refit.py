"""Calibration for models given as ONNX: each separated node pair's last conv refit on data, in onnxruntime.

The same least squares as the PyTorch path (:class:`~convtool.recovery.equations.NormalEquations`
over :func:`~convtool.recovery.equations.columns`): the original graph runs once per batch with
every separated conv's output exposed as an extra graph output (the targets); then, layer by
layer in execution order, the separated graph runs with that layer's last conv's input exposed
and the already-refit weights fed in (its weights are graph inputs with the initializers as
defaults), so later layers see the activations of refit earlier ones, as in the PyTorch path.
As in the PyTorch path, a quarter of the data is held out to judge how far the least squares
are shrunk towards the SVD initialisation (:func:`~convtool.recovery.equations.fitted`), then
they are solved on all of it.
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
from ..measure.onnxrt import open_session
from ..recovery.equations import NormalEquations, add_held_out, as_solution, columns, fitted, from_solution
from .counts import node_attributes
from .files import write_proto


@dataclass(frozen=True)
class LastConv:
    """What the refit needs of one separated layer: its last conv node and the dense output it must match."""

    layer: str
    node: Any  # the onnx NodeProto of the pair's last conv
    target: str  # the dense conv's output value, written by the pair's last conv in the separated graph


def refit_onnx(original, separated, lasts: Sequence[LastConv], batches: Sequence[list[np.ndarray]]) -> dict[str, float | None]:
    """Refit every layer's last conv of ``separated`` (changed in place) on ``batches``; per layer, the error left.

    The error is ``||y - y_dense|| / ||y_dense||`` of the layer's output on the data, the inputs
    as the refit pass met them; None for a layer whose output never came out of the runs.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in separated.graph.initializer}
    with tempfile.TemporaryDirectory(prefix="convtool-onnx-refit-") as tmp:
        reference = _session(_exposed(original, [last.target for last in lasts]), Path(tmp) / "reference.onnx")
        targets = [dict(zip([o.name for o in reference.get_outputs()], reference.run(None, _feed(reference, b)))) for b in batches]
        del reference
        weights = [name for last in lasts for name in last.node.input[1:] if name]
        current = {name: numpy_helper.to_array(inits[name]) for name in weights}
        errors: dict[str, float | None] = {}
        for last in lasts:
            session = _session(_exposed(separated, [last.node.input[0]], overridable=weights), Path(tmp) / f"{len(errors)}.onnx")
            errors[last.layer] = _refit_layer(session, last, batches, targets, current)
            del session
    for name, value in current.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(inits[name]).dtype), name))
    return errors


def _refit_layer(session, last: LastConv, batches, targets, current: dict[str, np.ndarray]) -> float | None:
    weight_name = last.node.input[1]
    bias_name = last.node.input[2] if len(last.node.input) > 2 and last.node.input[2] else None
    weight = current[weight_name]
    attrs = node_attributes(last.node)
    fit, held = NormalEquations(1 if bias_name else 0), NormalEquations(1 if bias_name else 0)
    names = [o.name for o in session.get_outputs()]
    # onnxruntime lists initializers that are also inputs apart from the inputs it requires
    overridable = {i.name for i in session.get_overridable_initializers()}
    for number, (batch, target) in enumerate(zip(batches, targets), 1):
        if last.target not in target:
            return None
        feed = _feed(session, batch) | {n: v for n, v in current.items() if n in overridable}
        x = torch.from_numpy(dict(zip(names, session.run(None, feed)))[last.node.input[0]])
        call = _call(x, weight, attrs)
        add_held_out(fit, held, columns(call), torch.from_numpy(target[last.target]), 0 if bias_name else None, number)
    as_torch = lambda a: torch.from_numpy(np.array(a, dtype=np.float64))  # noqa: E731
    initial = as_solution(as_torch(weight), [as_torch(current[bias_name])] if bias_name else [], call["groups"])
    solution, strength = fitted(fit, held, initial)
    with fit.including(held) as every:
        error = every.relative_error(solution)
    if strength is None:  # the initialisation kept
        return error
    new_weight, new_biases = from_solution(solution, weight.shape, 1 if bias_name else 0)
    current[weight_name] = new_weight.numpy().astype(weight.dtype)
    if bias_name:
        current[bias_name] = new_biases[0].numpy().astype(current[bias_name].dtype)
    return error


def _call(x: torch.Tensor, weight: np.ndarray, attrs: dict) -> dict[str, Any]:
    """A conv call (as :func:`columns` takes it) for an ONNX Conv's input: its padding applied to ``x`` first."""
    kernel = list(weight.shape[2:])
    dims = len(kernel)
    strides = list(attrs.get("strides", [1] * dims))
    dilations = list(attrs.get("dilations", [1] * dims))
    pads = _pads(attrs, list(x.shape[2:]), kernel, strides, dilations)
    if any(pads):
        x = F.pad(x, pads)
    return dict(input=x, weight=torch.empty(weight.shape, dtype=torch.float64), stride=tuple(strides), padding=0,
                dilation=tuple(dilations), groups=int(attrs.get("group", 1)))


def _pads(attrs: dict, size: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """An ONNX Conv's padding as ``F.pad``'s argument (last dimension first)."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
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


def _exposed(model, values: Sequence[str], overridable: Sequence[str] = ()):
    """A copy of ``model`` with ``values`` as extra outputs and the initializers ``overridable`` as inputs too."""
    import onnx
    from onnx import helper

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    graph = exposed.graph
    have = {o.name for o in graph.output}
    graph.output.extend(helper.make_empty_tensor_value_info(v) for v in dict.fromkeys(values) if v not in have)
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name in overridable and init.name not in inputs:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    if exposed.ir_version < 4:
        exposed.ir_version = 4  # initializers outside the inputs need IR 4; nothing else here depends on it
    return exposed


def _session(model, path: Path):
    write_proto(model, path)
    return open_session(path, "CPUExecutionProvider")


def _feed(session, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return dict(zip(names, batch))
