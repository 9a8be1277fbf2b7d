"""The forms the ONNX path keeps a model in to hold its peak memory down, and that they change nothing.

The separated proto is written with its weights beside it, dropped while onnxruntime runs and read
back; the original is checked from such a file; save_onnx writes a node and a weight at a time.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import convtool
import convtool.onnx.separate as separate_module
from convtool.errors import OnnxFileError
from convtool.onnx.files import load_onnx, read_with_weights_beside, write_proto, write_with_weights_beside
from convtool.onnx.separate import save_onnx

RNG = np.random.default_rng(0)


def _model(declared_channels: int = 16) -> onnx.ModelProto:
    """Two convs (raw, float_data and doc-string weights), an If whose branches hold a conv, metadata."""
    big = numpy_helper.from_array(RNG.standard_normal((16, 8, 3, 3)).astype(np.float32), "w")
    big.doc_string = "kept"
    small = numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "b")
    as_floats = helper.make_tensor("w2", TensorProto.FLOAT, [16, 16, 3, 3], RNG.standard_normal(16 * 16 * 9).tolist())
    branch_w = numpy_helper.from_array(RNG.standard_normal((16, 16, 3, 3)).astype(np.float32), "wb")

    def branch(name, scale):
        nodes = [helper.make_node("Conv", ["c", "wb"], [f"{name}_c"], name=f"{name}_conv", pads=[1, 1, 1, 1]),
                 helper.make_node("Mul", [f"{name}_c", f"{name}_s"], [f"{name}_y"], name=f"{name}_mul")]
        scale_t = numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s")
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [scale_t])

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceSum", ["x"], ["total"], name="sum", keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"], name="greater"),
             helper.make_node("If", ["positive"], ["d"], name="if", then_branch=branch("then", 1.0), else_branch=branch("else", -1.0)),
             helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, declared_channels, 10, 10])],
                              [big, small, as_floats, branch_w, zero], doc_string="a graph")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test", doc_string="a model")
    helper.set_model_props(model, {"author": "test"})
    return model


def test_save_writes_the_bytes_protobuf_writes(tmp_path):
    model = _model()
    save_path = tmp_path / "m.onnx"
    write_proto(model, save_path)
    assert save_path.read_bytes() == model.SerializeToString()
    separated = convtool.separate_onnx(model, rank="full")
    save_onnx(separated, tmp_path / "s.onnx")
    assert (tmp_path / "s.onnx").read_bytes() == separated.model.SerializeToString()


def test_a_model_with_fields_this_onnx_does_not_know_is_written_whole(tmp_path):
    unknown = bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 42])  # field 99, a varint 42: not in onnx.proto
    model = onnx.ModelProto()
    model.ParseFromString(_model().SerializeToString() + unknown)
    write_proto(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
    assert (tmp_path / "m.onnx").read_bytes().endswith(unknown)


@pytest.mark.parametrize("typed_lists", [False, True])
def test_weights_beside_read_back_give_the_model(tmp_path, typed_lists):
    model = _model()
    before = model.SerializeToString()
    write_with_weights_beside(model, tmp_path / "m.onnx", typed_lists=typed_lists)
    assert model.SerializeToString() == before
    back = read_with_weights_beside(tmp_path / "m.onnx")
    if not typed_lists:  # what the separation reads back: the very same proto
        assert back.SerializeToString() == before
    else:  # a float_data weight went beside as raw bytes, and comes back so
        assert not back.graph.initializer[2].float_data and back.graph.initializer[2].HasField("raw_data")
    for a, b in zip(model.graph.initializer, back.graph.initializer):
        assert (a.name, a.doc_string, list(a.dims)) == (b.name, b.doc_string, list(b.dims))
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    beside = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert beside.graph.initializer[0].doc_string == "kept"  # a weight's own fields stay with it beside too


def test_the_result_is_the_model_written_and_runs_as_verified(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    x = RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)
    result = convtool.separate_onnx(path, x, rank=2)
    assert result.runs[0].ran and result.relative_error > 0 and result.not_run  # a branch not taken: not proven
    save_onnx(result, tmp_path / "s.onnx")
    saved = onnx.load(str(tmp_path / "s.onnx"))
    assert saved == result.model
    assert {n.name for n in saved.graph.node} >= {"conv/pointwise", "conv2/pointwise"}
    assert not [i for i in saved.graph.initializer if i.name in ("w", "w2") or i.data_location == TensorProto.EXTERNAL]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    want, got = run(onnx.load(str(path))), run(saved)
    assert np.abs(got - want).max() == pytest.approx(result.max_abs_error, rel=1e-4)  # the file is the model verified


def test_verification_still_catches_a_wrong_graph_and_a_dead_node(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    x = RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)
    assert convtool.separate_onnx(path, x, rank="full").relative_error < 1e-5
    install = separate_module.install_pairs

    def spoiled(model, *args):  # a wrong weight in the rewrite
        layers, outputs, created = install(model, *args)
        weight = next(i for i in model.graph.initializer if i.name.startswith("conv2/pointwise"))
        weight.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(weight), weight.name))
        return layers, outputs, created

    monkeypatch.setattr(separate_module, "install_pairs", spoiled)
    wrong = convtool.separate_onnx(path, x, rank="full")
    assert wrong.relative_error > 0.1  # run and compared: the error shows

    def dangling(model, *args):  # a new node whose output nothing reads
        layers, outputs, created = install(model, *args)
        model.graph.node.append(helper.make_node("Relu", ["c"], ["unused"], name="conv/stray"))
        return layers, outputs, created | {"conv/stray"}

    monkeypatch.setattr(separate_module, "install_pairs", dangling)
    dead = convtool.separate_onnx(path, x, rank="full")
    assert not dead.verified and "conv/stray" in dead.verification


def test_the_result_is_held_to_the_check_the_original_passes(tmp_path):
    """An original whose declared output shape the full check (shape inference) refuses: the plain check then."""
    model = _model(declared_channels=5)
    with pytest.raises(Exception):
        onnx.checker.check_model(model, full_check=True)
    onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)
    result = convtool.separate_onnx(path, x, rank="full")
    assert result.runs[0].ran and result.relative_error < 1e-5
    onnx.checker.check_model(result.model)


def test_a_file_is_read_as_onnx_reads_it(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    read = load_onnx(path)
    assert read.SerializeToString() == onnx.load(str(path)).SerializeToString() == model.SerializeToString()
    onnx.save(_model(), str(tmp_path / "e.onnx"), save_as_external_data=True, size_threshold=0, location="e.data")
    assert onnx.load(str(tmp_path / "e.onnx"), load_external_data=False).graph.initializer[0].data_location == TensorProto.EXTERNAL
    external = load_onnx(tmp_path / "e.onnx")  # its weights read from beside it, as onnx.load does
    assert external == onnx.load(str(tmp_path / "e.onnx"))
    assert not [i for i in external.graph.initializer if i.data_location == TensorProto.EXTERNAL]
    onnx.save(model, str(tmp_path / "m.textproto"))  # a text format: onnx reads it
    assert load_onnx(tmp_path / "m.textproto") == model


@pytest.mark.parametrize("cut", [1, 7, 300, -1])
def test_a_truncated_file_is_not_a_valid_model(tmp_path, cut):
    data = _model().SerializeToString()
    (tmp_path / "t.onnx").write_bytes(data[:cut])
    with pytest.raises(OnnxFileError, match="not a valid ONNX model"):
        load_onnx(tmp_path / "t.onnx")


def _messages_in(value, depth: int = 3) -> bool:
    """Whether ``value`` is, or holds (in containers and dataclasses, a few levels down), an onnx message."""
    import dataclasses

    from google.protobuf.message import Message

    if isinstance(value, Message):
        return True
    if depth == 0 or isinstance(value, (str, bytes, np.ndarray)):
        return False
    if isinstance(value, dict):
        return any(_messages_in(v, depth - 1) for v in (*value.keys(), *value.values()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_messages_in(v, depth - 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_messages_in(getattr(value, f.name), depth - 1) for f in dataclasses.fields(value))
    return False


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_rewritten_proto_is_let_go_while_onnxruntime_runs(tmp_path, monkeypatch, calibrated):
    """protobuf frees a message only when no part of it is referenced: nothing of it may stay in reach."""
    import sys

    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    x = RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)
    read_back = separate_module.read_with_weights_beside
    held = []

    def watched(*args):  # called right after the sessions: what the separation still holds
        # The original's record holds no part of the rewritten proto: a file's path, and its inputs' declarations.
        held.extend(name for name, value in sys._getframe(1).f_locals.items() if name != "original" and _messages_in(value))
        return read_back(*args)

    monkeypatch.setattr(separate_module, "read_with_weights_beside", watched)
    result = convtool.separate_onnx(path, x, rank=2, calibration=RNG.standard_normal((4, 8, 10, 10)).astype(np.float32) if calibrated else None)
    assert result.runs[0].ran and not held


def test_the_scopes_of_a_model_are_freed_without_the_garbage_collector():
    """A reference cycle around the scopes (a recursive closure made one) kept the whole proto until
    the collector next ran: a resident copy of the model through onnxruntime's sessions."""
    import gc
    import weakref

    from convtool.onnx.sites import model_scopes

    gc.disable()
    try:
        scopes = model_scopes(_model())
        first = weakref.ref(scopes[0])
        del scopes
        assert first() is None
    finally:
        gc.enable()
