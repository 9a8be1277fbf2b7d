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
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import AnalysisError
from .files import without_initializers
from .probes import Probe, Trail, all_graphs, exposed, in_order, quiet_run, subgraphs


@dataclass(frozen=True)
class OnnxCounts:
    """Per node and in total; shapes per value.

    Nodes and values are keyed by the trail to their graph (:mod:`~convtool.onnx.probes`) and
    their (first output's) name: sibling ``If`` branches may name their values alike.
    """

    flops: int
    params: int
    nodes: dict[tuple[Trail, str], int] = field(default_factory=dict)
    shapes: dict[tuple[Trail, str], tuple[int, ...]] = field(default_factory=dict)
    runs: dict[tuple[Trail, str], int | None] = field(default_factory=dict)  # times a node ran: 0 in a branch not taken, None not known
    branches: tuple[str, ...] = ()  # which branch of each If, and how many Loop/Scan iterations, were counted

    def shape(self, value: str, trail: Trail = ()) -> tuple[int, ...] | None:
        """A value's shape as the graph at ``trail`` sees it: its own, or that of the nearest graph around it."""
        return _scoped(self.shapes, value, trail)


def _scoped(table: dict, value: str, trail: Trail):
    for depth in range(len(trail), -1, -1):
        found = table.get((trail[:depth], value))
        if found is not None:
            return found
    return None


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
    shapes: dict[tuple[Trail, str], tuple[int, ...]] = {((), name): dims for name, dims in constants.items()}
    for graph, trail in [(inferred.graph, ())] + [(sub, (*t, (n.output[0], a, i))) for n, t in in_order(inferred.graph)
                                                  for a, i, sub in subgraphs(n) if n.output]:
        for v in (*graph.value_info, *graph.output, *graph.input):
            dims = tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            if dims and all(d > 0 for d in dims):
                shapes[(trail, v.name)] = dims
        shapes.update({(trail, i.name): tuple(i.dims) for i in graph.initializer})
    integers = _integer_constants(inferred.graph)
    nodes: dict[tuple[Trail, str], int] = {}
    runs: dict[tuple[Trail, str], int | None] = {}
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
    skeleton = without_initializers(model)
    for init in model.graph.initializer:
        if math.prod(init.dims) <= _SMALL:
            skeleton.graph.initializer.add().CopyFrom(init)
        else:
            skeleton.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return skeleton


def _count_graph(graph, times: int | None, shapes, integers, known, nodes, runs, branches, trail: Trail = ()) -> None:
    """Each node's multiply-adds times the runs of its graph (None: not known, and not counted); a
    subgraph's runs from the values that decide them.

    ``known``: per (trail, value), every value a control input took in the run
    (:func:`_control_values`): an If's conditions and a Loop body's iteration numbers, so a branch
    or body is counted for the runs it really had; a constant decides for every run of its node.
    """
    integers = dict(integers, **_integer_constants(graph))
    shape_of = lambda value: _scoped(shapes, value, trail)  # noqa: E731

    def every_run(value: str) -> np.ndarray | None:
        """The values ``value`` took in its node's runs: a constant's, once per run; else as read out of the run."""
        if value in integers:
            return np.asarray(integers[value]).reshape(-1)[:1].repeat(times) if times is not None else None
        return known.get((trail, value))

    for node in graph.node:
        if not node.output:
            continue
        nodes[(trail, node.output[0])] = _node_flops(node, shape_of, integers) * (times or 0)
        runs[(trail, node.output[0])] = times
        if node.op_type not in _CONTROL:
            continue
        name = node.name or node.output[0]
        inner = lambda attribute: (*trail, (node.output[0], attribute, 0))  # noqa: E731
        if node.op_type == "If":
            picked = _if_runs(name, every_run(node.input[0]), branches)
        elif node.op_type == "Loop":
            body = next(sub for attribute, _, sub in subgraphs(node) if attribute == "body")
            numbers = known.get((inner("body"), body.input[0].name)) if body.input else None
            trips = every_run(node.input[0]) if node.input and node.input[0] else None
            if numbers is not None:  # every iteration's number, read out of the run: early exits seen
                count, what = int(numbers.size), f"{numbers.size} iterations"
            elif trips is not None:
                count = int(trips.astype(np.int64).sum())
                what = f"{count} iterations (its trip count; an earlier exit is not seen)"
            else:
                count = what = None
            branches.append(f"{name}: body counted for {what}" if what else f"{name}: its iterations are not known: its body is not counted")
            picked = {"body": count}
        else:  # Scan: one iteration per element of the first scan input along its axis
            axes = node_attributes(node).get("scan_input_axes", [0])
            first = shape_of(node.input[-int(node_attributes(node).get("num_scan_inputs", 1))])
            count = times * first[axes[0] if axes else 0] if first and times is not None else None
            branches.append(f"{name}: body counted for {count} iterations" if count is not None
                            else f"{name}: its iterations are not known: its body is not counted")
            picked = {"body": count}
        for attribute, index, sub in subgraphs(node):
            _count_graph(sub, picked.get(attribute), shapes, integers, known, nodes, runs, branches, (*trail, (node.output[0], attribute, index)))


def _if_runs(name: str, conditions: np.ndarray | None, branches: list[str]) -> dict[str, int | None]:
    """How many times each branch of an If ran, from its condition's values in every run; said in ``branches``."""
    if conditions is None:
        branches.append(f"{name}: the branch taken is not known (its condition could not be read out of the run): neither counted")
        return {"then_branch": None, "else_branch": None}
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
    wanted = []
    for node, trail in in_order(model.graph):
        if node.op_type == "If" and node.input and node.input[0] not in constants:
            wanted.append(Probe(node.input[0], trail, TensorProto.BOOL, 1, flat=True))
        if node.op_type == "Loop" and node.output:
            body = next(sub for attribute, _, sub in subgraphs(node) if attribute == "body")
            if body.input:  # its iteration number, one per iteration: how many there were, early exits included
                wanted.append(Probe(body.input[0].name, (*trail, (node.output[0], "body", 0)), TensorProto.INT64, 1, flat=True))
            if node.input and node.input[0] and node.input[0] not in constants:  # its trip count: read where the above cannot be
                wanted.append(Probe(node.input[0], trail, TensorProto.INT64, 1, flat=True))
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


def _node_flops(node, shape_of: Callable[[str], tuple[int, ...] | None], integers: dict[str, list[int]]) -> int:
    shape = lambda i: shape_of(node.input[i]) if len(node.input) > i and node.input[i] else None  # noqa: E731
    out = shape_of(node.output[0])
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
        flops = counts.nodes.get(((), node.output[0]), 0) if node.output else 0
        if params or flops:
            rows.append(ModuleCost(node.name or node.output[0], node.op_type, params, flops, params, flops))
    return Analysis(params=counts.params, flops=counts.flops, modules=tuple(rows), unsupported_ops={},
                    input_shapes=tuple(tuple(np.shape(f)) for f in feeds))
