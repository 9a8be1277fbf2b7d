"""Values from any graph of a model read out of an onnxruntime run, for the refit to fit on.

Only the main graph's values can be outputs of a run; a value inside an ``If`` branch or a
``Loop``/``Scan`` body is passed up, level by level, by the nodes that hold its graph: a
``Loop`` or ``Scan`` body gets it as one more scan output (its values of every iteration
stacked on a new first axis), an ``If`` as one more output of every branch, the others giving
an empty tensor, which is how a branch that did not run shows up. A value is found by its
``trail`` (which node, attribute and graph hold it, from the main graph down), since names may
repeat across sibling branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

Trail = tuple[tuple[str, str, int], ...]  # per level: the holding node's first output, its attribute, the graph's index there


@dataclass(frozen=True)
class Probe:
    """A value to read out of a run: its name in the graph its trail leads to, its element type and rank."""

    value: str
    trail: Trail = ()
    elem_type: int = 1  # onnx.TensorProto.FLOAT
    rank: int = 4
    flat: bool = False  # read as 1-d (``rank`` 1): a scalar has no empty form for a branch that does not hold it
    shape: bool = False  # read the value's shape (int64, 1-d) rather than the value: a few bytes, whatever its size


def shape_probe(value: str, trail: Trail = ()) -> Probe:
    """A probe of ``value``'s shape, read in every run of its graph."""
    import onnx

    return Probe(value, trail, onnx.TensorProto.INT64, 1, shape=True)


