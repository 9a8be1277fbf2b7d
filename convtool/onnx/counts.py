"""Parameters and multiply-adds of an ONNX graph, counted by fvcore's rules, from the shapes of a run.

So that a model given as ONNX gets the same figures a PyTorch user gets from
:func:`~convtool.analyze`, by the rules of :mod:`~convtool.onnx.rules`. Shapes are onnx's
inference with the graph's inputs fixed to the feeds' shapes; every value a rule reads whose
shape inference leaves unknown (a Reshape to a computed shape, an op it has no function for) is
read out of one onnxruntime run of the feeds, at any depth of subgraph and in every run of its
graph. A node whose shapes are still not known (its run could not be read) is not counted and is
listed, with every op that ran and no rule counts, in :attr:`OnnxCounts.uncounted`: a FLOP
fraction is then of the counted part only. Parameters are the float constants of every graph,
initializers or ``Constant`` nodes (paddle2onnx writes its weights so), but BatchNorm statistics.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import AnalysisError
from .files import without_initializers
from .probes import Probe, Trail, all_graphs, in_order, read_run, shape_probe, subgraphs
from .rules import FREE, node_attributes, op_label, rule_for

__all__ = ["OnnxCounts", "count_onnx", "onnx_analysis", "node_attributes", "all_graphs"]


@dataclass(frozen=True)
class OnnxCounts:
    """Per node and in total; shapes per value.

    Nodes and values are keyed by the trail to their graph (:mod:`~convtool.onnx.probes`) and
    their (first output's) name: sibling ``If`` branches may name their values alike. ``nodes``
    holds every node whose cost is known (0 for one that did not run); ``uncounted`` the ops
    whose cost ``flops`` lacks, by type, with how often each ran (as fvcore lists torch ops).
    """

    flops: int
    params: int
    nodes: dict[tuple[Trail, str], int] = field(default_factory=dict)
    shapes: dict[tuple[Trail, str], tuple[int, ...]] = field(default_factory=dict)
    runs: dict[tuple[Trail, str], int | None] = field(default_factory=dict)  # times a node ran: 0 in a branch not taken, None not known
    branches: tuple[str, ...] = ()  # which branch of each If, and how many Loop/Scan iterations, were counted
    uncounted: dict[str, int] = field(default_factory=dict)  # op type -> runs not counted: no rule, or shapes not known
    unknown: dict[tuple[Trail, str], str] = field(default_factory=dict)  # why a value's shape is not known, where it is not

    def shape(self, value: str, trail: Trail = ()) -> tuple[int, ...] | None:
        """A value's shape as the graph at ``trail`` sees it: its own, or that of the nearest graph around it."""
        return _scoped(self.shapes, value, trail)

    def why_unknown(self, value: str, trail: Trail = ()) -> str | None:
        """Why ``value``'s shape is not known, as seen from the graph at ``trail``."""
        return _scoped(self.unknown, value, trail)


def _scoped(table: dict, value: str, trail: Trail):
    for depth in range(len(trail), -1, -1):
        found = table.get((trail[:depth], value))
        if found is not None:
            return found
    return None


def _scoped_key(table: dict, value: str, trail: Trail):
    """The key under which ``_scoped`` finds ``value`` from ``trail``, or None."""
    return next(((trail[:d], value) for d in range(len(trail), -1, -1) if (trail[:d], value) in table), None)


def count_onnx(model: Any, feeds: Sequence[np.ndarray]) -> OnnxCounts:
    """fvcore-style counts of ``model`` (an ``onnx.ModelProto``) run on ``feeds``.

    Raises:
        AnalysisError: onnx's shape inference fails on the graph (over 2 GB, say).
    """
    inferred = _inferred(model, feeds)
    graphs = [(inferred.graph, ())] + [(sub, (*t, (n.output[0], a, i))) for n, t in in_order(inferred.graph)
                                       for a, i, sub in subgraphs(n) if n.output]
    shapes: dict[tuple[Trail, str], tuple[int, ...]] = {}
    for graph, trail in graphs:
        for v in (*graph.value_info, *graph.output, *graph.input):
            dims = tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            if dims and all(d > 0 for d in dims) and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim):
                shapes[(trail, v.name)] = dims
        shapes.update({(trail, i.name): tuple(i.dims) for i in graph.initializer})
    probes = _shape_probes(graphs, shapes) + (_control_probes(model) if any(n.op_type in _CONTROL for n in model.graph.node) else [])
    values, failures = read_run(model, feeds, probes) if probes else ({}, {})
    per_run: dict[tuple[Trail, str], list[tuple[int, ...]]] = {}
    unknown: dict[tuple[Trail, str], str] = {}
    for probe in (p for p in probes if p.shape):
        key = (probe.trail, probe.value)
        if probe not in values:
            unknown[key] = failures.get(probe, "it could not be read out of the run")
            continue
        array = values[probe]  # one row per run of the value's graph; none where it did not run (an If's other branch: empty)
        rows = [tuple(int(d) for d in row) for row in array.reshape(-1, array.shape[-1])] if array.size else []
        if not rows:
            unknown[key] = "its graph did not run on these inputs"
            continue
        shapes[key] = rows[0]
        if any(row != rows[0] for row in rows):  # a loop whose iterations see other shapes: each counted with its own
            per_run[key] = rows
    known = {(p.trail, p.value): values[p].reshape(-1) for p in probes if not p.shape and p in values}
    tally = _Tally(shapes, per_run, known)
    tally.graph(inferred.graph, 1, _integer_constants(inferred.graph))
    params = sum(_parameters(model).values())
    return OnnxCounts(int(sum(tally.nodes.values())), int(params), tally.nodes, shapes, tally.runs, tuple(tally.branches),
                      dict(tally.uncounted), unknown)


