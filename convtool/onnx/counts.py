"""Parameters and multiply-adds of an ONNX graph, counted by fvcore's rules, from the shapes onnx infers.

So that a model given as ONNX gets the same figures a PyTorch user gets from
:func:`~convtool.analyze`: a conv counts (output elements) x (input channels per group) x K
(a transposed conv: input elements x output channels per group x K), a matrix product
M x K x N, a BatchNormalization 2 per element (eval, affine), the other normalisations 5 per
element, a linear resize 4 per output element and a nearest one 1, a global average pool (and
a ReduceMean keeping dims over every spatial axis, which is how torch exports an adaptive pool
to 1) 1 per input element. Other ops count zero, as fvcore counts them; a ``x.mean((2, 3))``
without ``keepdim`` counts zero as fvcore counts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import AnalysisError
from .files import copy_fields


@dataclass(frozen=True)
class OnnxCounts:
    """Per node (keyed by its first output's name) and in total; shapes per value name."""

    flops: int
    params: int
    nodes: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)  # per node (first output), times it ran: 0 in a branch not taken
    branches: tuple[str, ...] = ()  # which branch of each If, and how many Loop/Scan iterations, were counted


def count_onnx(model: Any, feeds: Sequence[np.ndarray]) -> OnnxCounts:
    """fvcore-style counts of ``model`` (an ``onnx.ModelProto``) on inputs shaped like ``feeds``.

    Shapes come from onnx's shape inference with the graph's inputs fixed to the feeds' shapes;
    a node whose shapes cannot be inferred counts zero.

    Raises:
        AnalysisError: onnx's shape inference fails on the graph (over 2 GB, say).
    """
    import onnx

    shaped = _skeleton(model)
    constants = {i.name: tuple(i.dims) for i in shaped.graph.initializer}
    graph_inputs = [i for i in shaped.graph.input if i.name not in constants]
    for value, feed in zip(graph_inputs, feeds):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in np.shape(feed):
            dims.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception as error:  # no shapes, no counts: never a silent zero
        raise AnalysisError(f"onnx cannot infer this graph's shapes, so its FLOPs cannot be counted ({error})") from None
    shapes: dict[str, tuple[int, ...]] = dict(constants)
    for graph in all_graphs(inferred.graph):
        for v in (*graph.value_info, *graph.output, *graph.input):
            dims = tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            if dims and all(d > 0 for d in dims):
                shapes[v.name] = dims
        shapes.update({i.name: tuple(i.dims) for i in graph.initializer})
    integers = _integer_constants(inferred.graph)
    nodes: dict[str, int] = {}
    runs: dict[str, int] = {}
    branches: list[str] = []
    known = _control_values(model, feeds) if any(n.op_type in _CONTROL for n in model.graph.node) else {}
    _count_graph(inferred.graph, 1, shapes, integers, known, nodes, runs, branches)
    params = sum(math.prod(i.dims) for i in shaped.graph.initializer if i.name in _parameters(shaped.graph))
    return OnnxCounts(int(sum(nodes.values())), int(params), nodes, shapes, runs, tuple(branches))


_CONTROL = ("If", "Loop", "Scan")
_SMALL = 64  # elements: initializers this small keep their values (shapes, axes, scales that shape inference reads)


def _skeleton(model):
    """A copy of ``model`` whose large initializers keep their name, type and dims but not their data.

    Shape inference reads a weight's dims only, and copying a 100 MB model's weights (then
    serialising them into onnx's C++ side) to count its FLOPs tripled the memory counting took.
    """
    import onnx

    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip="graph")
    copy_fields(model.graph, skeleton.graph, skip="initializer")
    for init in model.graph.initializer:
        if math.prod(init.dims) <= _SMALL:
            skeleton.graph.initializer.add().CopyFrom(init)
        else:
            skeleton.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return skeleton


