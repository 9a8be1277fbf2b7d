"""ONNX costs from the shapes of the run (issue 35): a paddle2onnx-style recogniser, a conv + LSTM + Gemm
graph of dynamic width whose shapes onnx cannot infer past a computed Reshape, weights in Constant nodes."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convtool
from convtool import FlopsTarget
from convtool.onnx.counts import count_onnx, onnx_analysis
from convtool.onnx.sites import find_sites, model_scopes, site_stats

from ..zoo import ZOO, build
from .paddle_style import initializers_to_constants

RNG = np.random.default_rng(35)
C, H, HIDDEN, CLASSES, OUT = 8, 4, 6, 50, 5


def _weight(name, *shape):
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def _recogniser() -> onnx.ModelProto:
    """x (-1, 3, H, ?) -> conv -> Reshape to its own shape, computed through floats (onnx cannot follow it) -> conv
    -> mean over H -> (W, N, C) -> LSTM -> (W*N, HIDDEN) -> Gemm -> reshape to (N, W, CLASSES), computed -> MatMul."""
    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c1"], ["c1_shape"], name="shape1"),
        helper.make_node("Cast", ["c1_shape"], ["c1_shape_f"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Floor", ["c1_shape_f"], ["c1_shape_floor"], name="floor"),
        helper.make_node("Cast", ["c1_shape_floor"], ["c1_shape_i"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Reshape", ["c1", "c1_shape_i"], ["r1"], name="reshape_computed"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c2"], ["m"], name="mean_h", axes=[2], keepdims=0),
        helper.make_node("Transpose", ["m"], ["seq"], name="to_seq", perm=[2, 0, 1]),
        helper.make_node("LSTM", ["seq", "lstm_w", "lstm_r", "lstm_b"], ["lstm_y"], name="lstm", hidden_size=HIDDEN),
        helper.make_node("Squeeze", ["lstm_y", "axis1"], ["lstm_s"], name="squeeze"),
        helper.make_node("Reshape", ["lstm_s", "rows"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
        helper.make_node("Shape", ["lstm_s"], ["s_shape"], name="shape2"),
        helper.make_node("Cast", ["s_shape"], ["s_shape_f"], name="to_float2", to=TensorProto.FLOAT),
        helper.make_node("Floor", ["s_shape_f"], ["s_shape_floor"], name="floor2"),
        helper.make_node("Cast", ["s_shape_floor"], ["s_shape_i"], name="to_int2", to=TensorProto.INT64),
        helper.make_node("Slice", ["s_shape_i", "zero", "two"], ["wn"], name="slice"),
        helper.make_node("Concat", ["wn", "classes"], ["back"], name="concat", axis=0),
        helper.make_node("Reshape", ["logits", "back"], ["per_step"], name="reshape_back"),
        helper.make_node("MatMul", ["per_step", "proj"], ["y"], name="proj"),
    ]
    inits = [_weight("w1", C, 3, 3, 3), _weight("b1", C), _weight("w2", C, C, 3, 3),
             _weight("lstm_w", 1, 4 * HIDDEN, C), _weight("lstm_r", 1, 4 * HIDDEN, HIDDEN), _weight("lstm_b", 1, 8 * HIDDEN),
             _weight("fc_w", HIDDEN, CLASSES), _weight("fc_b", CLASSES), _weight("proj", CLASSES, OUT),
             ints("axis1", [1]), ints("rows", [-1, HIDDEN]), ints("zero", [0]), ints("two", [2]), ints("classes", [CLASSES])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, H, -1])
    x.type.tensor_type.shape.dim[3].ClearField("dim_value")
    x.type.tensor_type.shape.dim[3].dim_param = "width"
    graph = helper.make_graph(nodes, "recogniser", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _expected(n: int, w: int) -> dict[str, int]:
    """The multiply-adds of each costly node, by hand, at batch n and width w."""
    return {"conv1": n * C * H * w * 3 * 9, "conv2": n * C * H * w * C * 9,
            "lstm": w * n * (4 * HIDDEN * C + 4 * HIDDEN * HIDDEN), "fc": w * n * HIDDEN * CLASSES, "proj": w * n * CLASSES * OUT}


PARAMS = C * 27 + C + C * C * 9 + 4 * HIDDEN * C + 4 * HIDDEN * HIDDEN + 8 * HIDDEN + HIDDEN * CLASSES + CLASSES + CLASSES * OUT


@pytest.mark.parametrize("weights", ["initializers", "constants"])
def test_every_node_is_counted_from_the_shapes_of_the_run(weights):
    model = _recogniser() if weights == "initializers" else initializers_to_constants(_recogniser())
    x = RNG.standard_normal((2, 3, H, 7)).astype(np.float32)
    counts = count_onnx(model, [x])
    expected = _expected(2, 7)
    assert {name: counts.nodes.get(((), out)) for name, out in
            [("conv1", "c1"), ("conv2", "c2"), ("lstm", "lstm_y"), ("fc", "logits"), ("proj", "y")]} == expected
    assert counts.flops == sum(expected.values())  # the Gemm and MatMul counted 0 before, as the conv after the Reshape did
    assert counts.params == PARAMS  # 0 before where the weights are Constant nodes
    analysis = onnx_analysis(model, [x])
    assert analysis.unsupported_ops == {"ReduceMean": 1}  # a mean over H alone: no rule, listed as fvcore lists aten::mean
    assert analysis.params == PARAMS


def test_a_conv_whose_shape_onnx_cannot_infer_is_costed_and_planned():
    """A FLOP target left conv2 dense as "did not run on the example inputs" though full rank separates it, proving it ran."""
    model = initializers_to_constants(_recogniser())
    x = RNG.standard_normal((1, 3, H, 9)).astype(np.float32)
    full = convtool.separate_onnx(model, [x], rank="full")
    assert {layer.name for layer in full.layers} == {"conv1", "conv2"} and full.verified
    half = convtool.separate_onnx(model, [x], rank=FlopsTarget(0.6))
    assert not any("did not run" in s.reason for s in half.skipped), half.skipped
    assert "conv2" in {layer.name for layer in half.layers}
    assert all(layer.flops_before for layer in half.layers)
    from convtool.onnx.sites import uncosted_reasons

    counts = count_onnx(model, [x])
    scopes = model_scopes(model)
    _, where, _ = find_sites(scopes, set(), (), ())
    assert set(site_stats(where, counts)) == {"conv1", "conv2"} and uncosted_reasons(where, counts) == {}


def test_the_report_says_its_flops_are_of_the_counted_part():
    model = initializers_to_constants(_recogniser())
    x = RNG.standard_normal((1, 3, H, 9)).astype(np.float32)
    report = convtool.separate_onnx(model, [x], rank=1).report()
    assert report.before.unsupported_ops == {"ReduceMean": 1}
    from convtool.report.render import to_dict, to_markdown

    assert "of the counted part" in to_markdown(report) and "ReduceMean x1" in to_markdown(report)
    assert to_dict(report)["unsupported_ops"]["before"] == {"ReduceMean": 1}


def test_a_recurrent_model_counts_alike_as_pytorch_and_as_onnx(tmp_path):
    """LSTM gates counted on both sides: fvcore lists aten::lstm as not counted, convtool adds its handle."""
    model, inputs = build(next(e for e in ZOO if e.name == "recurrent_ocr"))
    analysis = convtool.analyze(model, inputs)
    assert "aten::lstm" not in analysis.unsupported_ops
    lstm = model.rnn
    steps, batch = inputs[0].shape[3] // 4, inputs[0].shape[0]
    gates = sum(p.numel() for name, p in lstm.named_parameters() if name.startswith("weight"))
    assert analysis.module("rnn").flops == steps * batch * gates
    path = convtool.export_onnx(model, inputs, tmp_path / "ocr.onnx", fold_bn=False).path
    counts = count_onnx(onnx.load(str(path)), [t.numpy() for t in inputs])
    lstm_node = next(out for (_, out), flops in counts.nodes.items() if flops == analysis.module("rnn").flops)
    assert lstm_node and "LSTM" not in counts.uncounted
    folded = sum(m.flops for m in analysis.modules if m.type == "BatchNorm2d")  # torch's exporter folds eval BatchNorms
    assert counts.flops == analysis.flops - folded


def test_a_conv_in_a_branch_not_taken_says_so():
    from .test_review_subgraphs import _if_model

    from convtool.onnx.sites import uncosted_reasons

    model = _if_model()
    x = np.abs(RNG.standard_normal((1, 9, 7, 7))).astype(np.float32)  # positive: the then branch
    counts = count_onnx(model, [x])
    _, where, _ = find_sites(model_scopes(model), set(), (), ())
    reasons = uncosted_reasons(where, counts)
    assert set(site_stats(where, counts)) == {"if/then_branch/conv", "main_conv"}
    assert list(reasons) == ["if/else_branch/conv"] and "did not run" in reasons["if/else_branch/conv"]
    assert math.prod(counts.shape("c", where["if/then_branch/conv"].scope.trail)) == 4 * 7 * 7


def test_a_conv_in_a_loop_body_is_counted_with_each_iterations_own_shape():
    """A loop body slicing its input wider every iteration: shape inference knows no width; the run gives each."""
    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    body = helper.make_graph(
        [helper.make_node("Mul", ["i", "two"], ["i2"], name="double"),
         helper.make_node("Add", ["i2", "four"], ["end0"], name="plus4"),
         helper.make_node("Unsqueeze", ["end0", "axis0"], ["end"], name="as_list"),
         helper.make_node("Slice", ["x", "start", "end", "axis3"], ["part"], name="slice"),
         helper.make_node("Conv", ["part", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("ReduceSum", ["c"], ["s"], name="sum", keepdims=0),
         helper.make_node("Add", ["acc", "s"], ["acc_out"], name="accumulate"),
         helper.make_node("Identity", ["cond"], ["cond_out"], name="keep_going")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])],
        [ints("two", 2), ints("four", 4), ints("axis0", [0]), ints("start", [0]), ints("axis3", [3])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "zero"], ["total"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, 10])], [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
        [_weight("w", C, C, 3, 3), ints("trips", 3), numpy_helper.from_array(np.array(True), "go"),
         numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    x = RNG.standard_normal((1, C, H, 10)).astype(np.float32)
    counts = count_onnx(model, [x])
    trail = (("total", "body", 0),)
    assert counts.nodes[(trail, "c")] == sum(C * H * (4 + 2 * i) * C * 9 for i in range(3))
    assert counts.runs[(trail, "c")] == 3
    full = convtool.separate_onnx(model, [x], rank="full")
    assert [layer.name for layer in full.layers] == ["conv"] and full.layers[0].flops_before == counts.nodes[(trail, "c")]
