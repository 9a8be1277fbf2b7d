"""The original ONNX graph as the planner sees it: the ONNX front end's :class:`~convtool.plan.costing.DenseView`.

What each Conv processed comes from the counts of a run (:mod:`~convtool.onnx.counts`); a
layer's input and output on calibration data are read out of one onnxruntime run
(:mod:`~convtool.onnx.probes`); the model's output with one conv's weight swapped comes from a
copy of the graph whose conv weights are inputs with their values as defaults, so a swap is
one run with that weight fed; and a layer's forms are timed as the nodes this front end writes
(:func:`~convtool.onnx.graph.pair_nodes`), each alone in a graph of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..deploy.int8 import Int8Form
from ..deploy.int8_latency import int8_graph_latency, int8_session
from ..errors import InvalidOptionError
from ..measure.onnxrt import graph_latency, open_session, paired_latencies, timing_session
from ..measure.sensitivity import divergence
from ..plan.knapsack import DENSE
from ..plan.measured import Sensitivity
from ..plan.ranks import Key, SiteStats
from ..plan.site import Site
from .counts import OnnxCounts, node_attributes
from .files import write_proto
from .graph import pair_nodes
from .probes import Probe, exposed, fresh_name, quiet_run, samples
from .refit import input_pads
from .sites import ConvNode, site_stats, uncosted_reasons


class DenseGraph:
    """The original graph measured for the planner; each measure made once, when first asked.

    ``counts``: of a run on the example inputs (None, with ``why_not``, when there was none);
    ``batches``: the calibration batches layers' and the model's errors are measured on (the
    first ones, :func:`planning_batches`), or None; ``provider``: where layers are
    timed (onnxruntime's name), or None; ``folder``: where the graphs it runs are written;
    ``int8``: the form layers are quantized in before they are timed (None: timed in fp32).
    """

    def __init__(self, original: Any, sites: dict[str, Site], where: dict[str, ConvNode], counts: OnnxCounts | None,
                 why_not: str | None, batches: list[list[np.ndarray]] | None, provider: str | None, folder: Path,
                 int8: Int8Form | None = None) -> None:
        self.original, self.sites, self.where, self.counts, self.why_not = original, sites, where, counts, why_not
        self.batches, self.provider, self.folder, self.int8 = batches or None, provider, folder, int8
        self.precision = "fp32" if int8 is None else "int8"
        self._stats: dict[str, SiteStats] | None = None

    def stats(self) -> dict[str, SiteStats]:
        if self.counts is None:
            raise InvalidOptionError(f"a budget or a latency provider needs the graph's FLOPs counted: {self.why_not}")
        if self._stats is None:
            self._stats = site_stats(self.where, self.counts)
        return self._stats

    def uncosted(self) -> dict[str, str]:
        self.stats()
        return uncosted_reasons(self.where, self.counts)

    def flops(self) -> float:
        self.stats()
        return float(self.counts.flops)

    def activations(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each named conv's input (its padding applied) and output on the planning batches, read out of one run each."""
        if self.batches is None:
            return {}
        probes = {}
        for name in names:
            node, trail = self.where[name].node, self.where[name].scope.trail
            rank = self.sites[name].weight.dim()
            probes[name] = (Probe(node.input[0], trail, rank=rank), Probe(node.output[0], trail, rank=rank))
        copy, carried, _ = exposed(self.original, [p for pair in probes.values() for p in pair])
        session = _session(copy, self.folder / "activations.onnx")
        runs = [_run(session, batch) for batch in self.batches]
        found = {}
        for name, (x_probe, y_probe) in probes.items():
            if x_probe not in carried or y_probe not in carried:
                continue
            x, y = (_stacked([samples(values[carried[p]], p.rank) for values in runs]) for p in (x_probe, y_probe))
            padded = _padded(self.sites[name], self.where[name].node, x, y) if x is not None and y is not None else None
            if padded is not None:
                found[name] = padded
        return found

    def model_error(self) -> Sensitivity | None:
        return None if self.batches is None else SwappedWeights(self.original, self.sites, self.where, self.batches, self.folder)

    def latency(self, site: Site, key: Key, stats: SiteStats) -> float:
        """The dense node as it is, or the pair as :func:`~convtool.onnx.graph.pair_nodes` writes it, alone at its input shape;
        with int8, quantized and timed with 8-bit edges, as it runs inside the int8 file."""
        node = self.where[site.name].node
        model = _layer_model(self.original, node, site, key, stats.input_shape)
        path = self.folder / "layer.onnx"
        write_proto(model, path)
        feeds = {"x": np.random.default_rng(0).standard_normal(stats.input_shape).astype(site.weight.numpy().dtype)}
        attributes = tuple(sorted((k, repr(v)) for k, v in node_attributes(node).items()))
        fingerprint = (node.op_type, attributes, tuple(site.weight.shape), site.uses[0].bias is not None, key,
                       tuple(stats.input_shape))
        if self.int8 is not None:
            return int8_graph_latency(path, feeds, self.provider, fingerprint, form=self.int8)
        return graph_latency(path, feeds, self.provider, fingerprint)

    def paired(self, site: Site, keys: list[Key], stats: SiteStats) -> list[float]:
        """:meth:`latency` of each of ``keys``, timed side by side, round-robin (not cached)."""
        node = self.where[site.name].node
        feeds = {"x": np.random.default_rng(0).standard_normal(stats.input_shape).astype(site.weight.numpy().dtype)}
        timed = []
        for i, key in enumerate(keys):
            path = self.folder / f"paired{i}.onnx"
            write_proto(_layer_model(self.original, node, site, key, stats.input_shape), path)
            timed.append(int8_session(path, feeds, self.provider, self.int8, self.folder) if self.int8 is not None
                         else (timing_session(path, self.provider), feeds))
        return paired_latencies(timed)


PLANNING_SAMPLES = 32  # what the PyTorch front end plans on: its first calibration batch (recovery.batches.BATCH)


def planning_batches(batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """The first calibration batches holding at least :data:`PLANNING_SAMPLES` samples (all, where they hold fewer).

    A graph whose batch is fixed at one would otherwise weigh every layer by one sample's
    output: a streaming model's one chunk of silence decides its whole plan.
    """
    chosen, count = [], 0
    for batch in batches:
        if count >= PLANNING_SAMPLES:
            break
        chosen.append(batch)
        count += batch[0].shape[0] if batch and np.ndim(batch[0]) else 1
    return chosen


def _stacked(parts: list[np.ndarray | None]) -> np.ndarray | None:
    """Per-batch values as one batch; None where any batch never ran the node or their shapes differ."""
    if any(p is None for p in parts) or len({p.shape[1:] for p in parts}) > 1:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _padded(site: Site, node: Any, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(input with the node's padding applied, output): what a conv of the site's options maps one to the other;
    None where its geometry is not that (a transposed conv cropped by its pads)."""
    x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    attrs = node_attributes(node)
    if not site.transposed:
        kernel = list(site.weight.shape[2:])
        dims = len(kernel)
        pads = input_pads(attrs, list(x.shape[2:]), kernel, list(attrs.get("strides", [1] * dims)),
                          list(attrs.get("dilations", [1] * dims)))
        x = F.pad(x, pads) if any(pads) else x
    options = site.options
    with torch.no_grad():
        if site.transposed:
            dense = F.conv_transpose2d if site.weight.dim() == 4 else F.conv_transpose1d if site.weight.dim() == 3 else F.conv_transpose3d
            shape = dense(x[:1], site.weight, None, options["stride"], 0, options.get("output_padding", 0), site.groups,
                          options["dilation"]).shape
        else:
            dense = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[site.weight.dim()]
            shape = dense(x[:1], site.weight, None, options["stride"], 0, options["dilation"], site.groups).shape
    return (x, y) if tuple(shape[1:]) == tuple(y.shape[1:]) else None


def _session(model: Any, path: Path) -> Any:
    """A CPU session on ``model``, written to ``path`` first."""
    write_proto(model, path)
    return open_session(path, "CPUExecutionProvider", lean=True)


def _run(session: Any, batch: list[np.ndarray], overrides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The outputs of one run on ``batch`` (and the initializers ``overrides`` feeds), by name."""
    names = [i.name for i in session.get_inputs()]
    try:
        outputs = session.run(None, dict(zip(names, batch)) | (overrides or {}), quiet_run())
    except Exception as error:
        raise InvalidOptionError(f"the ONNX model does not run on the first calibration batch ({error}); check its shapes") from None
    return dict(zip((o.name for o in session.get_outputs()), outputs))


class SwappedWeights:
    """The model's output divergence on the planning batches when one conv's weight (and bias) is swapped:
    one run per swap and batch, the divergences averaged over the batches.

    Every site's conv reads its weight and bias from inputs of a copy of the graph, whose
    defaults are the dense values (an absent bias is a zero one), so a swap is a run with those
    two inputs fed.
    """

    def __init__(self, original: Any, sites: dict[str, Site], where: dict[str, ConvNode], batches: list[list[np.ndarray]],
                 folder: Path) -> None:
        import onnx
        from onnx import helper, numpy_helper

        copy = onnx.ModelProto()
        copy.CopyFrom(original)
        used = {v for n in copy.graph.node for v in (n.name, *n.input, *n.output)} | {i.name for i in copy.graph.initializer}
        graph_nodes = {(conv.scope.trail, conv.node.output[0]): name for name, conv in where.items()}
        self.inputs: dict[int, tuple[str, str, Site]] = {}
        for node, trail in _nodes(copy.graph):
            name = graph_nodes.get((trail, node.output[0])) if node.output else None
            if name is None:
                continue
            site = sites[name]
            bias = site.uses[0].bias if site.uses[0].bias is not None else torch.zeros(site.channels[1], dtype=site.weight.dtype)
            names = fresh_name(f"{name}.weight", used), fresh_name(f"{name}.bias", used)
            used |= set(names)
            for value, tensor in zip(names, (site.weight, bias)):
                copy.graph.initializer.append(numpy_helper.from_array(tensor.numpy(), value))
                copy.graph.input.append(helper.make_tensor_value_info(value, numpy_helper.from_array(tensor.numpy()).data_type,
                                                                      list(tensor.shape)))
            del node.input[1:]
            node.input.extend(names)
            self.inputs[id(site.weight)] = (*names, site)
        if copy.ir_version < 4:
            copy.ir_version = 4
        self.batches = batches
        self.session = _session(copy, folder / "swapped.onnx")
        self.reference = [self._outputs(batch, {}) for batch in batches]
        self.runs = 0

    def _outputs(self, batch: list[np.ndarray], overrides: dict[str, np.ndarray]) -> list[torch.Tensor]:
        values = _run(self.session, batch, overrides)
        return [torch.from_numpy(np.asarray(v)) for v in values.values() if np.asarray(v).dtype.kind == "f"]

    def __call__(self, weight: torch.Tensor, replacement: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        self.runs += 1
        weight_name, bias_name, site = self.inputs[id(weight)]
        dtype = site.weight.numpy().dtype
        overrides = {weight_name: replacement.detach().numpy().astype(dtype)}
        if bias is not None:
            overrides[bias_name] = bias.detach().numpy().astype(dtype)
        return sum(divergence(reference, self._outputs(batch, overrides))
                   for reference, batch in zip(self.reference, self.batches)) / len(self.batches)


def _nodes(graph: Any, trail: tuple = ()):
    """Every node of ``graph`` and its subgraphs, with the trail to the graph holding it."""
    from .probes import subgraphs

    for node in graph.node:
        yield node, trail
        for attribute, index, sub in subgraphs(node):
            yield from _nodes(sub, (*trail, (node.output[0] if node.output else "", attribute, index)))


def _layer_model(original: Any, node: Any, site: Site, key: Key, shape: tuple[int, ...]) -> Any:
    """A graph of one layer, input ``x`` of ``shape`` to output ``y``: the dense node, or its pair as written."""
    from onnx import helper, numpy_helper

    dtype = site.weight.numpy().dtype
    bias = site.uses[0].bias
    alone = helper.make_node(node.op_type, ["x", "w", *(["b"] if bias is not None else [])], ["y"], name="layer")
    alone.attribute.extend(node.attribute)
    if key == DENSE:
        nodes = [alone]
        inits = [numpy_helper.from_array(site.weight.numpy(), "w")]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias.numpy().astype(dtype), "b"))
    else:
        nodes, inits, _ = pair_nodes(alone, site, key, {"x", "y", "w", "b"}, "branches", lambda value: True)
    elem = numpy_helper.from_array(np.zeros(1, dtype)).data_type
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", elem, list(shape))],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    opsets = [o for o in original.opset_import if o.domain in ("", "ai.onnx")] or [helper.make_opsetid("", 17)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=max(original.ir_version, 4))
