"""``separate_onnx``: separate the convs of a model held only as ONNX, and prove the result in onnxruntime.

Each top-level ``Conv`` node whose weight is a constant initializer becomes two ``Conv`` nodes
named after it: a depthwise one carrying the kernel, strides, dilations and padding (``pads``
or ``auto_pad``), and a pointwise one carrying the groups and the bias, in either order. The
factors come from the same SVD as the torch path (:func:`~convtool.core.decompose.separable_factors`).
Every other node, initializer, input, output, opset import and metadata entry is kept as it was.

Not yet here (see README, Limitations): FLOP targets, calibration, the runtime form (BatchNorm
folding, branches) and external-data output.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core.decompose import ORDERS, max_rank, separable_factors
from ..core.records import Energy, LayerChange, Rank, SkippedLayer, check_rank
from ..errors import InvalidOptionError, NothingToSeparateError, OnnxFileError, SeparationError
from ..measure.onnxrt import open_session
from .plan import energy_rank
from .sites import pattern_reason


@dataclass(frozen=True)
class OnnxSeparation:
    """What :func:`separate_onnx` did.

    Attributes:
        model: the separated ``onnx.ModelProto``, checked by ``onnx.checker`` (with shape
            inference, the full check, whenever the original passes it).
        layers: one record per separated ``Conv`` node, named after the node.
        skipped: every ``Conv`` node left as it was, with why.
        verified: the separated model ran in onnxruntime (CPU) on the example inputs, every new
            node lies on a path to a graph output, and its outputs were compared with the
            original's (``max_abs_error``, ``relative_error``).
        verification: how the claim was checked, or why it could not be.
    """

    model: Any = field(repr=False)
    layers: tuple[LayerChange, ...]
    skipped: tuple[SkippedLayer, ...]
    verified: bool = False
    verification: str = ""
    max_abs_error: float | None = None
    relative_error: float | None = None


def separate_onnx(
    model: Any,
    example_inputs: Any = None,
    *,
    rank: Rank = 1,
    order: str = "dw-pw",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> OnnxSeparation:
    """Replace every standard ``Conv`` node of an ONNX model by a depthwise-separable pair, and check it.

    Args:
        model: a path to a ``.onnx`` file, or an ``onnx.ModelProto`` (not modified).
        example_inputs: tensors or arrays for the graph's inputs, in order; without them, inputs
            of the graph's static shapes (a dynamic dimension needs example inputs).
        rank: a positive int, ``"full"`` (exact) or :class:`~convtool.Energy`.
        order: ``"dw-pw"`` or ``"pw-dw"``.
        include, exclude: glob patterns on node names, as in :func:`~convtool.separate`.

    Raises:
        OnnxFileError: the file is not a valid ONNX model.
        InvalidOptionError: an option this path does not take (a FLOP target), or inputs that do
            not fit the graph.
        NothingToSeparateError: no ``Conv`` node can be separated.
        SeparationError: the separated model does not run in onnxruntime.
    """
    import onnx

    rank = check_rank(rank)
    if not isinstance(rank, (int, str, Energy)):
        raise InvalidOptionError("ONNX input takes a fixed rank, 'full' or an energy for now; a FLOP target needs a PyTorch model")
    if order not in ORDERS:
        raise InvalidOptionError(f"order must be one of {', '.join(ORDERS)} for ONNX input; got {order!r}")
    original = _load(model)
    # The result is held to what the original meets: the full check, the plain one, or (for a
    # file onnxruntime runs but the checker refuses) onnxruntime alone.
    checks = [full for full in (True, False) if _passes_check(original, full)][:1]
    work = onnx.ModelProto()
    work.CopyFrom(original)
    graph = work.graph
    constants = {init.name: init for init in graph.initializer}
    # Before IR 4 every initializer had to be listed as an input too: those are constants in practice.
    overridable = {i.name for i in graph.input} - (set(constants) if work.ir_version < 4 else set())
    skipped: list[SkippedLayer] = [SkippedLayer(name, "a Conv inside a subgraph (If/Loop/Scan): left as it is")
                                   for name in _subgraph_convs(graph)]
    layers: list[LayerChange] = []
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    values: list[tuple[str, str]] = []
    created: set[str] = set()
    used_names = {n.name for n in graph.node} | set(constants) | {v for n in graph.node for v in (*n.input, *n.output)}
    for node in graph.node:
        if node.op_type == "ConvTranspose":
            skipped.append(SkippedLayer(node.name or node.output[0], "ConvTranspose nodes are not separated from ONNX yet (they are from PyTorch)"))
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        name = node.name or node.output[0]
        reason = _reason(node, name, constants, overridable, include, exclude)
        if reason:
            skipped.append(SkippedLayer(name, reason))
            new_nodes.append(node)
            continue
        pair, inits, record = _pair(node, name, constants, rank, order, used_names)
        new_nodes += pair
        new_inits += inits
        values.append((pair[0].output[0], pair[1].output[0]))
        created |= {n.name for n in pair}
        layers.append(record)
    if not layers:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "the graph has no Conv node"
        raise NothingToSeparateError(f"nothing to separate ({detail})")
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    if work.ir_version < 4:  # then every initializer is listed as an input too
        graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in new_inits)
    _drop_replaced_weights(graph, {n.input[1] for n in original.graph.node if n.op_type == "Conv" and len(n.input) > 1}
                           - {n.input[1] for n in graph.node if n.op_type == "Conv" and len(n.input) > 1})
    try:
        for full in checks:
            onnx.checker.check_model(work, full_check=full)
    except Exception as error:  # a bug of this pass, not the user's
        raise SeparationError(f"the separated ONNX model fails onnx.checker ({error}); please report it") from None
    verified, verification, max_abs, relative = _verify(original, work, example_inputs, created)
    feeds, _ = _inputs(original, example_inputs)
    if feeds is not None:
        layers = _with_flops(layers, values, original, work, feeds)
    return OnnxSeparation(work, tuple(layers), tuple(skipped), verified, verification, max_abs, relative)


def _with_flops(layers: list[LayerChange], values: list[tuple[str, str]], original, separated, feeds: list[np.ndarray]) -> list[LayerChange]:
    """Each layer's multiply-adds before and after, counted as fvcore counts a conv, from inferred shapes.

    ``values``: per layer, the names of its pair's first and second outputs (the second is the dense conv's).
    """
    before, after = _conv_flops(original, feeds), _conv_flops(separated, feeds)
    found = []
    for layer, (middle, output) in zip(layers, values):
        pair = [after.get(middle), after.get(output)]
        dense = before.get(output)
        if dense is None or None in pair:
            found.append(layer)
            continue
        found.append(dataclasses.replace(layer, flops_before=dense, flops_after=sum(pair), calls=1))
    return found


def _conv_flops(model, feeds: list[np.ndarray]) -> dict[str, int]:
    """Per Conv node, by its output's name: output elements x input channels per group x kernel size."""
    import onnx

    shaped = onnx.ModelProto()
    shaped.CopyFrom(model)
    constants = {i.name for i in shaped.graph.initializer}
    graph_inputs = [i for i in shaped.graph.input if i.name not in constants]
    for value, feed in zip(graph_inputs, feeds):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in feed.shape:
            dims.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception:  # counts are a report's figures: without shapes there are none
        return {}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    weights = {i.name: tuple(i.dims) for i in inferred.graph.initializer}
    flops = {}
    for node in inferred.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type != "Conv" or not out or 0 in out or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        flops[node.output[0]] = math.prod(out) * math.prod(w[1:])
    return flops


