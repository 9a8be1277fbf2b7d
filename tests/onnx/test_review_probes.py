"""Review of convtool.onnx.probes (issue 24): a value read out of a Loop or Scan body that already has
loop-carried values and scan outputs (given axes and directions), of nested loops, and of an If
whose branches have several outputs, comes out as onnxruntime computes it, and the node's own
outputs are unchanged."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from convtool.onnx.probes import Probe, exposed, samples

X = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)


def _v(name, rank=4):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def _scalar(name, elem):
    return helper.make_tensor_value_info(name, elem, [])


def _model(nodes, outputs, inits=(), x_rank=4):
    graph = helper.make_graph(nodes, "g", [_v("x", x_rank)], outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))


def _loop_body(prefix="", inner=None):
    """z = x * i each iteration; acc += z (loop-carried); relu(z) as an existing scan output."""
    p = prefix
    nodes = [helper.make_node("Identity", [f"{p}c_in"], [f"{p}c_out"]),
             helper.make_node("Cast", [f"{p}i"], [f"{p}i_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", f"{p}i_f"], [f"{p}z"]),
             helper.make_node("Add", [f"{p}acc_in", f"{p}z"], [f"{p}acc_out"]),
             helper.make_node("Relu", [f"{p}z"], [f"{p}r"])]
    outputs = [_scalar(f"{p}c_out", TensorProto.BOOL), _v(f"{p}acc_out"), _v(f"{p}r")]
    if inner is not None:
        nodes += [helper.make_node("Loop", ["two", "", f"{p}z"], [f"{p}inner_acc", f"{p}inner_r"], name=f"{p}inner", body=inner)]
        outputs += [_v(f"{p}inner_acc")]
    return helper.make_graph(nodes, f"{p}body", [_scalar(f"{p}i", TensorProto.INT64), _scalar(f"{p}c_in", TensorProto.BOOL), _v(f"{p}acc_in")],
                             outputs)


def test_a_loop_body_value_comes_out_after_the_existing_scan_outputs():
    nodes = [helper.make_node("Mul", ["x", "nought"], ["start"]),
             helper.make_node("Loop", ["three", "", "start"], ["acc", "rs"], name="loop", body=_loop_body())]
    model = _model(nodes, [_v("acc"), _v("rs", 5)], [numpy_helper.from_array(np.array(3, np.int64), "three"),
                                                     numpy_helper.from_array(np.zeros((), np.float32), "nought")])
    probe = Probe("z", (("acc", "body", 0),))
    copy, carried, refused = exposed(model, [probe])
    before, after = _run(model, X), _run(copy, X)
    assert refused == {} and set(before) < set(after)
    for name, value in before.items():  # the loop's own outputs as they were
        np.testing.assert_array_equal(after[name], value)
    np.testing.assert_allclose(after[carried[probe]], np.stack([X * i for i in range(3)]), rtol=1e-6)
    np.testing.assert_allclose(samples(after[carried[probe]], 4), np.concatenate([X * i for i in range(3)]), rtol=1e-6)


def test_a_value_of_a_loop_nested_in_a_loop_comes_out_of_every_iteration_of_both():
    inner = _loop_body("in_")
    nodes = [helper.make_node("Mul", ["x", "nought"], ["start"]),
             helper.make_node("Loop", ["three", "", "start"], ["acc", "rs", "inner_accs"], name="loop", body=_loop_body(inner=inner))]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("three", 3), ("two", 2))]
    model = _model(nodes, [_v("acc"), _v("rs", 5), _v("inner_accs", 5)], inits + [numpy_helper.from_array(np.zeros((), np.float32), "nought")])
    probe = Probe("in_z", (("acc", "body", 0), ("inner_acc", "body", 0)))  # in the inner body: x * j
    copy, carried, _ = exposed(model, [probe])
    before, after = _run(model, X), _run(copy, X)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    assert after[carried[probe]].shape == (3, 2, *X.shape)
    np.testing.assert_allclose(after[carried[probe]], np.stack([np.stack([X * j for j in range(2)])] * 3), rtol=1e-6)


@pytest.mark.parametrize("attrs", [{}, {"scan_output_axes": [1]}, {"scan_output_directions": [1]},
                                   {"scan_output_axes": [2], "scan_output_directions": [1]}])
def test_a_scan_body_value_comes_out_stacked_forward_on_the_first_axis_whatever_the_existing_outputs_axes(attrs):
    body = helper.make_graph([helper.make_node("Add", ["s_in", "frame"], ["s_out"]), helper.make_node("Mul", ["frame", "two_f"], ["twice"]),
                              helper.make_node("Relu", ["twice"], ["r"])],
                             "step", [_v("s_in", 3), _v("frame", 3)], [_v("s_out", 3), _v("r", 3)])
    nodes = [helper.make_node("ReduceSum", ["x", "axis0"], ["s0"], keepdims=0),
             helper.make_node("Scan", ["s0", "x"], ["s", "rs"], name="scan", body=body, num_scan_inputs=1, **attrs)]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "axis0"), numpy_helper.from_array(np.array(2, np.float32), "two_f")]
    model = _model(nodes, [_v("s", 3), _v("rs", 4)], inits)
    probe = Probe("twice", (("s", "body", 0),), rank=3)
    copy, carried, _ = exposed(model, [probe])
    before, after = _run(model, X), _run(copy, X)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    np.testing.assert_allclose(after[carried[probe]], 2 * X, rtol=1e-6)


def test_two_values_of_one_branch_of_an_if_with_several_outputs():
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Abs", ["a"], ["b"]),
                              helper.make_node("Relu", ["a"], ["o1"]), helper.make_node("Exp", ["b"], ["o2"])],
                             "then", [], [_v("o1"), _v("o2")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e1"]), helper.make_node("Sigmoid", ["x"], ["e2"])],
                              "else", [], [_v("e1"), _v("e2")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y1", "y2"], name="if", then_branch=then, else_branch=other)]
    model = _model(nodes, [_v("y1"), _v("y2")], [numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    probes = [Probe("a", (("y1", "then_branch", 0),)), Probe("b", (("y1", "then_branch", 0),)), Probe("e2", (("y1", "else_branch", 0),))]
    copy, carried, _ = exposed(model, probes)
    for x in (np.abs(X), -np.abs(X)):
        before, after = _run(model, x), _run(copy, x)
        for name, value in before.items():
            np.testing.assert_array_equal(after[name], value)
        ran_then = x.sum() > 0
        expected = {"a": -x, "b": np.abs(x)} if ran_then else {"e2": 1 / (1 + np.exp(-x))}
        for probe in probes:
            value = samples(after[carried[probe]], 4)
            if probe.value in expected:
                np.testing.assert_allclose(value, expected[probe.value], rtol=1e-5)
            else:
                assert value is None  # the branch that did not run: an empty tensor
