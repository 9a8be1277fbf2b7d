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
from .probes import Probe, Trail, all_graphs, exposed, in_order, quiet_run, subgraphs


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


def _count_graph(graph, times: int, shapes, integers, known, nodes, runs, branches, trail: Trail = ()) -> None:
    """Each node's multiply-adds times the runs of its graph; a subgraph's runs from the values that decide them.

    ``known``: per (trail, value), every value a control input took in the run
    (:func:`_control_values`), so a branch or body is counted for the runs it really had; a
    constant decides for every run of its node.
    """
    integers = dict(integers, **_integer_constants(graph))
    for node in graph.node:
        if not node.output:
            continue
        nodes[node.output[0]] = _node_flops(node, shapes, integers) * times
        runs[node.output[0]] = times
        if node.op_type not in _CONTROL:
            continue
        name = node.name or node.output[0]
        here = lambda i: (np.asarray(integers[node.input[i]]).reshape(-1)[:1].repeat(times)  # noqa: E731 - a constant: every run
                          if node.input[i] in integers else known.get((trail, node.input[i])))
        seen = here(0) if node.input and node.input[0] and node.op_type != "Scan" else None
        if node.op_type == "If":
            picked = _if_runs(name, seen, times, branches)
        else:
            if node.op_type == "Loop":
                count = int(seen.astype(np.int64).sum()) if seen is not None else None
                what = f"{count} iterations (its trip count; an earlier exit is not seen)" if count is not None else None
            else:  # Scan: one iteration per element of the first scan input along its axis
                axes = node_attributes(node).get("scan_input_axes", [0])
                first = shapes.get(node.input[-int(node_attributes(node).get("num_scan_inputs", 1))])
                count = times * first[axes[0] if axes else 0] if first else None
                what = f"{count} iterations" if count is not None else None
            if count is None:
                branches.append(f"{name}: its iterations are not known: its body is not counted")
            else:
                branches.append(f"{name}: body counted for {what}")
            picked = {"body": count} if count is not None else {}
        for attr, index, sub in subgraphs(node):
            _count_graph(sub, picked.get(attr, 0), shapes, integers, known, nodes, runs, branches, (*trail, (node.output[0], attr, index)))


def _if_runs(name: str, conditions: np.ndarray | None, times: int, branches: list[str]) -> dict[str, int]:
    """How many times each branch of an If ran, from its condition's values in every run; said in ``branches``."""
    if conditions is None:
        branches.append(f"{name}: the branch taken is not known (its condition could not be read out of the run): neither counted")
        return {}
    taken = conditions.astype(bool)
    then, other = int(taken.sum()), int(taken.size - taken.sum())
    if taken.size == 1:
        branch = "then_branch" if then else "else_branch"
        branches.append(f"{name}: {branch} taken on the example inputs (the other not counted)")
    elif taken.size == 0:
        branches.append(f"{name}: did not run on the example inputs")
    else:
        branches.append(f"{name}: then_branch taken {then} times and else_branch {other} times on the example inputs")
    return {"then_branch": then, "else_branch": other}


def _control_values(model, feeds) -> dict[tuple[Trail, str], np.ndarray]:
    """The values that decide every If's branch and Loop's trip count, at any depth, from one onnxruntime run:
    per (trail of the node's graph, value name), the values of all the node's runs (none where its graph did not run).

    Read out of subgraphs by :func:`~convtool.onnx.probes.exposed`; where that run fails (a loop
    whose iterations take different branches cannot stack the values), the main graph's alone.
    """
    import tempfile
    from pathlib import Path

    from onnx import TensorProto

    from ..measure.onnxrt import open_session
    from .files import write_proto

    constants = {i.name for g in all_graphs(model.graph) for i in g.initializer}
    wanted = [Probe(node.input[0], trail, TensorProto.BOOL if node.op_type == "If" else TensorProto.INT64, 1, flat=True)
              for node, trail in in_order(model.graph)
              if node.op_type in ("If", "Loop") and node.input and node.input[0] and node.input[0] not in constants]
    for probes in (wanted, [p for p in wanted if not p.trail]):
        if not probes:
            return {}
        try:
            exposed_model, carried, _ = exposed(model, probes)
            with tempfile.TemporaryDirectory(prefix="convtool-onnx-branches-") as tmp:
                write_proto(exposed_model, Path(tmp) / "branches.onnx")
                del exposed_model
                session = open_session(Path(tmp) / "branches.onnx", "CPUExecutionProvider")
                names = [i.name for i in session.get_inputs()]
                values = dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(zip(names, feeds)), quiet_run())))
            return {(p.trail, p.value): np.asarray(values[carried[p]]).reshape(-1) for p in probes if p in carried}
        except Exception:  # the run's own error is the verification's to report
            continue
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
