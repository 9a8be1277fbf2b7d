"""Rewrite an ONNX file as paddle2onnx writes one: every initializer becomes a Constant node.

Usage: python -m tests.onnx.paddle_style IN.onnx OUT.onnx
"""

import sys

import onnx
from onnx import helper


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with no initializers: each is a Constant node at the head of the main graph."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    constants = [helper.make_node("Constant", [], [init.name], name=f"p2o.{init.name}", value=init) for init in graph.initializer]
    names = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in names]  # IR < 4 lists initializers as inputs too
    nodes = [*constants, *graph.node]
    del graph.initializer[:], graph.input[:], graph.node[:]
    graph.input.extend(inputs)
    graph.node.extend(nodes)
    return rewritten


if __name__ == "__main__":
    onnx.save(initializers_to_constants(onnx.load(sys.argv[1])), sys.argv[2])
