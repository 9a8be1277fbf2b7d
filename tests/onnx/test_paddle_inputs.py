"""Calibration for the ONNX files people have (issue 35): a paddle2onnx-style input declared ``[-1, 3, ?, ?]``
(weights in Constant nodes), and calibration given as a list of numpy arrays."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convtool
from .paddle_style import initializers_to_constants

RNG = np.random.default_rng(6)


def _two_convs(batch) -> onnx.ModelProto:
    """x (batch, 3, ?, ?) -> conv 3->8 -> relu -> conv 8->8, weights as paddle2onnx writes them (Constant nodes)."""
    w1 = numpy_helper.from_array((RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((RNG.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, None, None])
    if isinstance(batch, int):  # helper.make_tensor_value_info drops a dim_value below 1: set it as paddle2onnx does
        x.type.tensor_type.shape.dim[0].dim_value = batch
    graph = helper.make_graph(nodes, "paddle", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, None, None])],
                              [w1, w2])
    model = initializers_to_constants(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("batch", [-1, "batch_size"], ids=["minus-one", "named"])  # (onnxruntime holds a declared 0 to 0)
def test_a_batch_declared_minus_one_zero_or_named_is_dynamic(batch):
    """"the ONNX model takes batches of -1: give at least -1 calibration samples" before."""
    model = _two_convs(batch)
    x = RNG.standard_normal((1, 3, 10, 12)).astype(np.float32)
    calibration = RNG.standard_normal((10, 3, 10, 12)).astype(np.float32)
    result = convtool.separate_onnx(model, [x], rank=2, calibration=calibration)
    assert result.verified and all(layer.output_error is not None for layer in result.layers)
    assert result.report().before.params == 8 * 27 + 8 * 72  # the Constant nodes' weights


@pytest.mark.parametrize("form", ["arrays", "tuples of arrays", "a generator of arrays"])
def test_calibration_batches_of_numpy_arrays(form):
    """"calibration batches must be tensors or tuples of tensors" before, though separate_onnx's docstring promises arrays."""
    model = _two_convs(-1)
    x = RNG.standard_normal((1, 3, 10, 12)).astype(np.float32)
    arrays = [RNG.standard_normal((4, 3, 10, 12)).astype(np.float32) for _ in range(3)]
    calibration = {"arrays": arrays, "tuples of arrays": [(a,) for a in arrays], "a generator of arrays": (a for a in arrays)}[form]
    result = convtool.separate_onnx(model, [x], rank=2, calibration=calibration)
    assert all(layer.output_error is not None for layer in result.layers)
