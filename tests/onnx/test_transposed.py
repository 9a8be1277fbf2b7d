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
from convtool.onnx.probes import all_graphs

RNG = np.random.default_rng(0)


def _run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _transposed_graph(dims: int, group: int = 1, bias: bool = True, relu: bool = True, **attrs):
    """x -> ConvTranspose -> Relu -> y (no Relu without ``relu``), with the output's shape declared as onnxruntime computes it."""
    channels_in, per_group_out = 16, 16 // group  # wide enough that an upsampling pair costs less than the dense conv
    weight = numpy_helper.from_array(RNG.standard_normal((channels_in, per_group_out, *[3] * dims)).astype(np.float32), "w")
    inits = [weight] + ([numpy_helper.from_array(RNG.standard_normal(per_group_out * group).astype(np.float32), "b")] if bias else [])
    x_shape = [1, channels_in, *[5] * dims]

    def build(out_shape):
        nodes = [helper.make_node("ConvTranspose", ["x", "w", *(["b"] if bias else [])], ["t" if relu else "y"], name="up", group=group, **attrs)]
        nodes += [helper.make_node("Relu", ["t"], ["y"], name="relu")] if relu else []
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


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_calibration_refits_a_transposed_pair_in_either_order_as_the_torch_path_does(tmp_path, order, dims):
    # pw-dw ends in the transposed depthwise conv: fitted as the stride-1 conv of its spread input
    torch.manual_seed(0)
    conv, up = (getattr(torch.nn, f"{kind}{dims}d") for kind in ("Conv", "ConvTranspose"))
    model = torch.nn.Sequential(conv(4, 16, 3, padding=1), torch.nn.ReLU(), up(16, 16, 3, stride=2, padding=1, output_padding=1)).eval()
    data = torch.randn(24, 4, *[6] * dims)
    path = convtool.export_onnx(model, data[:1], tmp_path / "m.onnx").path
    svd = convtool.separate_onnx(path, data[:1], rank=1, order=order)
    refit = convtool.separate_onnx(path, data[:1], rank=1, order=order, calibration=data)
    from_torch = convtool.separate(model, data[:1], rank=1, order=order, calibration=data)
    assert refit.not_refit == () and all(layer.output_error is not None for layer in refit.layers)
    with torch.no_grad():
        ref = model(data).numpy()
        torch_error = float(np.linalg.norm(from_torch.model(data).numpy() - ref) / np.linalg.norm(ref))
    error = lambda m: float(np.linalg.norm(_run(m, data.numpy()) - ref) / np.linalg.norm(ref))  # noqa: E731
    assert error(refit.model) < 0.97 * error(svd.model)
    assert error(refit.model) == pytest.approx(torch_error, rel=0.05)


@pytest.mark.parametrize("case", ["1d", "2d", "3d", "2d-grouped", "2d-no-bias"])
def test_the_refit_reads_onnx_padding_as_onnxruntime_does(case):
    # asymmetric pads and output padding torch cannot write: the error the refit claims is the one measured
    model, x = _transposed_graph(**CASES[case], relu=False)
    # channels mostly one image (white noise would leave the SVD pair optimal, and the refit with nothing to do)
    image = RNG.standard_normal((24, 1, *x.shape[2:]))
    data = (image * RNG.uniform(0.5, 1.5, (1, x.shape[1], *[1] * (x.ndim - 2))) + 0.1 * RNG.standard_normal((24, *x.shape[1:])))
    data = data.astype(np.float32)
    svd = convtool.separate_onnx(model, [x], rank=1, order="pw-dw")
    refit = convtool.separate_onnx(model, [x], rank=1, order="pw-dw", calibration=data)
    (layer,) = refit.layers
    each = lambda m: np.concatenate([_run(m, d[None]) for d in data])  # noqa: E731 - the graph takes one sample
    ref = each(model)
    error = lambda m: float(np.linalg.norm(each(m) - ref) / np.linalg.norm(ref))  # noqa: E731
    assert layer.output_error == pytest.approx(error(refit.model), rel=1e-3)
    assert error(refit.model) < 0.95 * error(svd.model)


def test_a_transposed_pair_sized_by_auto_pad_keeps_its_factors_and_says_why():
    model, x = _transposed_graph(**CASES["auto-pad"])
    data = RNG.standard_normal((8, *x.shape[1:])).astype(np.float32)
    result = convtool.separate_onnx(model, [x], rank=1, order="pw-dw", calibration=data)
    ((name, reason),) = [(s.name, s.reason) for s in result.not_refit]
    assert name == "up" and "auto_pad" in reason and result.layers[0].output_error is None
    assert result.verified
