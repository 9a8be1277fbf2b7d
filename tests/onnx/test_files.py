"""The files the ONNX path writes for onnxruntime and the checker, and a model read from a file held once."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import convtool
from convtool.onnx.files import write_with_weights_beside

RNG = np.random.default_rng(0)


def _model():
    big = numpy_helper.from_array(RNG.standard_normal((16, 8, 3, 3)).astype(np.float32), "w")  # over the threshold
    small = numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "b")
    as_floats = helper.make_tensor("w2", TensorProto.FLOAT, [16, 16, 3, 3], RNG.standard_normal(16 * 16 * 9).tolist())  # float_data
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 10, 10])], [big, small, as_floats])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_written_beside_the_model_read_back_the_same(tmp_path):
    model = _model()
    before = model.SerializeToString()
    write_with_weights_beside(model, tmp_path / "m.onnx")
    assert model.SerializeToString() == before  # not modified
    assert (tmp_path / "m.onnx.data").stat().st_size >= 16 * 8 * 9 * 4 + 16 * 16 * 9 * 4
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    back = onnx.load(str(tmp_path / "m.onnx"))
    for a, b in zip(model.graph.initializer, back.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    x = RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)
    run = lambda source: ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    torch.testing.assert_close(torch.from_numpy(run(str(tmp_path / "m.onnx"))), torch.from_numpy(run(model.SerializeToString())))


def test_a_model_read_from_a_file_is_held_once_and_read_again_for_the_report(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    result = convtool.separate_onnx(path, rank="full")
    assert result.original is None and result.source == path  # the rewrite worked on the proto read from the file
    assert result.verified and result.relative_error < 1e-5
    report = result.report()
    assert report.before.flops == result.flops_before and report.after.flops == result.flops_after
    assert result.timed(runs=2).runs == 2
    given = onnx.load(str(path))
    copy = given.SerializeToString()
    from_proto = convtool.separate_onnx(given, rank="full")
    assert from_proto.original is given and given.SerializeToString() == copy  # a proto given is copied, never changed
    assert from_proto.flops_after == result.flops_after