_CONTROL = ("If", "Loop", "Scan")
_SMALL = 64  # elements: initializers this small keep their values (shapes, axes, scales that shape inference reads)


def _inferred(model, feeds):
    """``model``'s skeleton with its inputs fixed to the feeds' shapes, shapes inferred (data propagated)."""
    import onnx

    shaped = _skeleton(model)
    constants = {i.name for i in shaped.graph.initializer}
    for value, feed in zip([i for i in shaped.graph.input if i.name not in constants], feeds):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in np.shape(feed):
            dims.add().dim_value = int(size)
    try:
        return onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception as error:  # no shapes, no counts: never a silent zero
        raise AnalysisError(f"onnx cannot infer this graph's shapes, so its FLOPs cannot be counted ({error})") from None


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


def _defined(graphs) -> dict[Trail, set[str]]:
    """The values each graph defines: its inputs, initializers and its nodes' outputs."""
    return {trail: {*(v.name for v in graph.input), *(i.name for i in graph.initializer), *(o for n in graph.node for o in n.output)}
            for graph, trail in graphs}


def _shape_probes(graphs, shapes) -> list[Probe]:
    """A shape probe of every value a rule (or a Scan's iteration count) reads whose shape inference did not give,
    placed in the graph that defines it: read once per run of that graph."""
    defined = _defined(graphs)
    wanted: dict[tuple[Trail, str], Probe] = {}
    for graph, trail in graphs:
        for node in graph.node:
            rule = rule_for(node)
            needs = rule.needs(node) if rule else [_scan_input(node)] if node.op_type == "Scan" else []
            for value in needs:
                if not value or _scoped(shapes, value, trail) is not None:
                    continue
                home = next((trail[:d] for d in range(len(trail), -1, -1) if value in defined.get(trail[:d], ())), trail)
                wanted.setdefault((home, value), shape_probe(value, home))
    return list(wanted.values())


def _scan_input(node) -> str:
    """A Scan's first scan input: its iterations are its length along the scan axis."""
    return node.input[-int(node_attributes(node).get("num_scan_inputs", 1))]


