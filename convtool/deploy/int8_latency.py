"""A layer's latency in int8, for the planner: quantized as the whole model would be, timed as it runs inside it.

A plan that is right in fp32 is not the plan that is fastest in int8 (issue 37): int8 speeds up
a dense conv more than the depthwise and pointwise convs that replace it. So with int8 the
planner times each candidate quantized. A layer quantized alone has a float input and output,
converted to and from 8 bits at its edges; inside an int8 model its activations arrive and leave
in 8 bits, from and to the next int8 op. Those conversions cost as much as a small depthwise
conv (``benchmarks/int8_forms.py``), so they are cut off before timing: the graph's input is
the quantized tensor and its output the quantized result, fed and read in 8 bits.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..measure.onnxrt import cached_latency, module_fingerprint, module_session, require_provider, time_alone, timing_session
from .int8 import Int8Form, quantize_int8

CALIBRATION_DRAWS = 4  # timing needs scales, not good ones: a few seeded normal draws


def int8_graph_latency(path: str | os.PathLike, feeds: dict[str, np.ndarray], provider: str, key: tuple, *,
                       form: Int8Form | None = None, calibration: Any = None, runs: int = 15) -> float:
    """Median latency (ms) of a one-layer fp32 ONNX graph quantized to int8, alone, as it runs inside an int8 model.

    What :func:`~convtool.measure.onnxrt.graph_latency` measures of the fp32 graph, for the
    int8 file: quantized in ``form``, its 8-bit input and output kept 8-bit (see the module's
    docstring), timed on ``provider`` with every node on it. Cached per ``key``, form and provider:
    on a hit, nothing is quantized.

    Args:
        path: the fp32 graph of one layer (a Conv, or a pair as a front end writes it).
        feeds: its input(s) by name, float; quantized to 8 bits for the timed runs.
        provider: short or full onnxruntime name.
        key: what decides the layer's latency (its nodes, attributes and shapes).
        form: how to quantize; the default form when ``None``.
        calibration: samples of the layer's input for its scales; ``feeds`` and a few seeded
            normal draws of its shape when ``None``.
        runs: timed runs (more where they add up to too little to mean anything).

    Raises:
        ProviderUnavailableError: the provider is not in this build or cannot run every node
            of the int8 layer.
    """
    name = require_provider(provider)
    form = form or Int8Form()

    def measure() -> float:
        with tempfile.TemporaryDirectory(prefix="convtool-int8-") as tmp:
            return _timed(Path(path), feeds, name, form, calibration, runs, Path(tmp))

    return cached_latency(("int8-graph", key, form, name), measure)


def int8_module_latency(module: nn.Module, input_shape: tuple[int, ...], provider: str, *, form: Int8Form | None = None,
                        runs: int = 15) -> float:
    """Median latency (ms) of one small module in int8, as :func:`int8_graph_latency` times a graph.

    What :func:`~convtool.measure.onnxrt.module_latency` measures in fp32: the module exported
    as it is (the caller decides its form: a dense conv, or a pair in its runtime form), here
    quantized and timed in 8 bits. Cached per module structure, shape, form and provider.

    Raises:
        ProviderUnavailableError: the provider is not in this build or cannot run every node
            of the int8 layer.
    """
    name = require_provider(provider)
    form = form or Int8Form()

    def measure() -> float:
        with tempfile.TemporaryDirectory(prefix="convtool-int8-") as tmp:
            path, feeds = module_session(module, input_shape, Path(tmp))
            return _timed(path, feeds, name, form, None, runs, Path(tmp))

    return cached_latency(("int8-module", module_fingerprint(module), tuple(input_shape), form, name), measure)


def _timed(path: Path, feeds: dict[str, np.ndarray], provider: str, form: Int8Form, calibration: Any, runs: int,
           folder: Path) -> float:
    return time_alone(*int8_session(path, feeds, provider, form, folder, calibration), runs)


def int8_session(path: Path, feeds: dict[str, np.ndarray], provider: str, form: Int8Form, folder: Path,
                 calibration: Any = None) -> tuple[Any, dict[str, np.ndarray]]:
    """The fp32 layer graph at ``path`` quantized in ``form`` with 8-bit edges: a strict session on ``provider``
    (onnxruntime's name) and its feeds, to be timed as :func:`int8_graph_latency` times it."""
    quantized = quantized_for_timing(path, feeds, folder / f"{path.stem}.int8.onnx", form, calibration)
    inner, inner_feeds = eight_bit_edges(quantized.path, feeds, folder / f"{path.stem}.int8-inner.onnx")
    return timing_session(inner, provider, strict=True), inner_feeds


def quantized_for_timing(path: str | os.PathLike, feeds: dict[str, np.ndarray], out: str | os.PathLike, form: Int8Form,
                         calibration: Any = None) -> Any:
    """The fp32 model at ``path`` quantized to ``out`` in ``form``, to be timed: an :class:`~convtool.deploy.int8.Int8Export`.

    How fast an int8 file runs depends on its form, not on its scales, so without
    ``calibration`` it is calibrated on ``feeds`` and a few seeded normal draws of their
    shapes (float inputs; others repeated): no calibration data is spent on timing.
    """
    if calibration is None:
        rng = np.random.default_rng(0)
        draw = lambda v: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v  # noqa: E731
        calibration = [feeds] + [{k: draw(v) for k, v in feeds.items()} for _ in range(CALIBRATION_DRAWS - 1)]
    return quantize_int8(path, calibration, out, form=form, min_samples=1)


def eight_bit_edges(path: str | os.PathLike, feeds: dict[str, np.ndarray], out: str | os.PathLike) -> tuple[Path, dict[str, np.ndarray]]:
    """The int8 graph at ``path`` with its edge conversions cut off, written to ``out``, and its feeds.

    Each graph input read only by one QuantizeLinear becomes that node's 8-bit output (its feed
    quantized as the node would); each graph output written by a DequantizeLinear becomes that
    node's 8-bit input. Inputs and outputs without such a node stay as they are.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inner_feeds = dict(feeds)
    for value in list(graph.input):
        nodes = readers.get(value.name, [])
        if len(nodes) != 1 or nodes[0].op_type != "QuantizeLinear" or len(nodes[0].input) < 3 or value.name not in feeds:
            continue
        node = nodes[0]
        scale, zero = constants[node.input[1]], constants[node.input[2]]
        info = np.iinfo(zero.dtype)
        inner_feeds.pop(value.name)
        inner_feeds[node.output[0]] = np.clip(np.rint(feeds[value.name] / scale) + zero, info.min, info.max).astype(zero.dtype)
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
        graph.node.remove(node)
        graph.input.remove(value)
        graph.input.append(helper.make_tensor_value_info(node.output[0], helper.np_dtype_to_tensor_dtype(zero.dtype), shape))
    made = {o: n for n in graph.node for o in n.output}
    for value in list(graph.output):
        node = made.get(value.name)
        if node is None or node.op_type != "DequantizeLinear" or readers.get(value.name) or len(node.input) < 3 \
                or node.input[2] not in constants:
            continue
        dtype = constants[node.input[2]].dtype
        graph.node.remove(node)
        graph.output.remove(value)
        graph.output.append(helper.make_tensor_value_info(node.input[0], helper.np_dtype_to_tensor_dtype(dtype), None))
    onnx.save(model, str(out))
    return Path(out), inner_feeds
