"""Graph surgery for the ONNX front end: which Conv nodes may be separated, their replacement nodes,
BatchNorm folding, and the bookkeeping that keeps every other node, initializer and input as it was."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..core.decompose import separable_factors
from ..core.records import LayerChange
from ..measure.onnxrt import release_freed_memory
from ..plan.site import Site
from .counts import node_attributes
from .probes import all_graphs, fresh_name


def value_readers(graph) -> dict[str, list[Any]]:
    """Per value name, the top-level nodes that read it."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node)
    return readers


def fold_batchnorm(graph, pairs: list[list[str]], listed_inputs: bool) -> dict[str, tuple[str, str]]:
    """Fold each inference BatchNormalization that alone reads a pair's output into the pair's last conv.

    ``pairs``: per separated layer, the values its nodes write, its output last. The BatchNorm's
    statistics and affine must be constants; the conv then writes the BatchNorm's output.
    Returns, per folded layer output, the folded BatchNorm's name and output (what the conv
    writes now); constants no node reads any more are dropped.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    readers = value_readers(graph)
    outputs = {o.name for o in graph.output}
    producer = {o: node for node in graph.node for o in node.output}
    folded: dict[str, tuple[str, str]] = {}
    doomed, stale = [], set()
    for values in pairs:
        y, conv = values[-1], producer[values[-1]]
        users = readers.get(y, [])
        if y in outputs or len(users) != 1 or users[0].op_type != "BatchNormalization" or len(users[0].output) != 1:
            continue
        bn = users[0]
        if not all(v in inits for v in bn.input[1:5]) or len(readers.get(conv.input[1], [])) != 1:
            continue
        if conv.op_type != "Conv":  # a transposed depthwise conv holds its output channels in its weight's second axis
            continue
        scale, shift, mean, var = (numpy_helper.to_array(inits[v]).astype(np.float64) for v in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = scale / np.sqrt(var + eps)
        weight = numpy_helper.to_array(inits[conv.input[1]])
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(
            (weight.astype(np.float64) * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype), conv.input[1]))
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        bias_name = fresh_name(f"{node_name(conv)}.folded_bias", set(inits) | {v for n in graph.node for v in (*n.input, *n.output)})
        new_bias = numpy_helper.from_array(((bias - mean) * factor + shift).astype(weight.dtype), bias_name)
        graph.initializer.append(new_bias)
        if listed_inputs:  # IR < 4: every initializer is an input too
            graph.input.append(helper.make_tensor_value_info(bias_name, new_bias.data_type, list(new_bias.dims)))
        inits[bias_name] = new_bias
        stale |= set(conv.input[2:]) | set(bn.input[1:5])
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        doomed.append(bn)
        folded[y] = (node_name(bn), bn.output[0])
    for bn in doomed:
        graph.node.remove(bn)
    drop_replaced_weights(graph, stale)
    return folded


def node_name(node) -> str:
    """How a node is reported: its name, or its first output's where it has none."""
    return node.name or (node.output[0] if node.output else "")


def install_pairs(model, scopes, where, sites: dict[str, Site], picks: dict, layout: str):
    """Put each planned node's pair in its place, in whichever graph holds it; the pairs' weights go
    to the main graph's initializers (a subgraph sees them as outer-scope values).

    Subgraphs are rewritten before the graphs holding them (the rewrite copies a graph's nodes).
    Returns the layers' records (in the order of ``scopes``), per layer the values its nodes write
    (its output last), and the names of the nodes created. Dense weights, and the Constant nodes
    and Identity/Cast/Reshape chains that made them, are dropped once nothing reads them.
    ``sites`` is consumed: each site (a copy of its dense weight) is let go once its pair is
    built, so a large model's dense weights are not all held beside the new ones.
    """
    from onnx import helper

    graph = model.graph
    main_inits = {i.name for i in graph.initializer}
    used: set[str] = set()
    reads: dict[str, int] = {}
    for scope in scopes:
        used.update(i.name for i in scope.graph.initializer)
        for n in scope.graph.node:
            used.update((n.name, *n.input, *n.output))
            for v in n.input:
                reads[v] = reads.get(v, 0) + 1
    # per graph: sibling branches may reuse a value name (each If branch writing its own "c")
    by_output = {(c.scope.trail, c.node.output[0]): c for c in where.values()}
    own_bias = lambda v: v not in main_inits or reads.get(v, 0) > 1  # noqa: E731 - refit and folding change the pair's bias
    per_scope: dict[int, list] = {}
    outputs: dict[str, list[str]] = {}
    created: set[str] = set()
    replaced: set[str] = set()
    new_inits: list[Any] = []
    for index in reversed(range(len(scopes))):
        scope, new_nodes, records = scopes[index], [], []
        for node in scope.graph.node:
            found = by_output.get((scope.trail, node.output[0])) if node.op_type in ("Conv", "ConvTranspose") and node.output else None
            pick = picks.get(found.name) if found is not None else None
            if pick is None:
                new_nodes.append(node)
                continue
            pair, inits, record = pair_nodes(node, sites.pop(found.name), pick, used, layout, own_bias)
            release_freed_memory()  # the SVD's float64 copies: or glibc keeps them, and the next layer's pile on
            new_nodes += pair
            new_inits += inits
            outputs[record.name] = [n.output[0] for n in pair]
            created |= {n.name for n in pair}
            replaced |= {v for i in node.input[1:] if i for v in scope.constants.chains.get(i, (i,))}
            records.append(record)
        if records:
            del scope.graph.node[:]
            scope.graph.node.extend(new_nodes)
        per_scope[index] = records
    graph.initializer.extend(new_inits)
    if model.ir_version < 4:  # then every initializer is listed as an input too
        graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in new_inits)
    drop_unread(graph, replaced)
    layers = [record for index in range(len(scopes)) for record in per_scope[index]]
    return layers, outputs, created


