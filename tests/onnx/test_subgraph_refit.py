"""Calibration refits the pairs inside If branches and Loop bodies (issue 24), on the batches where their graph runs."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import convtool
from convtool.cli import main

RNG = np.random.default_rng(3)
M, N = 9, 4  # nine input channels of 3x3: their rank-1 depthwise filters span every 3x3 filter
MIX = RNG.uniform(0.5, 1.5, (1, M, 1, 1))  # how each channel scales the one image


def _value(name, rank=4, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, [None] * rank)


def _conv(x, w, y, name):
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1])


def _model(nodes, inits, out="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, M, 7, 7])], [_value(out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights():
    return {name: numpy_helper.from_array(RNG.standard_normal((N, M, 3, 3)).astype(np.float32), name) for name in ("w_then", "w_else", "w_loop")}


def _branchy():
    """y = If(sum(x) > 0, conv_then(x), conv_else(x)), plus a Loop in the then-branch whose body runs a conv
    three times on x scaled by the iteration number (its scan output summed)."""
    w = _weights()
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"),
         helper.make_node("Cast", ["i"], ["i_f"], name="cast", to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "i_f"], ["scaled"], name="scale"),
         _conv("scaled", "w_loop", "z", "conv")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _value("z")])
    then_graph = helper.make_graph(
        [_conv("x", "w_then", "t1", "conv"),
         helper.make_node("Constant", [], ["trips"], name="trips", value=numpy_helper.from_array(np.array(3, np.int64))),
         helper.make_node("Loop", ["trips", ""], ["zs"], name="loop", body=body),
         helper.make_node("ReduceSum", ["zs", "axis0"], ["zsum"], name="over_iterations", keepdims=0),
         helper.make_node("Add", ["t1", "zsum"], ["t2"], name="add")],
        "then", [], [_value("t2")])
    else_graph = helper.make_graph([_conv("x", "w_else", "e1", "conv")], "else", [], [_value("e1")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["positive"], name="greater"),
             helper.make_node("If", ["positive"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    inits = [*w.values(), numpy_helper.from_array(np.zeros((), np.float32), "zero"), numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    return _model(nodes, inits), w


def _one_signal(batches: int, sign: float = 1.0) -> list[torch.Tensor]:
    """Inputs whose nine channels are multiples of one image: a rank-1 pair's pointwise conv can then
    reproduce any conv exactly (least squares find it; the SVD does not)."""
    out = []
    for _ in range(batches):
        signal = np.abs(RNG.standard_normal((4, 1, 7, 7)))
        out.append(torch.from_numpy((sign * signal * MIX).astype(np.float32)))
    return out


def _run(model, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _error(model, reference, inputs) -> float:
    return float(np.mean([np.linalg.norm(_run(model, x) - (r := _run(reference, x))) / np.linalg.norm(r) for x in inputs]))


def test_pairs_in_a_branch_and_a_loop_body_are_refit_where_the_branch_runs():
    model, _ = _branchy()
    then_data = _one_signal(6)
    example = [then_data[0].numpy()]
    svd = convtool.separate_onnx(model, example, rank=1)
    refit = convtool.separate_onnx(model, example, rank=1, calibration=then_data)
    names = {"if/then_branch/conv", "if/then_branch/loop/body/conv", "if/else_branch/conv"}
    assert {layer.name for layer in refit.layers} == names
    # the else branch never ran on this data: it keeps its SVD factors, and the result says why
    assert [(s.name, s.reason) for s in refit.not_refit] == [("if/else_branch/conv", "its branch did not run on the calibration data")]
    errors = {layer.name: layer.output_error for layer in refit.layers}
    assert errors["if/else_branch/conv"] is None
    assert errors["if/then_branch/conv"] < 0.01 and errors["if/then_branch/loop/body/conv"] < 0.01  # every iteration's input fitted
    fresh = [x.numpy() for x in _one_signal(4)]
    assert _error(svd.model, model, fresh) > 0.2  # what the refit was up against
    assert _error(refit.model, model, fresh) < 0.01
    assert refit.runs[0].ran and refit.not_run == ("if/else_branch/conv",) and _standard_convs(refit.model) == []
    onnx.checker.check_model(refit.model, full_check=True)


def test_batches_taking_each_branch_refit_each_branch():
    model, _ = _branchy()
    refit = convtool.separate_onnx(model, [_one_signal(1)[0].numpy()], rank=1, calibration=_one_signal(5) + _one_signal(5, -1.0))
    assert refit.not_refit == ()
    assert all(layer.output_error < 0.01 for layer in refit.layers)
    fresh_else = [x.numpy() for x in _one_signal(3, -1.0)]
    assert _error(refit.model, model, fresh_else) < 0.01


def _alternating_loop():
    """A Loop of three iterations whose body holds an If on the iteration's parity: a conv of x on odd iterations."""
    w = numpy_helper.from_array(RNG.standard_normal((N, M, 3, 3)).astype(np.float32), "w_odd")
    inner = helper.make_node(
        "If", ["odd"], ["h"], name="inner_if",
        then_branch=helper.make_graph([_conv("x", "w_odd", "c", "conv")], "odd", [], [_value("c")]),
        else_branch=helper.make_graph([helper.make_node("Identity", ["x4"], ["c2"], name="keep")], "even", [], [_value("c2")]))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"),
         helper.make_node("Mod", ["i", "two"], ["r"], name="mod"),
         helper.make_node("Cast", ["r"], ["odd"], name="to_bool", to=TensorProto.BOOL), inner,
         helper.make_node("Add", ["acc_in", "h"], ["acc_out"], name="acc")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 _value("acc_in")], [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _value("acc_out")])
    nodes = [helper.make_node("Slice", ["x", "zero", "four", "one"], ["x4"], name="first_four"),
             helper.make_node("Mul", ["x4", "nought"], ["start"], name="start"),
             helper.make_node("Loop", ["trips", "", "start"], ["y"], name="loop", body=body)]
    inits = [w, *(numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                  (("trips", 3), ("two", 2), ("zero", [0]), ("four", [N]), ("one", [1])))]
    inits.append(numpy_helper.from_array(np.zeros((), np.float32), "nought"))
    return _model(nodes, inits)