def _control_probes(model) -> list[Probe]:
    """The values that decide every If's branch and Loop's trip count, at any depth, read in every run of their graph."""
    from onnx import TensorProto

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
    return wanted


class _Tally:
    """Each node's multiply-adds times the runs of its graph, walked graph by graph; a subgraph's runs
    from the values that decide them (``known``: per (trail, value), every value a control input took
    in the run: an If's conditions and a Loop body's iteration numbers)."""

    def __init__(self, shapes, per_run, known) -> None:
        self.shapes, self.per_run, self.known = shapes, per_run, known
        self.nodes: dict[tuple[Trail, str], int] = {}
        self.runs: dict[tuple[Trail, str], int | None] = {}
        self.branches: list[str] = []
        self.uncounted: Counter[str] = Counter()

    def cost(self, node, trail: Trail, times: int, integers) -> int | None:
        """The node's multiply-adds over its ``times`` runs; None where a rule's shapes are not known."""
        rule = rule_for(node)
        if rule is None:
            return 0
        needs = rule.needs(node)
        if any(_scoped_key(self.per_run, v, trail) not in (None, (trail, v)) for v in needs):
            return None  # a shape that changes with the runs of an outer graph: which of them this node saw is not known
        varying = [(trail, v) for v in needs if (trail, v) in self.per_run]
        if varying and all(len(self.per_run[k]) == times for k in varying):  # each run with its own shapes
            runs = [[self.per_run[(trail, v)][i] if (trail, v) in self.per_run else _scoped(self.shapes, v, trail) for v in needs]
                    for i in range(times)]
        elif varying:
            return None
        else:
            runs = [[_scoped(self.shapes, v, trail) for v in needs]] * (1 if times else 0)
        total = 0
        for shapes in runs:
            if any(s is None for s in shapes):
                return None
            counted = rule.count(node, shapes, integers)
            if counted is None:  # the op computes something no rule counts: zero, listed as fvcore lists it
                self.uncounted[op_label(node)] += times
                return 0
            total += counted
        return total * (times if not varying else 1)

    def every_run(self, value: str, trail: Trail, times: int | None, integers) -> np.ndarray | None:
        """The values ``value`` took in its node's runs: a constant's, once per run; else as read out of the run."""
        if value in integers:
            return np.asarray(integers[value]).reshape(-1)[:1].repeat(times) if times is not None else None
        return self.known.get((trail, value))

    def graph(self, graph, times: int | None, integers, trail: Trail = ()) -> None:
        integers = dict(integers, **_integer_constants(graph))
        for node in graph.node:
            if not node.output:
                continue
            key = (trail, node.output[0])
            self.runs[key] = times
            if times == 0:
                self.nodes[key] = 0
            elif times is None or (cost := self.cost(node, trail, times, integers)) is None:
                if node.op_type not in FREE or rule_for(node) is not None:
                    self.uncounted[op_label(node)] += times or 1
            else:
                self.nodes[key] = cost
                if rule_for(node) is None and node.op_type not in FREE:
                    self.uncounted[op_label(node)] += times
            if node.op_type in _CONTROL:
                self.control(node, trail, times, integers)

    def control(self, node, trail: Trail, times: int | None, integers) -> None:
        """Count an If's branches, a Loop's or a Scan's body, for the runs they had."""
        name = node.name or node.output[0]
        inner = lambda attribute: (*trail, (node.output[0], attribute, 0))  # noqa: E731
        if node.op_type == "If":
            picked = _if_runs(name, self.every_run(node.input[0], trail, times, integers), self.branches)
        elif node.op_type == "Loop":
            body = next(sub for attribute, _, sub in subgraphs(node) if attribute == "body")
            numbers = self.known.get((inner("body"), body.input[0].name)) if body.input else None
            trips = self.every_run(node.input[0], trail, times, integers) if node.input and node.input[0] else None
            if numbers is not None:  # every iteration's number, read out of the run: early exits seen
                count, what = int(numbers.size), f"{numbers.size} iterations"
            elif trips is not None:
                count = int(trips.astype(np.int64).sum())
                what = f"{count} iterations (its trip count; an earlier exit is not seen)"
            else:
                count = what = None
            self.branches.append(f"{name}: body counted for {what}" if what else f"{name}: its iterations are not known: its body is not counted")
            picked = {"body": count}
        else:  # Scan: one iteration per element of the first scan input along its axis
            axes = node_attributes(node).get("scan_input_axes", [0])
            first = _scoped(self.shapes, _scan_input(node), trail)
            count = times * first[axes[0] if axes else 0] if first and times is not None else None
            self.branches.append(f"{name}: body counted for {count} iterations" if count is not None
                                 else f"{name}: its iterations are not known: its body is not counted")
            picked = {"body": count}
        for attribute, index, sub in subgraphs(node):
            self.graph(sub, picked.get(attribute), integers, (*trail, (node.output[0], attribute, index)))


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