def drop_unread(graph, values: set[str]) -> None:
    """Drop the initializers (at any depth) and the Constant/Identity/Cast/Reshape nodes among ``values`` that nothing reads."""
    drop_replaced_weights(graph, values)
    changed = True
    while changed:
        changed = False
        for g in all_graphs(graph):
            read = read_anywhere(g) | {o.name for o in g.output}
            for node in [n for n in g.node if n.op_type in ("Constant", "Identity", "Cast", "Reshape") and n.output
                         and all(o in values and o not in read for o in n.output)]:
                g.node.remove(node)
                changed = True
        for g in list(all_graphs(graph))[1:]:
            doomed = values - read_anywhere(g) - {o.name for o in g.output}
            for init in [i for i in g.initializer if i.name in doomed]:
                g.initializer.remove(init)


def pair_nodes(node, site: Site, pick: tuple[str, int], used: set[str], layout: str, shared: Callable[[str], bool]):
    """The nodes standing in for ``node`` at the planned (order, rank), the last one writing its output;
    their initializers; and the layer's record.

    ``layout="branches"`` writes a rank-r depthwise-first pair of a 1-d or 2-d ungrouped conv as
    r multiplier-1 depthwise convs and a Concat, the form onnxruntime runs fastest
    (:class:`~convtool.core.modules.BranchedSeparableConv`); ``"multiplier"`` keeps one depthwise
    conv with r filters per channel. A ``ConvTranspose`` becomes a depthwise ``ConvTranspose``
    (its strides, pads, output padding, dilations, auto_pad and spatial output_shape, which act
    on each channel alone) and a 1x1 ``Conv`` (its group and bias), as
    :class:`~convtool.core.modules.SeparableConv` pairs a transposed conv in PyTorch; always
    in the multiplier form.
    """
    from onnx import helper, numpy_helper

    order, rank = pick
    attrs, name, weight, groups = node_attributes(node), site.name, site.weight, site.groups
    transposed = node.op_type == "ConvTranspose"
    dtype = weight.numpy().dtype
    (m, n), kernel = site.channels, list(weight.shape[2:])
    factors = separable_factors(weight, rank, groups, order, transposed)
    spatial_name, mixing_name, middle = (fresh_name(f"{name}/{part}", used) for part in ("depthwise.weight", "pointwise.weight", "separable"))
    inits = [numpy_helper.from_array(factors.spatial.numpy().astype(dtype), spatial_name),
             numpy_helper.from_array(factors.mixing.numpy().astype(dtype), mixing_name)]
    geometry = ("strides", "dilations", "pads", "auto_pad") + (("output_padding", "output_shape") if transposed else ())
    spatial_attrs = {k: v for k, v in attrs.items() if k in geometry}
    spatial_attrs["kernel_shape"] = list(kernel)
    spatial_op = node.op_type
    ones = [1] * len(kernel)
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    own_bias = None
    if bias and shared(bias[0]):  # the refit and BatchNorm folding change the pair's bias: it must be its own
        own_bias = numpy_helper.from_array(site.uses[0].bias.numpy().astype(dtype), fresh_name(f"{name}/bias", used))
        bias = [own_bias.name]
    x, y = node.input[0], node.output[0]
    dw_name, pw_name = fresh_name(f"{name}/depthwise", used), fresh_name(f"{name}/pointwise", used)
    r = factors.rank
    if order == "dw-pw" and layout == "branches" and r > 1 and groups == 1 and len(kernel) < 3 and not transposed:
        # r multiplier-1 depthwise convs, concatenated: filter i of every channel in branch i, and
        # the pointwise's columns permuted to match (channel (m, i) moves from m*r + i to i*M + m).
        inits = []
        nodes = []
        for i in range(r):
            branch = fresh_name(f"{name}/depthwise.{i}.weight", used)
            inits.append(numpy_helper.from_array(factors.spatial[i::r].numpy().astype(dtype), branch))
            nodes.append(helper.make_node("Conv", [x, branch], [fresh_name(f"{name}/branch.{i}", used)],
                                          name=fresh_name(f"{name}/depthwise.{i}", used), group=m, **spatial_attrs))
        permuted = factors.mixing[:, torch.arange(m * r).reshape(m, r).t().reshape(-1)]
        inits.append(numpy_helper.from_array(permuted.numpy().astype(dtype), mixing_name))
        nodes.append(helper.make_node("Concat", [b.output[0] for b in nodes], [middle], name=fresh_name(f"{name}/concat", used), axis=1))
        nodes.append(helper.make_node("Conv", [middle, mixing_name, *bias], [y], name=pw_name, group=groups, kernel_shape=ones))
    elif order == "dw-pw":
        nodes = [helper.make_node(spatial_op, [x, spatial_name], [middle], name=dw_name, group=m, **spatial_attrs),
                 helper.make_node("Conv", [middle, mixing_name, *bias], [y], name=pw_name, group=groups, kernel_shape=ones)]
    else:
        nodes = [helper.make_node("Conv", [x, mixing_name], [middle], name=pw_name, group=groups, kernel_shape=ones),
                 helper.make_node(spatial_op, [middle, spatial_name, *bias], [y], name=dw_name, group=n, **spatial_attrs)]
    if order == "dw-pw" and len(kernel) == 1 and not transposed:
        nodes, inits = _depthwise_as_2d(nodes, inits, middle, used, name)
    if own_bias is not None:
        inits.append(own_bias)
    record = LayerChange(
        name=name, aliases=(), source="onnx", in_channels=m, out_channels=n, kernel_size=tuple(kernel),
        stride=site.options["stride"], groups=groups, rank=factors.rank, order=order,
        params_before=weight.numel() + (n if bias else 0),
        params_after=factors.spatial.numel() + factors.mixing.numel() + (n if bias else 0),
        flops_before=None, flops_after=None, calls=None, weight_error=factors.weight_error, transposed=transposed,
    )
    return nodes, inits, record