def _load(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise OnnxFileError(f"{path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as error:
        raise OnnxFileError(f"{path} is not a valid ONNX model ({type(error).__name__}: {error})") from None


def _passes_check(model, full: bool) -> bool:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=full)
    except Exception:
        return False
    return True


def _subgraph_convs(graph) -> list[str]:
    found = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found += [n.name or n.output[0] for n in sub.node if n.op_type == "Conv"] + _subgraph_convs(sub)
    return found


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _reason(node, name: str, constants: dict, overridable: set[str], include, exclude) -> str | None:
    weight = node.input[1] if len(node.input) > 1 else ""
    bias = node.input[2] if len(node.input) > 2 else ""
    if weight not in constants:
        return "its weight is computed in the graph (DequantizeLinear, a graph input...): only constant weights are separated"
    if weight in overridable or (bias and bias in overridable):
        return "its weight or bias is also a graph input, so it can change at run time: left as it is"
    if bias and bias not in constants:
        return "its bias is computed in the graph: left as it is"
    shape = tuple(constants[weight].dims)
    group = int(_attrs(node).get("group", 1))
    if len(shape) not in (3, 4, 5):
        return f"a Conv of {len(shape) - 2} spatial dimensions: 1 to 3 are separated"
    if constants[weight].data_type not in (1, 10, 11):  # float, float16, double
        return "its weight is not a float tensor"
    from .sites import shape_reason

    return pattern_reason([name], include, exclude) or shape_reason(shape, group)


def _pair(node, name: str, constants: dict, rank: Rank, order: str, used: set[str]):
    """The two nodes standing in for ``node``, their initializers, and the layer's record."""
    from onnx import helper, numpy_helper

    attrs = _attrs(node)
    w = numpy_helper.to_array(constants[node.input[1]])
    weight = torch.from_numpy(np.array(w, copy=True))
    groups = int(attrs.get("group", 1))
    n, m_g, *kernel = weight.shape
    m = m_g * groups
    if isinstance(rank, Energy):
        r = energy_rank(weight, groups, order, rank.share)
    else:
        r = max_rank(weight, groups, order) if rank == "full" else min(int(rank), max_rank(weight, groups, order))
    factors = separable_factors(weight, r, groups, order)
    spatial_name, mixing_name, middle = (_fresh(f"{name}/{part}", used) for part in ("depthwise.weight", "pointwise.weight", "separable"))
    graph_inits = [numpy_helper.from_array(factors.spatial.numpy().astype(w.dtype), spatial_name),
                   numpy_helper.from_array(factors.mixing.numpy().astype(w.dtype), mixing_name)]
    spatial_attrs = {k: v for k, v in attrs.items() if k in ("kernel_shape", "strides", "dilations", "pads", "auto_pad")}
    spatial_attrs["kernel_shape"] = list(kernel)
    ones = [1] * len(kernel)
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    x, y = node.input[0], node.output[0]
    dw_name, pw_name = _fresh(f"{name}/depthwise", used), _fresh(f"{name}/pointwise", used)
    if order == "dw-pw":
        first = helper.make_node("Conv", [x, spatial_name], [middle], name=dw_name, group=m, **spatial_attrs)
        second = helper.make_node("Conv", [middle, mixing_name, *bias], [y], name=pw_name, group=groups, kernel_shape=ones)
    else:
        first = helper.make_node("Conv", [x, mixing_name], [middle], name=pw_name, group=groups, kernel_shape=ones)
        second = helper.make_node("Conv", [middle, spatial_name, *bias], [y], name=dw_name, group=n, **spatial_attrs)
    strides = tuple(attrs.get("strides", ones))
    params_after = factors.spatial.numel() + factors.mixing.numel() + (n if bias else 0)
    record = LayerChange(
        name=name, aliases=(), source="onnx", in_channels=m, out_channels=n, kernel_size=tuple(kernel), stride=strides,
        groups=groups, rank=factors.rank, order=order, params_before=math.prod(w.shape) + (n if bias else 0),
        params_after=params_after, flops_before=None, flops_after=None, calls=None, weight_error=factors.weight_error,
    )
    return [first, second], graph_inits, record


def _fresh(base: str, used: set[str]) -> str:
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def _drop_replaced_weights(graph, replaced: set[str]) -> None:
    """Remove the dense weights of separated convs that nothing else reads, at any depth (and their input entries)."""
    doomed = replaced - _read_anywhere(graph) - {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name not in doomed]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in doomed]
    del graph.input[:]
    graph.input.extend(inputs)