def test_a_loop_whose_iterations_take_different_branches_keeps_its_factors_and_says_why():
    # the conv sits in an If inside the loop body, taken on odd iterations only: its values change
    # shape from one iteration to the next, so onnxruntime cannot stack them as a scan output
    model = _alternating_loop()
    data = _one_signal(4)
    result = convtool.separate_onnx(model, [data[0].numpy()], rank=1, calibration=data)
    ((name, reason),) = [(s.name, s.reason) for s in result.not_refit]
    assert name == "conv" and "could not be read out of the subgraph" in reason
    assert result.verified and result.layers[0].output_error is None


def test_the_cli_names_each_pair_not_refit_and_why(tmp_path):
    model, _ = _branchy()
    path, data = tmp_path / "branchy.onnx", tmp_path / "calibration.npy"
    onnx.save(model, str(path))
    np.save(data, torch.cat(_one_signal(4)).numpy())
    result = CliRunner().invoke(main, ["separate", str(path), "--rank", "1", "--calibration", str(data), "-o", str(tmp_path / "s.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["not_refit"] == [{"name": "if/else_branch/conv", "reason": "its branch did not run on the calibration data"}]
    assert report["not_run"] == ["if/else_branch/conv"] and report["verified"] is False
    shown = CliRunner().invoke(main, ["separate", str(path), "--rank", "1", "--calibration", str(data), "-o", str(tmp_path / "s.onnx"),
                                      "--force"])
    assert "not refit (kept as its SVD factors): if/else_branch/conv: its branch did not run on the calibration data" in shown.stdout
    assert "not run by the check (a branch its inputs did not take; give inputs that take it to check it): if/else_branch/conv" in shown.stdout


def _standard_convs(model) -> list[str]:
    from convtool.onnx.counts import node_attributes
    from convtool.onnx.probes import all_graphs

    found = []
    for graph in all_graphs(model.graph):
        for node in graph.node:
            if node.op_type == "Conv" and node_attributes(node).get("group", 1) == 1 and any(d > 1 for d in node_attributes(node).get("kernel_shape", [1])):
                found.append(node.name)
    return found


def test_a_conv_in_a_scan_body_is_refit_on_every_step():
    # a video-like input (steps, batch, channels, h, w) scanned over its first axis, a conv per step
    w = numpy_helper.from_array(RNG.standard_normal((N, M, 3, 3)).astype(np.float32), "w_step")
    body = helper.make_graph([_conv("frame", "w_step", "out", "conv")], "step", [_value("frame")], [_value("out")])
    scan = helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1, scan_output_axes=[0])
    graph = helper.make_graph([scan], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, None, M, 7, 7])], [_value("y", 5)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    clips = lambda n: [torch.stack([x, 0.5 * x, 2 * x]) for x in _one_signal(n)]  # noqa: E731 - three steps of one image each
    data = clips(4)
    svd = convtool.separate_onnx(model, [data[0].numpy()], rank=1)
    refit = convtool.separate_onnx(model, [data[0].numpy()], rank=1, calibration=data)
    assert refit.not_refit == () and refit.layers[0].output_error < 0.01
    fresh = [x.numpy() for x in clips(2)]
    assert _error(refit.model, model, fresh) < 0.01 < 0.2 < _error(svd.model, model, fresh)


def test_an_if_in_a_loop_body_is_counted_for_the_iterations_that_took_each_branch():
    # its condition is read out of every iteration: the conv ran once (iteration 1 of 0, 1, 2)
    model = _alternating_loop()
    x = _one_signal(1)[0].numpy()
    result = convtool.separate_onnx(model, [x], rank=1)
    conv = x.shape[0] * N * 7 * 7 * M * 3 * 3
    assert result.flops_before == conv
    assert "inner_if: then_branch taken 1 times and else_branch 2 times on the example inputs" in result.branches
    assert result.not_run == ()


def test_an_if_in_a_branch_is_counted_for_the_branch_its_computed_condition_takes():
    # the inner If's condition is computed from the data inside the outer branch: neither branch was counted before
    w = {name: numpy_helper.from_array(RNG.standard_normal((N, M, 3, 3)).astype(np.float32), name) for name in ("w_a", "w_b")}
    inner = helper.make_node(
        "If", ["big"], ["t"], name="inner_if",
        then_branch=helper.make_graph([_conv("x", "w_a", "a", "conv_a")], "a", [], [_value("a")]),
        else_branch=helper.make_graph([helper.make_node("Identity", ["x"], ["b0"], name="keep"),
                                       helper.make_node("Slice", ["b0", "zero", "four", "one"], ["b"], name="cut")], "b", [], [_value("b")]))
    then_graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["m"], name="max", keepdims=0),
         helper.make_node("Greater", ["m", "two"], ["big"], name="greater"), inner], "outer_then", [], [_value("t")])
    else_graph = helper.make_graph([_conv("x", "w_b", "e", "conv_b")], "outer_else", [], [_value("e")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "nought"], ["positive"], name="greater"),
             helper.make_node("If", ["positive"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    inits = [*w.values(), numpy_helper.from_array(np.zeros((), np.float32), "nought"), numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             *(numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("zero", [0]), ("four", [N]), ("one", [1])))]
    model = _model(nodes, inits)
    x = _one_signal(1)[0].numpy()
    conv = x.shape[0] * N * 7 * 7 * M * 3 * 3
    for scale, flops, taken in ((10.0, conv, "then_branch"), (0.1, 0, "else_branch")):  # max over 2, or not
        result = convtool.separate_onnx(model, [x * scale], rank=1)
        assert f"inner_if: {taken} taken on the example inputs (the other not counted)" in result.branches
        assert result.flops_before == flops
        assert ("conv_a" in result.not_run) == (taken == "else_branch") and "conv_b" in result.not_run


def test_a_loop_that_exits_early_is_counted_for_the_iterations_it_ran():
    # trip count 10, but the body's condition stops it after iterations 0 and 1: its iteration numbers tell
    w = numpy_helper.from_array(RNG.standard_normal((N, M, 3, 3)).astype(np.float32), "w_body")
    body = helper.make_graph(
        [helper.make_node("Less", ["i", "one"], ["cond_out"], name="go_on"), _conv("x", "w_body", "z", "conv")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _value("z")])
    nodes = [helper.make_node("Loop", ["trips", "yes"], ["zs"], name="loop", body=body),
             helper.make_node("ReduceSum", ["zs", "axis0"], ["y"], name="over_iterations", keepdims=0)]
    inits = [w, numpy_helper.from_array(np.array(10, np.int64), "trips"), numpy_helper.from_array(np.array(True), "yes"),
             numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    model = _model(nodes, inits)
    x = _one_signal(1)[0].numpy()
    assert _run(model, x).shape == (x.shape[0], N, 7, 7)
    result = convtool.separate_onnx(model, [x], rank=1)
    assert "loop: body counted for 2 iterations" in result.branches
    assert result.flops_before == 2 * x.shape[0] * N * 7 * 7 * M * 3 * 3
