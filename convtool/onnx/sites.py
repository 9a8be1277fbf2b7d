"""The ``Conv`` nodes of an ONNX model that may be separated, in the main graph and in every subgraph.

Branches of ``If`` and bodies of ``Loop`` and ``Scan`` are ordinary graphs: their convs are
found as the main graph's are, with the constants of the graphs around them in scope. A node
is reported by its name where that name is unique in the model, else by the path of the
nodes and attributes that hold it (``if_0/then_branch/conv``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..core.records import SkippedLayer
from ..plan.ranks import SiteStats
from ..plan.site import Site, Use, pattern_reason, shape_reason
from .constants import Constants, model_constants
from .counts import OnnxCounts, node_attributes
from .probes import Trail, subgraphs


@dataclass
class Scope:
    """One graph of the model: the main one (``path`` "") or a subgraph, with the constants it sees."""

    graph: Any
    path: str
    constants: Constants
    trail: Trail = ()  # how to reach it from the main graph (:mod:`~convtool.onnx.probes`)


@dataclass
class ConvNode:
    """A ``Conv`` node that may be separated: its unique name, the graph holding it, the constants in its scope."""

    name: str
    node: Any
    scope: Scope


def model_scopes(model) -> list[Scope]:
    """The main graph and its subgraphs at any depth, parents before children."""
    found: list[Scope] = []
    # A loop, not a recursive closure: a closure calling itself is a reference cycle, which kept
    # the scopes (and through them the whole proto) alive until the garbage collector next ran.
    pending = [Scope(model.graph, "", model_constants(model))]
    while pending:
        scope = pending.pop()
        found.append(scope)
        children = []
        for node in scope.graph.node:
            for name, i, sub in subgraphs(node):
                where = f"{scope.path}/" if scope.path else ""
                where += f"{node.name or node.output[0]}/{name}" + ("" if _single(node, name) else f".{i}")
                children.append(Scope(sub, where, scope.constants.inner(sub), (*scope.trail, (node.output[0] if node.output else "", name, i))))
        pending += reversed(children)  # depth first, in the graphs' order
    return found


def _single(node, attribute: str) -> bool:
    """Whether the attribute holds one graph (``g``), not a list of them."""
    return any(a.name == attribute and a.HasField("g") for a in node.attribute)


def find_sites(scopes: list[Scope], overridable: set[str], include: Sequence[str], exclude: Sequence[str],
               ) -> tuple[dict[str, Site], dict[str, ConvNode], list[SkippedLayer]]:
    """Every Conv node of every graph: the planner's sites (by unique name), where each sits, and those left as they are."""
    counts: dict[str, int] = {}
    for scope in scopes:
        for node in scope.graph.node:
            counts[node.name] = counts.get(node.name, 0) + 1
    sites: dict[str, Site] = {}
    where: dict[str, ConvNode] = {}
    skipped: list[SkippedLayer] = []
    for scope in scopes:
        for node in scope.graph.node:
            if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or (node.output[0] if node.output else "")
            if scope.path and (not node.name or counts[node.name] > 1):
                name = f"{scope.path}/{name}"
            reason = skip_reason(node, name, scope.constants, overridable, include, exclude)
            if reason:
                skipped.append(SkippedLayer(name, reason))
                continue
            sites[name] = conv_site(node, name, scope.constants)
            where[name] = ConvNode(name, node, scope)
    return sites, where, skipped


def skip_reason(node, name: str, constants: Constants, overridable: set[str], include, exclude) -> str | None:
    weight = node.input[1] if len(node.input) > 1 else ""
    bias = node.input[2] if len(node.input) > 2 else ""
    if weight not in constants.values:
        return f"its weight is computed in the graph (by {constants.reason(weight)}): only constant weights are separated"
    if weight in overridable or (bias and bias in overridable):
        return "its weight or bias is also a graph input, so it can change at run time: left as it is"
    if bias and bias not in constants.values:
        return f"its bias is computed in the graph (by {constants.reason(bias)}): left as it is"
    value = constants.values[weight]
    attrs = node_attributes(node)
    group = int(attrs.get("group", 1))
    if value.ndim not in (3, 4, 5):
        return f"a {node.op_type} of {value.ndim - 2} spatial dimensions: 1 to 3 are separated"
    if value.dtype not in (np.float32, np.float16, np.float64):
        return "its weight is not a float tensor"
    if node.op_type == "ConvTranspose" and "output_shape" in attrs and len(attrs["output_shape"]) != value.ndim - 2:
        # onnxruntime reads an output_shape of N, C and the spatial sizes as the whole output's: the
        # depthwise half has other channels. Spatial sizes alone describe both halves the same.
        return "its output_shape attribute names the channels too: only spatial output shapes are kept by the pair"
    transposed = node.op_type == "ConvTranspose"
    return pattern_reason([name], include, exclude) or shape_reason(tuple(value.shape), group, transposed)


def conv_site(node, name: str, constants: Constants) -> Site:
    """The planner's view of a Conv or ConvTranspose node: its weight (as torch), groups, bias and strides."""
    attrs = node_attributes(node)
    tensor = lambda value: torch.from_numpy(np.array(constants.values[value], copy=True))  # noqa: E731
    weight = tensor(node.input[1])
    bias = tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    ones = [1] * (weight.dim() - 2)
    options = dict(stride=tuple(attrs.get("strides", ones)), padding=0, dilation=tuple(attrs.get("dilations", ones)),
                   padding_mode="zeros")
    transposed = node.op_type == "ConvTranspose"
    if transposed:
        options |= dict(transposed=True, output_padding=tuple(attrs.get("output_padding", [0] * len(ones))))
    return Site(name, weight, int(attrs.get("group", 1)), "onnx", [Use(bias, options)], transposed)


def site_stats(where: dict[str, ConvNode], counts: OnnxCounts) -> dict[str, SiteStats]:
    """Pixels (batch x spatial positions, times the node's runs) in and out of each site's node; none for a node that did not run."""
    stats = {}
    for name, found in where.items():
        node = found.node
        trail = found.scope.trail
        x, y = counts.shape(node.input[0], trail), counts.shape(node.output[0], trail)
        runs = counts.runs.get((trail, node.output[0]))
        if x and y and runs:
            stats[name] = SiteStats(runs * x[0] * math.prod(x[2:]), runs * y[0] * math.prod(y[2:]), tuple(x))
    return stats


def uncosted_reasons(where: dict[str, ConvNode], counts: OnnxCounts) -> dict[str, str]:
    """Why each site has no :func:`site_stats`, truly: its node did not run (a branch not taken), whether it ran
    is not known, or a shape of it could not be read out of the run (and why). Sites with stats are not listed."""
    costed = site_stats(where, counts)
    reasons = {}
    for name, found in where.items():
        if name in costed:
            continue
        node, trail = found.node, found.scope.trail
        runs = counts.runs.get((trail, node.output[0]))
        if runs == 0:
            reasons[name] = "did not run on the example inputs (it is in a branch or loop body they did not reach), so its cost is unknown"
        elif runs is None:
            reasons[name] = ("whether it ran on the example inputs is not known (the branch or iterations of the graph holding it "
                             "could not be read out of the run), so its cost is unknown")
        else:
            value = next((v for v in (node.input[0], node.output[0]) if not counts.shape(v, trail)), node.input[0])
            why = counts.why_unknown(value, trail) or "onnx cannot infer it and it was not read out of the run"
            side = "input" if value == node.input[0] else "output"
            reasons[name] = f"it ran, but its {side} shape is not known ({why}), so its cost is unknown"
    return reasons
