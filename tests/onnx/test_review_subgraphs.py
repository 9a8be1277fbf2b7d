"""Review of the ONNX subgraph changes (issue 24): cases the first tests did not build.

Sibling If branches that write the same value name (ONNX allows it: each branch is its own
scope), and an If of opset < 11 (whose branches must agree on output shapes at load time) with
calibration.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import convtool
from convtool.onnx.counts import all_graphs, node_attributes

RNG = np.random.default_rng(5)
M, N = 9, 4
MIX = RNG.uniform(0.5, 1.5, (1, M, 1, 1))


def _value(name, rank=4):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def _conv(x, w, y, name):
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1])


def _if_model(opset=17, then_value="c", else_value="c"):
    """y = If(sum(x) > 0, relu(conv_then(x)), -conv_else(x)) and a conv in the main graph added to it."""
    then = helper.make_graph([_conv("x", "w_then", then_value, "conv"), helper.make_node("Relu", [then_value], ["o"], name="relu")],
                             "then", [], [_value("o")])
    other = helper.make_graph([_conv("x", "w_else", else_value, "conv"), helper.make_node("Neg", [else_value], ["o"], name="neg")],
                              "else", [], [_value("o")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["positive"], name="greater"),
             helper.make_node("If", ["positive"], ["b"], name="if", then_branch=then, else_branch=other),
             _conv("x", "w_main", "m", "main_conv"),
             helper.make_node("Add", ["b", "m"], ["y"], name="add")]
    inits = [numpy_helper.from_array(RNG.standard_normal((N, M, 3, 3)).astype(np.float32), w) for w in ("w_then", "w_else", "w_main")]
    inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, M, 7, 7])], [_value("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(batches, sign=1.0):
    """Channels that are multiples of one image: a rank-1 pair can match each conv exactly after the refit."""
    return [torch.from_numpy((sign * np.abs(RNG.standard_normal((4, 1, 7, 7))) * MIX).astype(np.float32)) for _ in range(batches)]


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _standard_convs(model):
    return [n.name for g in all_graphs(model.graph) for n in g.node
            if n.op_type == "Conv" and node_attributes(n).get("group", 1) == 1 and any(k > 1 for k in node_attributes(n).get("kernel_shape", [1]))]


def test_sibling_branches_writing_the_same_value_name_each_get_their_own_pair():
    # install_pairs found each conv by its output's name alone: the second branch's "c" took the
    # first's site (a KeyError since sites are consumed; before that, the other branch's weights)
    model = _if_model()
    x = _inputs(1)[0].numpy()
    full = convtool.separate_onnx(model, [x], rank="full")
    assert {layer.name for layer in full.layers} == {"if/then_branch/conv", "if/else_branch/conv", "main_conv"}
    for feed in (x, -x):  # both branches, whichever the check ran
        torch.testing.assert_close(torch.from_numpy(_run(full.model, feed)), torch.from_numpy(_run(model, feed)), rtol=1e-4, atol=1e-4)
    one = convtool.separate_onnx(model, [x], rank=1)
    assert _standard_convs(one.model) == [] and one.runs[0].ran and one.not_run == ("if/else_branch/conv",)
    onnx.checker.check_model(one.model, full_check=True)


def test_not_run_names_the_branch_not_taken_when_both_branches_write_the_same_value_name():
    model = _if_model()
    result = convtool.separate_onnx(model, [_inputs(1)[0].numpy()], rank=1)  # positive: the then branch
    assert result.not_run == ("if/else_branch/conv",)
    flops = {layer.name: layer.flops_before for layer in result.layers}
    assert flops["if/else_branch/conv"] == 0 < flops["if/then_branch/conv"]


def test_not_run_names_the_branch_not_taken_with_distinct_value_names():  # the same graph, names apart: what the test above expects
    model = _if_model(then_value="c_then", else_value="c_else")
    result = convtool.separate_onnx(model, [_inputs(1)[0].numpy()], rank=1)
    assert result.not_run == ("if/else_branch/conv",)


def test_calibration_of_an_opset_10_if_keeps_going_and_says_why_its_branches_keep_their_factors(monkeypatch):
    # If-1..10 needs its branches' outputs to agree in shape when onnxruntime loads the graph: the
    # probe's empty tensor in the branch not holding the value does not, and the load failed the
    # whole separation ("reference.onnx is not a valid ONNX model ... export it again"). The probed
    # copy is converted to opset 11 now; where onnx's converter cannot, this is what happens.
    from convtool.onnx import probes

    monkeypatch.setattr(probes, "_with_if_of_opset_11", lambda model: model)
    model = _if_model(opset=10, then_value="c_then", else_value="c_else")
    data = _inputs(4) + _inputs(4, -1.0)
    result = convtool.separate_onnx(model, [data[0].numpy()], rank=1, calibration=data)
    kept = {s.name: s.reason for s in result.not_refit}
    assert set(kept) == {"if/then_branch/conv", "if/else_branch/conv"}
    assert all("could not be read out of the subgraph" in reason for reason in kept.values())
    errors = {layer.name: layer.output_error for layer in result.layers}
    assert errors["main_conv"] is not None and errors["main_conv"] < 0.05  # the main graph's pair is still refit
    assert result.runs[0].ran and result.not_run == ("if/else_branch/conv",)


def test_calibration_refits_the_convs_in_an_opset_10_if():
    # the probed copy (only) is converted to opset 11, where branches may differ in shape
    model = _if_model(opset=10, then_value="c_then", else_value="c_else")
    data = _inputs(4) + _inputs(4, -1.0)
    result = convtool.separate_onnx(model, [data[0].numpy()], rank=1, calibration=data)
    assert result.not_refit == () and all(layer.output_error is not None for layer in result.layers)
    assert result.model.opset_import[0].version == 10 and result.runs[0].ran


def test_a_conv_in_a_loop_without_a_trip_count_is_not_said_to_have_not_run():
    # a while loop: no trip count, its condition (i < 2) computed in the body; it runs 3 times
    body = helper.make_graph(
        [helper.make_node("Less", ["i", "two"], ["cond_out"], name="cond"), _conv("x", "w", "z", "conv")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _value("z")])
    nodes = [helper.make_node("Loop", ["", "true"], ["zs"], name="loop", body=body),
             helper.make_node("ReduceSum", ["zs", "axis0"], ["y"], name="over_iterations", keepdims=0)]
    inits = [numpy_helper.from_array(RNG.standard_normal((N, M, 3, 3)).astype(np.float32), "w"),
             *(numpy_helper.from_array(np.array(v, t), n) for n, v, t in (("two", 2, np.int64), ("axis0", [0], np.int64), ("true", True, np.bool_)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, M, 7, 7])], [_value("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    x = _inputs(1)[0].numpy()
    result = convtool.separate_onnx(model, [x], rank=1)
    assert result.verified
    assert result.not_run == () and "not compared" not in result.verification