def subgraphs(node) -> Iterator[tuple[str, int, Any]]:
    """A node's graph attributes: (attribute name, index among its graphs, graph)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.name, 0, attr.g
        for i, sub in enumerate(attr.graphs):
            yield attr.name, i, sub


def all_graphs(graph) -> Iterator[Any]:
    """``graph`` and its subgraphs (``If`` branches, ``Loop``/``Scan`` bodies), at any depth."""
    yield graph
    for node in graph.node:
        for _, _, sub in subgraphs(node):
            yield from all_graphs(sub)


def in_order(graph, trail: Trail = ()) -> Iterator[tuple[Any, Trail]]:
    """Every node at any depth with the trail to its graph, in execution order (a subgraph's where its holder runs)."""
    for node in graph.node:
        for name, index, sub in subgraphs(node):
            if node.output:
                yield from in_order(sub, (*trail, (node.output[0], name, index)))
        yield node, trail


def graph_at(graph, trail: Trail):
    """The graph ``trail`` leads to from ``graph``."""
    for output, attribute, index in trail:
        graph = next(sub for name, i, sub in subgraphs(_holder(graph, output)) if (name, i) == (attribute, index))
    return graph


def exposed(model, probes: Sequence[Probe], overridable: Sequence[str] = ()) -> tuple[Any, dict[Probe, str], dict[Probe, str]]:
    """A copy of ``model`` with every probe's value an output of the main graph, and the initializers
    ``overridable`` inputs too (with their values as defaults); per probe, the output carrying it,
    and per probe that cannot be carried out (its graph held by a node other than If, Loop or
    Scan), why.
    """
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if any(p.trail for p in probes) and _default_opset(copy) < 11:
        copy = _with_if_of_opset_11(copy)
    graph = copy.graph
    used = {v for g in all_graphs(graph) for n in g.node for v in (n.name, *n.input, *n.output)}
    used |= {v.name for g in all_graphs(graph) for v in (*g.input, *g.output, *g.initializer)}
    carried: dict[Probe, str] = {}
    refused: dict[Probe, str] = {}
    for probe in probes:
        holders = [_holder(graph_at(graph, probe.trail[:depth]), probe.trail[depth][0]) for depth in range(len(probe.trail))]
        odd = next((h.op_type for h in holders if h.op_type not in CARRIERS or h.domain not in ("", "ai.onnx")), None)
        if odd is not None:
            refused[probe] = f"it lies inside a {odd} node, whose outputs cannot carry its values out"
            continue
        value = probe.value
        if probe.shape:  # a Shape node beside the value: the run hands out its dims, not its elements
            inner = graph_at(graph, probe.trail)
            value = fresh_name(f"{probe.value}.shape", used)
            inner.node.append(helper.make_node("Shape", [probe.value], [value], name=fresh_name(f"{value}.node", used)))
        elif probe.flat and probe.trail:
            inner = graph_at(graph, probe.trail)
            shape, value = fresh_name(f"{probe.value}.flat_shape", used), fresh_name(f"{probe.value}.flat", used)
            minus_one = helper.make_tensor(shape, onnx.TensorProto.INT64, [1], [-1])
            inner.node.extend([helper.make_node("Constant", [], [shape], name=fresh_name(f"{shape}.constant", used), value=minus_one),
                               helper.make_node("Reshape", [probe.value, shape], [value], name=fresh_name(f"{value}.reshape", used))])
        for holder, (_, attribute, index) in reversed(list(zip(holders, probe.trail))):
            value = _carry_out(holder, (attribute, index), value, probe, used)
        carried[probe] = value
    have = {o.name for o in graph.output}
    graph.output.extend(helper.make_empty_tensor_value_info(v) for v in dict.fromkeys(carried.values()) if v not in have)
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name in overridable and init.name not in inputs:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    if copy.ir_version < 4:
        copy.ir_version = 4  # initializers outside the inputs need IR 4; nothing else here depends on it
    return copy, carried, refused


CARRIERS = ("If", "Loop", "Scan")  # the nodes whose outputs can carry a value of their graphs out


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _with_if_of_opset_11(model):
    """``model`` converted to opset 11, where an If's branches may give outputs of different shapes
    (before, onnxruntime refuses a graph whose branches' shapes differ: a probe's empty tensor
    would); as it was where onnx's converter cannot convert it."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, 11)
    except Exception:  # the caller reports onnxruntime's refusal
        return model


def _holder(graph, output: str):
    return next(n for n in graph.node if n.output and n.output[0] == output)


def _carry_out(holder, where: tuple[str, int], value: str, probe: Probe, used: set[str]) -> str:
    """Pass ``value``, of the holder's graph at ``where``, out as a new output of ``holder``: its name."""
    from onnx import helper

    typed = lambda name: helper.make_tensor_value_info(name, probe.elem_type, None)  # noqa: E731
    if holder.op_type == "If":
        for name, index, sub in subgraphs(holder):
            out = fresh_name(f"{value}.probe", used)
            if (name, index) == where:
                sub.node.append(helper.make_node("Identity", [value], [out], name=fresh_name(f"{out}.identity", used)))
            else:  # the branch that does not hold it: an empty tensor of the same rank
                empty = helper.make_tensor(out, probe.elem_type, [0] * probe.rank, [])
                sub.node.append(helper.make_node("Constant", [], [out], name=fresh_name(f"{out}.empty", used), value=empty))
            sub.output.append(typed(out))
    else:  # a Loop's or Scan's body
        (_, _, body), = list(subgraphs(holder))
        out = fresh_name(f"{value}.probe", used)
        body.node.append(helper.make_node("Identity", [value], [out], name=fresh_name(f"{out}.identity", used)))
        body.output.append(typed(out))  # last of the body's outputs: one more scan output
        for attr in holder.attribute:
            if attr.name in ("scan_output_axes", "scan_output_directions"):
                attr.ints.append(0)
    carried = fresh_name(f"{value}.probed", used)
    holder.output.append(carried)
    return carried


def fresh_name(base: str, used: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``... whichever is not in ``used`` (then it is)."""
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def quiet_run():
    """Run options that keep onnxruntime from logging a failure the caller reports in its own words."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def read_run(model, feeds: Sequence[np.ndarray], probes: Sequence[Probe]) -> tuple[dict[Probe, np.ndarray], dict[Probe, str]]:
    """The values of ``probes`` in one onnxruntime run of ``model`` on ``feeds``, and why each probe not read was not.

    Where the run with every probe fails (a loop whose iterations take different branches cannot
    stack a value of one of them), the main graph's probes alone are read.
    """
    import tempfile
    from pathlib import Path

    from ..measure.onnxrt import open_session
    from .files import write_proto

    failures: dict[Probe, str] = {}
    for attempt in (list(probes), [p for p in probes if not p.trail]):
        if not attempt:
            break
        try:
            exposed_model, carried, refused = exposed(model, attempt)
            with tempfile.TemporaryDirectory(prefix="convtool-onnx-run-") as tmp:
                write_proto(exposed_model, Path(tmp) / "probed.onnx")
                del exposed_model
                session = open_session(Path(tmp) / "probed.onnx", "CPUExecutionProvider")
                names = [i.name for i in session.get_inputs()]
                values = dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(zip(names, feeds)), quiet_run())))
        except Exception as error:  # the run's own error is the verification's to report
            reason = " ".join(str(error).split())[:300]
            failures.update({p: f"the run that reads it failed ({reason})" for p in attempt})
            continue
        failures = {p: why for p, why in failures.items() if p not in carried} | refused
        return {p: np.asarray(values[carried[p]]) for p in attempt if p in carried}, failures
    return {}, failures


def samples(array: np.ndarray, rank: int) -> np.ndarray | None:
    """A probed value as a batch of the value's own rank: iterations folded into the batch; None when it never ran."""
    if array.size == 0 or array.ndim < rank:
        return None
    return array.reshape(-1, *array.shape[array.ndim - rank + 1:])