def _read_anywhere(graph) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs (any depth) reads."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                read |= _read_anywhere(sub)
    return read


def _inputs(model, example_inputs: Any) -> tuple[list[np.ndarray] | None, str | None]:
    """The feeds for the graph's inputs (those that are not initializers), or why there are none."""
    from onnx import helper

    constants = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in constants]
    if example_inputs is not None:
        given = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in given]
        arrays = [a.astype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type), copy=False)
                  if i.type.tensor_type.elem_type else a for a, i in zip(arrays, graph_inputs)]
        if len(arrays) != len(graph_inputs):
            raise InvalidOptionError(f"the ONNX model takes {len(graph_inputs)} inputs but {len(arrays)} were given; check --input-shape")
        return arrays, None
    rng = np.random.default_rng(0)
    arrays = []
    for i in graph_inputs:
        dims = i.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            return None, f"input {i.name!r} has a dynamic dimension; pass example inputs (--input-shape)"
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        arrays.append(rng.standard_normal([d.dim_value for d in dims]).astype(dtype))
    return arrays, None


def _verify(original, separated, example_inputs: Any, created: set[str]) -> tuple[bool, str, float | None, float | None]:
    """Run both models in onnxruntime CPU and compare; check every new node feeds a graph output."""
    feeds, why_not = _inputs(original, example_inputs)
    if feeds is None:
        return False, f"not run: {why_not}", None, None
    dead = created - _live_nodes(separated.graph)
    if dead:
        return False, f"not proven: nodes {sorted(dead)} reach no graph output", None, None
    with tempfile.TemporaryDirectory(prefix="convtool-onnx-") as tmp:
        outputs = []
        for label, proto in (("original", original), ("separated", separated)):
            path = Path(tmp) / f"{label}.onnx"
            _save(proto, path)
            session = open_session(path, "CPUExecutionProvider")
            names = [i.name for i in session.get_inputs()]
            try:
                outputs.append(session.run(None, dict(zip(names, feeds))))
            except Exception as error:
                if label == "original":
                    raise InvalidOptionError(f"the ONNX model does not run on the example inputs ({error}); check --input-shape") from None
                raise SeparationError(f"the separated ONNX model fails in onnxruntime ({error}); please report it") from None
            del session  # one session at a time: each holds a copy of the weights
    diffs = [np.abs(a.astype(np.float64) - b.astype(np.float64)) for a, b in zip(*outputs)]
    max_abs = max(float(d.max()) if d.size else 0.0 for d in diffs)
    norm = math.sqrt(sum(float(np.square(b.astype(np.float64)).sum()) for b in outputs[0]))
    relative = math.sqrt(sum(float(np.square(d).sum()) for d in diffs)) / norm if norm else 0.0
    shapes = ", ".join("x".join(map(str, f.shape)) for f in feeds)
    return True, f"ran in onnxruntime CPU on inputs {shapes}; every new node feeds a graph output", max_abs, relative


def _live_nodes(graph) -> set[str]:
    """Names of the nodes on a path to a graph output."""
    producer = {o: node for node in graph.node for o in node.output}
    live, stack = set(), [o.name for o in graph.output]
    seen: set[str] = set()
    while stack:
        value = stack.pop()
        node = producer.get(value)
        if node is None or value in seen:
            continue
        seen.add(value)
        live.add(node.name)
        stack += list(node.input)
    return live


def _save(model, path: Path) -> None:
    """Write ``model``; over 2 GB, its tensors go to a data file beside it (protobuf's limit)."""
    import onnx

    large = model.ByteSize() > 2_000_000_000 if hasattr(model, "ByteSize") else False
    onnx.save(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)


def save_onnx(result: OnnxSeparation, path: str | os.PathLike) -> Path:
    """Write the separated model to ``path`` (external data beside it when over 2 GB)."""
    path = Path(path)
    _save(result.model, path)
    return path