_FLOATS = (1, 10, 11, 16)  # float, float16, double, bfloat16
# Inputs that hold settings, not weights: a resize's scales, a pad's amounts and value, a clip's bounds.
_SETTINGS = {"Resize": 1, "Upsample": 1, "Pad": 1, "Clip": 1}  # op -> first input that is a setting


def _parameters(model) -> dict[str, int]:
    """Float constants that are parameters as fvcore counts them, by value name: their elements.

    Initializers and ``Constant`` nodes alike, in every graph (paddle2onnx writes its weights as
    Constant nodes); not scalars (an exporter's ``x * 0.5``), not BatchNorm running statistics
    (buffers in PyTorch), not a value read only as a setting (a resize's scales).
    """
    found: dict[str, int] = {}
    statistics: set[str] = set()
    readers: dict[str, list[bool]] = {}
    for graph in all_graphs(model.graph):
        for init in graph.initializer:
            if init.data_type in _FLOATS and len(init.dims) >= 1:
                found[init.name] = math.prod(init.dims)
        for node in graph.node:
            if node.op_type == "BatchNormalization":
                statistics.update(node.input[3:5])
            first_setting = _SETTINGS.get(node.op_type, len(node.input))
            for i, value in enumerate(node.input):
                readers.setdefault(value, []).append(i >= first_setting)
            if node.op_type != "Constant" or not node.output:
                continue
            values = node_attributes(node)
            t = values.get("value")
            if t is not None and getattr(t, "data_type", None) in _FLOATS and len(t.dims) >= 1:
                found[node.output[0]] = math.prod(t.dims)
            elif values.get("value_floats") is not None:
                found[node.output[0]] = len(values["value_floats"])
    return {name: size for name, size in found.items()
            if name not in statistics and not (readers.get(name) and all(readers[name]))}


def onnx_analysis(model: Any, feeds: Sequence[np.ndarray]):
    """:func:`count_onnx` as the :class:`~convtool.Analysis` a PyTorch model gets: one row per node that costs,
    and the ops not counted as ``unsupported_ops``."""
    from ..measure.counts import Analysis, ModuleCost

    counts = count_onnx(model, feeds)
    floats = _parameters(model)
    rows = [ModuleCost("", "graph", counts.params, counts.flops, 0, 0)]
    for node in model.graph.node:
        params = sum(floats.get(v, 0) for v in node.input)
        flops = counts.nodes.get(((), node.output[0]), 0) if node.output else 0
        if params or flops:
            rows.append(ModuleCost(node.name or node.output[0], node.op_type, params, flops, params, flops))
    return Analysis(params=counts.params, flops=counts.flops, modules=tuple(rows), unsupported_ops=dict(counts.uncounted),
                    input_shapes=tuple(tuple(np.shape(f)) for f in feeds))
