"""ConvTranspose nodes from ONNX (issue 24): separated as the PyTorch path separates transposed convs,
exact at full rank in onnxruntime, counted, and left dense with a reason where the pair cannot keep an attribute."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import convtool
from convtool import NothingToSeparateError
from convtool.onnx.counts import all_graphs

RNG = np.random.default_rng(0)


def _run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _transposed_graph(dims: int, group: int = 1, bias: bool = True, **attrs):
    """x -> ConvTranspose -> Relu -> y, with the output's shape declared as onnxruntime computes it."""
    channels_in, per_group_out = 16, 16 // group  # wide enough that an upsampling pair costs less than the dense conv
    weight = numpy_helper.from_array(RNG.standard_normal((channels_in, per_group_out, *[3] * dims)).astype(np.float32), "w")
    inits = [weight] + ([numpy_helper.from_array(RNG.standard_normal(per_group_out * group).astype(np.float32), "b")] if bias else [])
    x_shape = [1, channels_in, *[5] * dims]

    def build(out_shape):
        nodes = [helper.make_node("ConvTranspose", ["x", "w", *(["b"] if bias else [])], ["t"], name="up", group=group, **attrs),
                 helper.make_node("Relu", ["t"], ["y"], name="relu")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    x = RNG.standard_normal(x_shape).astype(np.float32)
    model = build(list(_run(build(None), x).shape))
    onnx.checker.check_model(model, full_check=True)
    return model, x


CASES = {
    "1d": dict(dims=1, strides=[2], pads=[1, 0], output_padding=[1]),
    "2d": dict(dims=2, strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 2], dilations=[1, 2]),
    "3d": dict(dims=3, strides=[2, 1, 2], pads=[0, 1, 1, 1, 0, 0], output_padding=[1, 0, 0]),
    "2d-grouped": dict(dims=2, group=2, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    "2d-no-bias": dict(dims=2, bias=False, strides=[2, 2]),
    "auto-pad": dict(dims=2, strides=[2, 2], auto_pad="SAME_UPPER"),
    "output-shape": dict(dims=2, strides=[2, 2], output_shape=[10, 11]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_transposed_convs_are_exact_at_full_rank_and_leave_no_dense_one_at_rank_one(case, order):
    model, x = _transposed_graph(**CASES[case])
    expected = torch.from_numpy(_run(model, x))
    full = convtool.separate_onnx(model, [x], rank="full", order=order)
    (layer,) = full.layers
    assert layer.transposed and layer.name == "up" and full.verified, full.verification
    torch.testing.assert_close(torch.from_numpy(_run(full.model, x)), expected, rtol=1e-4, atol=1e-4)

    one = convtool.separate_onnx(model, [x], rank=1, order=order)
    weights = {i.name: numpy_helper.to_array(i) for i in one.model.graph.initializer}
    ops = [n.op_type for n in one.model.graph.node]
    assert sorted(ops) == sorted(["ConvTranspose", "Conv", "Relu"])  # every other node kept
    for node in one.model.graph.node:
        if node.op_type == "ConvTranspose":  # depthwise: one input channel per group
            w = weights[node.input[1]]
            assert next(a.i for a in node.attribute if a.name == "group") == (w.shape[0] if order == "dw-pw" else w.shape[0] // 1)
            assert w.shape[1] == 1 or order == "dw-pw"
        if node.op_type == "Conv":  # pointwise
            assert all(k == 1 for k in weights[node.input[1]].shape[2:])
    onnx.checker.check_model(one.model, full_check=True)
    assert one.flops_after < one.flops_before
    assert one.layers[0].flops_before == one.flops_before  # the Relu counts zero
    assert _run(one.model, x).shape == tuple(expected.shape)


def test_an_output_shape_with_channels_is_left_dense_with_a_reason():
    model, x = _transposed_graph(dims=2, strides=[2, 2])
    model.graph.node[0].attribute.append(helper.make_attribute("output_shape", [1, 16, 11, 11]))
    with pytest.raises(NothingToSeparateError, match="output_shape attribute names the channels too"):
        convtool.separate_onnx(model, [x], rank=1)


def test_transposed_convs_in_both_branches_of_an_if():
    w_then = numpy_helper.from_array(RNG.standard_normal((4, 6, 3, 3)).astype(np.float32), "w_then")
    w_else = numpy_helper.from_array(RNG.standard_normal((4, 6, 2, 2)).astype(np.float32), "w_else")
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * 4)  # noqa: E731
    then = helper.make_graph([helper.make_node("ConvTranspose", ["x", "w_then"], ["a"], name="up", strides=[2, 2],
                                               pads=[1, 1, 1, 1], output_padding=[1, 1])], "then", [], [value("a")])
    other = helper.make_graph([helper.make_node("ConvTranspose", ["x", "w_else"], ["b"], name="up", strides=[2, 2])],
                              "else", [], [value("b")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["positive"], name="greater"),
             helper.make_node("If", ["positive"], ["y"], name="if", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])], [value("y")],
                              [w_then, w_else, numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    x = np.abs(RNG.standard_normal((1, 4, 5, 5)).astype(np.float32))
    full = convtool.separate_onnx(model, [x], rank="full")
    assert {l.name for l in full.layers} == {"if/then_branch/up", "if/else_branch/up"}
    for feed in (x, -x):
        torch.testing.assert_close(torch.from_numpy(_run(full.model, feed)), torch.from_numpy(_run(model, feed)), rtol=1e-4, atol=1e-4)
    one = convtool.separate_onnx(model, [x], rank=1)
    dense = [n.name for g in all_graphs(one.model.graph) for n in g.node if n.op_type == "ConvTranspose"
             and next(a.i for a in n.attribute if a.name == "group") == 1]
    assert dense == [] and one.flops_after < one.flops_before
    onnx.checker.check_model(one.model, full_check=True)


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_calibration_refits_a_pair_ending_in_a_pointwise_conv_and_names_the_other(order):
    model, x = _transposed_graph(dims=2, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    data = RNG.standard_normal((16, *x.shape[1:])).astype(np.float32)
    result = convtool.separate_onnx(model, [x], rank=2, order=order, calibration=data)
    (layer,) = result.layers
    if order == "dw-pw":  # the last conv is the 1x1 Conv: least squares as for any conv
        assert result.not_refit == () and layer.output_error is not None
    else:  # the last conv is the transposed depthwise one: its SVD factors stay, and the result says so
        assert result.not_refit == ("up",) and layer.output_error is None
    assert result.verified