def all_graphs(graph):
    """``graph`` and its subgraphs (``If`` branches, ``Loop``/``Scan`` bodies), at any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from all_graphs(sub)


def _count_graph(graph, times: int, shapes, integers, known, nodes, runs, branches) -> None:
    """Each node's multiply-adds times the runs of its graph; a subgraph's runs from the values that decide them."""
    integers = dict(integers, **_integer_constants(graph))
    for node in graph.node:
        if not node.output:
            continue
        nodes[node.output[0]] = _node_flops(node, shapes, integers) * times
        runs[node.output[0]] = times
        if node.op_type not in _CONTROL:
            continue
        name = node.name or node.output[0]
        subgraphs = {a.name: a.g for a in node.attribute if a.HasField("g")}
        value = lambda i: known.get(node.input[i], integers.get(node.input[i])) if len(node.input) > i and node.input[i] else None  # noqa: E731
        if node.op_type == "If":
            cond = value(0)
            if cond is None:
                branches.append(f"{name}: the branch taken is not known (its condition is computed inside a subgraph): neither counted")
                picked = {}
            else:
                taken = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
                branches.append(f"{name}: {taken} taken on the example inputs (the other not counted)")
                picked = {taken: times}
        else:
            if node.op_type == "Loop":
                trips = value(0)
                count = int(np.asarray(trips).reshape(-1)[0]) if trips is not None else None
                what = f"{count} iterations (its trip count; an earlier exit is not seen)" if count is not None else None
            else:  # Scan: one iteration per element of the first scan input along its axis
                axes = node_attributes(node).get("scan_input_axes", [0])
                first = shapes.get(node.input[-int(node_attributes(node).get("num_scan_inputs", 1))])
                count = first[axes[0] if axes else 0] if first else None
                what = f"{count} iterations" if count is not None else None
            if count is None:
                branches.append(f"{name}: its iterations are not known: its body is not counted")
            else:
                branches.append(f"{name}: body counted for {what}")
            picked = {"body": times * count} if count is not None else {}
        for attr, sub in subgraphs.items():
            _count_graph(sub, picked.get(attr, 0), shapes, integers, known, nodes, runs, branches)


def _control_values(model, feeds) -> dict[str, np.ndarray]:
    """The values that decide the main graph's If branches and Loop trip counts, from one onnxruntime run."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnx import helper

    from ..measure.onnxrt import open_session
    from .files import write_proto

    wanted = [n.input[0] for n in model.graph.node if n.op_type in ("If", "Loop") and n.input and n.input[0]]
    constants = {i.name for i in model.graph.initializer}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(v) for v in dict.fromkeys(wanted) if v not in have | constants)
    try:
        with tempfile.TemporaryDirectory(prefix="convtool-onnx-branches-") as tmp:
            write_proto(exposed, Path(tmp) / "branches.onnx")
            session = open_session(Path(tmp) / "branches.onnx", "CPUExecutionProvider")
            names = [i.name for i in session.get_inputs()]
            values = session.run(None, dict(zip(names, feeds)))
            return {o.name: v for o, v in zip(session.get_outputs(), values) if o.name in wanted}
    except Exception:  # the run's own error is the verification's to report
        return {}


def _parameters(graph) -> set[str]:
    """Float initializers that are parameters as fvcore counts them: not shape or axis constants,
    not BatchNorm running statistics (buffers in PyTorch)."""
    floats = {i.name for i in graph.initializer if i.data_type in (1, 10, 11, 16)}
    statistics = {v for node in graph.node if node.op_type == "BatchNormalization" for v in node.input[3:5]}
    return floats - statistics


def node_attributes(node) -> dict[str, Any]:
    """An ONNX node's attributes by name, as Python values."""
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _attr(node, name: str, default: Any) -> Any:
    return node_attributes(node).get(name, default)


def _integer_constants(graph) -> dict[str, list[int]]:
    """Small integer tensors the graph holds as initializers or Constant nodes (axes, shapes)."""
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i).reshape(-1).tolist() for i in graph.initializer if i.data_type in (6, 7, 9) and math.prod(i.dims) <= 8}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            t = node.attribute[0].t
            if t.data_type in (6, 7, 9) and math.prod(t.dims) <= 8:  # int32, int64, bool
                found[node.output[0]] = numpy_helper.to_array(t).reshape(-1).tolist()
    return found


def _node_flops(node, shapes: dict[str, tuple[int, ...]], integers: dict[str, list[int]]) -> int:
    shape = lambda i: shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None  # noqa: E731
    out = shapes.get(node.output[0])
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        x, w = shape(0), shape(1)
        if not (x and w and out):
            return 0
        if op == "Conv":
            return math.prod(out) * math.prod(w[1:])
        return math.prod(x) * math.prod(w[1:])
    if op == "Gemm":
        a, b = shape(0), shape(1)
        if not (a and b):
            return 0
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else a
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m * k * n
    if op == "MatMul":
        a = shape(0)
        return math.prod(out) * a[-1] if a and out else 0
    if op == "BatchNormalization":
        return math.prod(out) * 2 if out else 0
    if op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
        return math.prod(out) * 5 if out else 0
    if op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        return math.prod(out) * (4 if mode == "linear" else 1) if out else 0
    if op == "GlobalAveragePool" or (op == "ReduceMean" and _attr(node, "keepdims", 1) and _spatial_mean(node, shape(0), integers)):
        x = shape(0)  # an adaptive average pool to 1 (torch exports AdaptiveAvgPool2d(1) as a ReduceMean keeping dims)
        return math.prod(x) if x else 0
    return 0


def _spatial_mean(node, x: tuple[int, ...] | None, integers: dict[str, list[int]]) -> bool:
    """Whether a ReduceMean averages over every spatial dimension (2 and on) of an (N, C, ...) input."""
    if not x or len(x) < 3:
        return False
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = integers.get(node.input[1])
    return axes is not None and sorted(a % len(x) for a in axes) == list(range(2, len(x)))


def onnx_analysis(model: Any, feeds: Sequence[np.ndarray]):
    """:func:`count_onnx` as the :class:`~convtool.Analysis` a PyTorch model gets: one row per node that costs."""
    from ..measure.counts import Analysis, ModuleCost

    counts = count_onnx(model, feeds)
    parameters = _parameters(model.graph)
    floats = {i.name: math.prod(i.dims) for i in model.graph.initializer if i.name in parameters}
    rows = [ModuleCost("", "graph", counts.params, counts.flops, 0, 0)]
    for node in model.graph.node:
        params = sum(floats.get(v, 0) for v in node.input)
        flops = counts.nodes.get(node.output[0], 0) if node.output else 0
        if params or flops:
            rows.append(ModuleCost(node.name or node.output[0], node.op_type, params, flops, params, flops))
    return Analysis(params=counts.params, flops=counts.flops, modules=tuple(rows), unsupported_ops={},
                    input_shapes=tuple(tuple(np.shape(f)) for f in feeds))
