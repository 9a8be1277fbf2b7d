"""ONNX files as exporters other than torch's write them (issue 24): weights as Constant nodes and
chains of Identity/Cast/Reshape (paddle2onnx), convs inside If branches and Loop bodies."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import convtool
from convtool import NothingToSeparateError
from convtool.onnx.probes import all_graphs

RNG = np.random.default_rng(0)


def _run(model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)



def _constant_values(model) -> dict:
    found = {i.name: numpy_helper.to_array(i) for g in all_graphs(model.graph) for i in g.initializer}
    for g in all_graphs(model.graph):
        for n in g.node:
            if n.op_type == "Constant":
                found[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return found


def _standard_convs(model) -> list[str]:
    """Conv nodes at any depth that are neither depthwise nor pointwise."""
    values = _constant_values(model)
    left = []
    for g in all_graphs(model.graph):
        for n in g.node:
            if n.op_type in ("Conv", "ConvTranspose"):
                w = values.get(n.input[1])
                if w is None or (w.shape[1] > 1 and any(k > 1 for k in w.shape[2:])) and n.op_type == "Conv":
                    left.append(n.name)
                elif n.op_type == "ConvTranspose" and w.shape[1] > 1 and any(k > 1 for k in w.shape[2:]):
                    left.append(n.name)
    return left


def _ops(model) -> list[str]:
    return sorted(n.op_type for g in all_graphs(model.graph) for n in g.node if n.op_type not in ("Conv", "Concat"))


def _constant(name: str, array: np.ndarray):
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(array, name))


def _paddle_style():
    """A conv whose weight is a Constant node, one behind Identity and Cast (float16 -> float), one behind a Reshape."""
    w1 = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((8, 6, 3, 3)).astype(np.float16)
    w3 = RNG.standard_normal((8, 8, 3, 3)).astype(np.float32)
    nodes = [
        _constant("w1", w1), _constant("b1", RNG.standard_normal(6).astype(np.float32)),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="p2o.Conv.0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="p2o.Relu.0"),
        _constant("w2h", w2),
        helper.make_node("Identity", ["w2h"], ["w2i"], name="p2o.Identity.0"),
        helper.make_node("Cast", ["w2i"], ["w2"], name="p2o.Cast.0", to=TensorProto.FLOAT),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="p2o.Conv.1", strides=[2, 2]),
        _constant("w3flat", w3.reshape(-1)), _constant("w3shape", np.array([8, 8, 3, 3], np.int64)),
        helper.make_node("Reshape", ["w3flat", "w3shape"], ["w3"], name="p2o.Reshape.0"),
        helper.make_node("Conv", ["c2", "w3"], ["y"], name="p2o.Conv.2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_constant_node_weights_and_their_chains_are_separated():
    model = _paddle_style()
    x = RNG.standard_normal((1, 4, 12, 12)).astype(np.float32)
    full = convtool.separate_onnx(model, [x], rank="full")
    assert sorted(l.name for l in full.layers) == ["p2o.Conv.0", "p2o.Conv.1", "p2o.Conv.2"]
    assert full.verified and full.relative_error < 1e-5, full.verification
    one = convtool.separate_onnx(model, [x], rank=1)
    assert _standard_convs(one.model) == []
    assert _ops(one.model) == ["Relu"]  # the constants and their chains went with the dense weights
    onnx.checker.check_model(one.model, full_check=True)
    assert one.model.graph.initializer  # the pairs' weights
    np.testing.assert_allclose(_run(one.model, {"x": x})[0].shape, (1, 8, 5, 5))


def test_a_computed_weight_names_the_op_that_wrote_it():
    w = numpy_helper.from_array(RNG.integers(-5, 5, (6, 4, 3, 3)).astype(np.int8), "wq")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], name="dq"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 6, 6])], [w, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(NothingToSeparateError, match="by a DequantizeLinear node"):
        convtool.separate_onnx(model)


def _value(name, rank=4):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def _branchy(nested: bool = False):
    """An If whose branches hold convs of different shapes (one branch's from an outer-scope initializer,
    the other's from a Constant node of its own); with ``nested``, the then-branch holds a Loop whose
    body holds a conv, and an If inside it."""
    w_then = numpy_helper.from_array(RNG.standard_normal((6, 4, 3, 3)).astype(np.float32), "w_then")
    then_nodes = [helper.make_node("Conv", ["x", "w_then"], ["t1"], name="conv", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["t1"], ["t2"], name="relu")]
    then_out = "t2"
    if nested:
        inner_w = numpy_helper.from_array(RNG.standard_normal((6, 6, 3, 3)).astype(np.float32), "w_loop")
        inner_if = helper.make_node(
            "If", ["flag"], ["deep"], name="inner_if",
            then_branch=helper.make_graph([helper.make_node("Conv", ["h", "w_loop"], ["d1"], name="conv", pads=[1, 1, 1, 1])],
                                          "deep_then", [], [_value("d1")]),
            else_branch=helper.make_graph([helper.make_node("Identity", ["h"], ["d2"], name="keep")], "deep_else", [], [_value("d2")]))
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"), inner_if,
             helper.make_node("Tanh", ["deep"], ["h_out"], name="tanh")], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             _value("h")], [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _value("h_out")])
        then_nodes += [_constant("trips", np.array(3, np.int64)), _constant("flag", np.array(True)),
                       helper.make_node("Loop", ["trips", "", "t2"], ["t3"], name="loop", body=body)]
        then_out = "t3"
    then_graph = helper.make_graph(then_nodes, "then", [], [_value(then_out)], [inner_w] if nested else [])
    else_graph = helper.make_graph(
        [_constant("w_else", RNG.standard_normal((6, 4, 5, 5)).astype(np.float32)),
         helper.make_node("Conv", ["x", "w_else", "b_else"], ["e1"], name="conv", strides=[2, 2])],
        "else", [], [_value("e1")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["positive"], name="greater"),
             helper.make_node("If", ["positive"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    inits = [w_then, numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(RNG.standard_normal(6).astype(np.float32), "b_else")]
    graph = helper.make_graph(nodes, "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                              [_value("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _branch_inputs():
    x = RNG.standard_normal((1, 4, 9, 9)).astype(np.float32)
    return {"then": np.abs(x), "else": -np.abs(x)}


@pytest.mark.parametrize("nested", [False, True], ids=["if", "loop-and-if-in-a-branch"])
def test_convs_in_both_branches_of_an_if_are_separated_exactly(nested):
    model = _branchy(nested)
    inputs = _branch_inputs()
    full = convtool.separate_onnx(model, [inputs["then"]], rank="full")
    expected = {"if/then_branch/conv", "if/else_branch/conv"} | ({"if/then_branch/loop/body/inner_if/then_branch/conv"} if nested else set())
    assert {l.name for l in full.layers} == expected
    for taken, x in inputs.items():
        for a, b in zip(_run(full.model, {"x": x}), _run(model, {"x": x})):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=taken)
    one = convtool.separate_onnx(model, [inputs["else"]], rank=1)
    assert _standard_convs(one.model) == []
    kept = lambda m: [op for op in _ops(m) if op != "Constant"]  # noqa: E731 - the else branch's weight went with its conv
    assert kept(one.model) == kept(model)
    onnx.checker.check_model(one.model, full_check=True)
    names = [n.name for g in all_graphs(one.model.graph) for n in g.node]
    assert len(names) == len(set(names))  # node names unique across graphs
    assert one.runs[0].ran and one.not_run and not one.verified  # the branch not taken is not proven


def test_flops_count_the_branch_taken_and_say_so():
    model = _branchy()
    inputs = _branch_inputs()
    then = convtool.separate_onnx(model, [inputs["then"]], rank=1)
    other = convtool.separate_onnx(model, [inputs["else"]], rank=1)
    assert then.branches == ("if: then_branch taken on the example inputs (the other not counted)",)
    # separated in both branches, run in one: the check says which it did not compare
    assert then.not_run == ("if/else_branch/conv",) and other.not_run == ("if/then_branch/conv",)
    assert not then.verified and then.verification.endswith("not proven and their outputs were not compared: if/else_branch/conv")
    assert other.branches == ("if: else_branch taken on the example inputs (the other not counted)",)
    assert then.flops_before == 6 * 9 * 9 * 4 * 3 * 3  # its conv only (ReduceSum counts zero)
    assert other.flops_before == 6 * 3 * 3 * 4 * 5 * 5  # a 5x5 conv, stride 2, on 9x9
    assert then.flops_after == 9 * 9 * (4 * 3 * 3 + 4 * 6)
