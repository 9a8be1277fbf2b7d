"""Graphs of several inputs, non-float and state inputs (issue 24): a VAD-like graph whose convs sit in
the branches of an If on an int64 sample rate, given its inputs by name through the CLI and the library."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import convtool
from convtool import InvalidOptionError
from convtool.cli import main

RNG = np.random.default_rng(0)


def _vad():
    """input (batch, samples) float, state (2, batch, 128) float, sr () int64 -> output (batch, 1), stateN.

    The sample rate picks the branch: at 16 kHz a stride-4 front end, else a stride-2 one; both
    then a 5-tap conv over 8 channels, as a VAD's whole network sits in the branches of an If.
    """
    value = lambda name, rank: helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)  # noqa: E731
    const = lambda name, array: numpy_helper.from_array(array, name)  # noqa: E731

    def branch(label: str, stride: int):
        front = const(f"{label}_front", RNG.standard_normal((8, 1, 9)).astype(np.float32))  # one input channel: stays dense
        conv = const(f"{label}_conv", RNG.standard_normal((16, 8, 5)).astype(np.float32))
        nodes = [helper.make_node("Conv", ["wave", front.name], [f"{label}_f"], name="front", strides=[stride], pads=[4, 4]),
                 helper.make_node("Relu", [f"{label}_f"], [f"{label}_r"], name="relu"),
                 helper.make_node("Conv", [f"{label}_r", conv.name], [f"{label}_c"], name="conv", pads=[2, 2]),
                 helper.make_node("ReduceMean", [f"{label}_c"], [f"{label}_m"], name="pool", axes=[2], keepdims=0)]
        return helper.make_graph(nodes, label, [], [value(f"{label}_m", 2)], [front, conv])

    nodes = [helper.make_node("Unsqueeze", ["input", "one"], ["wave"], name="unsqueeze"),
             helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is16k"),
             helper.make_node("If", ["is16k"], ["features"], name="if", then_branch=branch("then", 4), else_branch=branch("else", 2)),
             helper.make_node("MatMul", ["features", "project"], ["h"], name="project"),
             helper.make_node("Add", ["state", "h"], ["stateN"], name="update"),
             helper.make_node("ReduceSum", ["h", "one"], ["logit"], name="logit", keepdims=1),
             helper.make_node("Sigmoid", ["logit"], ["output"], name="sigmoid")]
    inits = [const("one", np.array([1], np.int64)), const("rate16k", np.array(16000, np.int64)),
             const("project", RNG.standard_normal((16, 128)).astype(np.float32))]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 128]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [value("output", 2), value("stateN", 3)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("rate,taken", [(16000, "then_branch"), (8000, "else_branch")])
def test_named_shapes_and_a_sample_rate_through_the_cli(tmp_path, rate, taken):
    path, out = tmp_path / "vad.onnx", tmp_path / "vad.separated.onnx"
    onnx.save(_vad(), str(path))
    result = _cli("separate", path, "--rank", "full", "--input-shape", "input=1,512", "--input-shape", "state=2,1,128",
                  "--input-value", f"sr={rate}", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert f"if: {taken} taken on the example inputs" in " ".join(report["counted"])
    # the branch not taken is separated but not run: not proven, and said so
    assert report["verified"] is False and len(report["not_run"]) == 1 and report["fidelity"]["relative_error"] < 1e-5
    assert sorted(layer["name"] for layer in report["layers"]) == ["if/else_branch/conv", "if/then_branch/conv"]
    feeds = {"input": RNG.standard_normal((1, 512)).astype(np.float32), "state": RNG.standard_normal((2, 1, 128)).astype(np.float32),
             "sr": np.array(rate, np.int64)}
    for got, want in zip(_run(onnx.load(str(out)), feeds), _run(onnx.load(str(path)), feeds)):
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


def test_an_input_convtool_cannot_make_is_refused_in_one_line_naming_it(tmp_path):
    path = tmp_path / "vad.onnx"
    onnx.save(_vad(), str(path))
    no_rate = _cli("separate", path, "--input-shape", "input=1,512", "--input-shape", "state=2,1,128", "-o", tmp_path / "a.onnx")
    assert no_rate.exit_code == 2
    (line,) = no_rate.output.strip().splitlines()
    assert "'sr' (int64 ()" in line and "--input-value sr=" in line and "'state'" not in line
    no_state = _cli("separate", path, "--input-shape", "input=1,512", "--input-value", "sr=16000", "-o", tmp_path / "b.onnx")
    assert no_state.exit_code == 2 and "'state' (a dynamic dimension in (2, ?, 128)" in no_state.output
    assert len(no_state.output.strip().splitlines()) == 1
    noise_for_a_rate = _cli("separate", path, "--input-shape", "input=1,512", "--input-shape", "state=2,1,128",
                            "--input-shape", "sr=1", "-o", tmp_path / "c.onnx")
    assert noise_for_a_rate.exit_code == 2 and "give its value (--input-value sr=...)" in noise_for_a_rate.output
    typo = _cli("separate", path, "--input-shape", "inptu=1,512", "-o", tmp_path / "d.onnx")
    assert typo.exit_code == 2 and "no input 'inptu'" in typo.output and "input, state, sr" in typo.output
    assert not any((tmp_path / f"{n}.onnx").exists() for n in "abcd")
    # Nothing given at all: separated, not verified, and the reason names every input it could not make.
    unrun = convtool.separate_onnx(_vad(), rank=1)
    assert not unrun.verified and all(f"'{n}'" in unrun.verification for n in ("input", "state", "sr"))


def test_calibration_by_name_gives_every_input_and_a_state_goes_whole(tmp_path):
    path, data = tmp_path / "vad.onnx", tmp_path / "calibration.npz"
    onnx.save(_vad(), str(path))
    np.savez(data, input=RNG.standard_normal((12, 512)).astype(np.float32), state=np.zeros((2, 1, 128), np.float32))
    result = _cli("separate", path, "--rank", "2", "--calibration", data, "--input-shape", "input=1,512",
                  "--input-shape", "state=2,1,128", "--input-value", "sr=16000", "-o", tmp_path / "s.onnx", "--json")
    assert result.exit_code == 0, result.output
    # at 16 kHz the then-branch runs: its convs are refit, the other branch's say why not
    report = json.loads(result.stdout)
    assert report["not_refit"] == [{"name": f"if/else_branch/{conv}", "reason": "its branch did not run on the calibration data"}
                                   for conv in ("conv",)]  # the front end, of one input channel, stays dense
    assert report["verified"] is False and report["not_run"] == ["if/else_branch/conv"]
    model = _vad()
    fixed = {"input": (1, 512), "state": (2, 1, 128), "sr": 8000}
    calibration = {"input": RNG.standard_normal((6, 512)).astype(np.float32), "state": np.zeros((2, 1, 128), np.float32)}
    from convtool.onnx.feeds import calibration_feeds, given_values

    batches = calibration_feeds(calibration, model, given_values(model, fixed), batch=1)
    assert len(batches) == 6 and [b.shape for b in batches[0]] == [(1, 512), (2, 1, 128), ()]
    assert all(int(b[2]) == 8000 for b in batches)
    with pytest.raises(InvalidOptionError, match="nothing for input 'sr'"):
        calibration_feeds(calibration, model, {})


def test_inputs_by_name_or_position_in_the_library():
    model = _vad()
    x = RNG.standard_normal((1, 512)).astype(np.float32)
    by_name = convtool.separate_onnx(model, {"sr": 16000, "input": x, "state": (2, 1, 128)}, rank="full")
    by_position = convtool.separate_onnx(model, [x, np.zeros((2, 1, 128), np.float32), np.int64(16000)], rank="full")
    assert by_name.runs[0].ran and by_position.runs[0].ran and by_name.flops_before == by_position.flops_before
    assert by_name.not_run == by_position.not_run == ("if/else_branch/conv",)
    with pytest.raises(InvalidOptionError, match="takes 3 inputs \\(input, state, sr\\) but 1 were given"):
        convtool.separate_onnx(model, [x])