def _depthwise_as_2d(nodes: list, inits: list, middle: str, used: set[str], name: str) -> tuple[list, list]:
    """A 1-d pair's depthwise convs run as 1 x k 2-d convs between two Reshapes, as export_onnx ships a 1-d pair.

    onnxruntime's CPU provider runs a 1-d depthwise conv several times slower than the same
    filter as a 1 x k 2-d conv (benchmarks/RESULTS.md, issue 13; ``Conv1dAs2d``), slow enough
    that no 1-d pair of a streaming detector was faster than its dense conv in the plain form.
    Reshapes with 0 (copy the dim) and -1 serve every opset and any batch and length.
    """
    from onnx import helper, numpy_helper

    depthwise = nodes[:-1] if nodes[-2].op_type != "Concat" else nodes[:-2]
    weights = {w.name: w for w in inits}
    up, down = fresh_name(f"{name}/as2d.shape", used), fresh_name(f"{name}/as1d.shape", used)
    x4 = fresh_name(f"{name}/as2d", used)
    shapes = [numpy_helper.from_array(np.array([0, 0, 1, -1], np.int64), up), numpy_helper.from_array(np.array([0, 0, -1], np.int64), down)]
    rebuilt = [helper.make_node("Reshape", [depthwise[0].input[0], up], [x4], name=fresh_name(f"{name}/as2d", used))]
    for node in depthwise:
        w = weights[node.input[1]]
        weights[node.input[1]] = numpy_helper.from_array(numpy_helper.to_array(w)[:, :, None, :], w.name)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        two_d = {"kernel_shape": [1, *attrs["kernel_shape"]], "group": attrs["group"]}
        for key in ("strides", "dilations"):
            if key in attrs:
                two_d[key] = [1, *attrs[key]]
        if "pads" in attrs:
            two_d["pads"] = [0, attrs["pads"][0], 0, attrs["pads"][1]]
        if "auto_pad" in attrs:
            two_d["auto_pad"] = attrs["auto_pad"]
        rebuilt.append(helper.make_node("Conv", [x4, *node.input[1:]], [fresh_name(f"{node.output[0]}/2d", used)], name=node.name, **two_d))
    joined = rebuilt[-1].output[0]
    if len(depthwise) > 1:  # branches: concatenated in 2-d, then back to 1-d
        joined = fresh_name(f"{name}/concat2d", used)
        rebuilt.append(helper.make_node("Concat", [n.output[0] for n in rebuilt[1:]], [joined], name=nodes[-2].name, axis=1))
    rebuilt.append(helper.make_node("Reshape", [joined, down], [middle], name=fresh_name(f"{name}/as1d", used)))
    return [*rebuilt, nodes[-1]], [*weights.values(), *shapes]


def drop_replaced_weights(graph, replaced: set[str]) -> None:
    """Remove the dense weights of separated convs that nothing else reads, at any depth (and their input entries)."""
    doomed = replaced - read_anywhere(graph) - {o.name for o in graph.output}
    # Deleted in place: re-adding the kept ones would copy every weight the graph keeps.
    for field in (graph.initializer, graph.input):
        for index in reversed([i for i, value in enumerate(field) if value.name in doomed]):
            del field[index]


def read_anywhere(graph) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs (any depth) reads."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                read |= read_anywhere(sub)
    return read


def live_nodes(graph) -> set[str]:
    """Names of the nodes on a path to a graph output; in a subgraph of a live node, to the subgraph's outputs."""
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
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                stack += list(read_anywhere(sub))
                live |= live_nodes(sub)
    return live
