"""fvcore's counting rules, one per ONNX op: which values' shapes each reads, and the multiply-adds they give.

A table of handles keyed by op, as fvcore keeps one keyed by torch op: a conv counts (output
elements) x (input channels per group) x K (a transposed conv: input elements x output channels
per group x K); ``Gemm`` M x K x N; ``MatMul`` (output elements) x K; ``Einsum`` the optimal
contraction's multiply-adds (numpy's ``einsum_path``, fvcore's own way); ``LSTM``, ``GRU`` and
``RNN`` their gates' matrix products, (steps x batch) x (W + R elements), as convtool's handles
count ``aten::lstm`` and its kin; a BatchNormalization 2 per element (eval, affine), the other
normalisations 5 per element; a linear resize 4 per output element and a nearest one 1; a
global average pool (and a ReduceMean keeping dims over every spatial axis, which is how torch
exports an adaptive pool to 1) 1 per input element.

Ops without a rule count zero, as fvcore counts them, and are listed as not counted, as fvcore
lists them, except those that only move, select, cast or compare data (:data:`FREE`, the ONNX
forms of the ops fvcore ignores by design).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Shape = tuple[int, ...]

# No multiply-adds, by fvcore's design: ONNX's forms of the ops it ignores (views, copies, casts,
# comparisons, indexing, padding, clamping, ReLU), and the control-flow nodes whose bodies are counted.
FREE = frozenset({
    "Identity", "Constant", "ConstantOfShape", "Shape", "Size", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    "Transpose", "Concat", "Split", "SplitToSequence", "Slice", "Gather", "GatherElements", "GatherND", "Expand",
    "Tile", "Pad", "Cast", "CastLike", "Dropout", "Range", "Equal", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "Not", "And", "Or", "Xor", "NonZero", "Relu", "Clip", "Floor", "ScatterND", "ScatterElements",
    "Max", "ReduceMax", "Mod", "Where", "Trilu", "DepthToSpace", "SpaceToDepth", "EyeLike", "If", "Loop", "Scan",
})


def node_attributes(node) -> dict[str, Any]:
    """An ONNX node's attributes by name, as Python values."""
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _attr(node, name: str, default: Any) -> Any:
    return node_attributes(node).get(name, default)


@dataclass(frozen=True)
class Rule:
    """How one op is counted: the values whose shapes it reads, and its multiply-adds from them
    (None where the op computes something no rule here counts: a mean over some axes, say)."""

    needs: Callable[[Any], list[str]]
    count: Callable[[Any, list[Shape], dict[str, list[int]]], int | None]


def _inputs(*positions: int) -> Callable[[Any], list[str]]:
    return lambda node: [node.input[i] if len(node.input) > i else "" for i in positions]


def _output(node) -> list[str]:
    return [node.output[0]]


def _conv(node, shapes, integers) -> int:
    x, w, out = shapes
    return math.prod(out if node.op_type == "Conv" else x) * math.prod(w[1:])


def _gemm(node, shapes, integers) -> int:
    a, b = shapes
    m, k = (a[1], a[0]) if _attr(node, "transA", 0) else a
    n = b[0] if _attr(node, "transB", 0) else b[1]
    return m * k * n


def _einsum(node, shapes, integers) -> int:
    """fvcore's count: half the optimal contraction's flops, from shapes alone (broadcast views hold no data)."""
    equation = _attr(node, "equation", b"")
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    operands = [np.broadcast_to(np.zeros((), np.float32), s) for s in shapes]
    report = np.einsum_path(equation, *operands, optimize="optimal")[1]
    line = next(line for line in report.split("\n") if "optimized flop" in line.lower())
    return int(float(line.split(":")[-1]) // 2)


def _recurrent(node, shapes, integers) -> int:
    """Every step's gate products, each direction: (steps x batch) x (W + R elements); elementwise work is not counted."""
    x, w, r = shapes
    return math.prod(x[:-1]) * (math.prod(w) + math.prod(r))


def _spatial_mean(node, x: Shape, integers: dict[str, list[int]]) -> bool:
    """Whether a ReduceMean averages over every spatial dimension (2 and on) of an (N, C, ...) input, keeping dims."""
    if len(x) < 3 or not _attr(node, "keepdims", 1):
        return False
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = integers.get(node.input[1])
    return axes is not None and sorted(a % len(x) for a in axes) == list(range(2, len(x)))


def _resize(node, shapes, integers) -> int:
    mode = _attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return math.prod(shapes[0]) * (4 if mode in ("linear", "bilinear") else 1)


def _per_element(factor: int) -> Callable[[Any, list[Shape], dict], int]:
    return lambda node, shapes, integers: math.prod(shapes[0]) * factor


RULES: dict[str, Rule] = {
    **{op: Rule(lambda node: [*_inputs(0, 1)(node), node.output[0]], _conv) for op in ("Conv", "ConvTranspose")},
    "Gemm": Rule(_inputs(0, 1), _gemm),
    "MatMul": Rule(lambda node: [*_inputs(0)(node), node.output[0]], lambda node, s, i: math.prod(s[1]) * s[0][-1]),
    "Einsum": Rule(lambda node: list(node.input), _einsum),
    **{op: Rule(_inputs(0, 1, 2), _recurrent) for op in ("LSTM", "GRU", "RNN")},
    "BatchNormalization": Rule(_output, _per_element(2)),
    **{op: Rule(_output, _per_element(5)) for op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization")},
    "Resize": Rule(_output, _resize),
    "Upsample": Rule(_output, _resize),
    "GlobalAveragePool": Rule(_inputs(0), _per_element(1)),
    "ReduceMean": Rule(_inputs(0), lambda node, s, i: math.prod(s[0]) if _spatial_mean(node, s[0], i) else None),
}


def op_label(node) -> str:
    """How a not-counted op is listed: its type, with its domain where it is not the standard one."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def rule_for(node) -> Rule | None:
    return RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
