"""`convtool separate --int8` (issue 37): plans in int8, writes the int8 file beside the fp32 one, reports both ratios.

Layer timings are the suite's stand-in (tests/conftest.py, int8 twin included); the whole
files are really quantized, judged and timed on onnxruntime CPU, so the report's figures are
checked against what the comparison measured, not against fixed numbers.
"""

import json

import numpy as np
import onnx
import pytest

from convtool.deploy import int8_compare

from .test_cli import arch, digest, project, run  # noqa: F401  (project is a fixture)


@pytest.fixture
def images(project):
    path = project / "images.npy"
    np.save(path, np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    return path


@pytest.fixture
def timed(monkeypatch):
    """The four files' interleaved medians, as compare_int8's one timing call returned them."""
    calls = []
    real = int8_compare.time_sessions

    def recording(sessions, inputs, runs, warmup):
        calls.append(real(sessions, inputs, runs, warmup))
        return calls[-1]

    monkeypatch.setattr(int8_compare, "time_sessions", recording)
    return calls


def one_line(result) -> str:
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    return result.stderr


def test_int8_writes_the_int8_file_and_reports_both_ratios_from_one_interleaved_run(project, images, timed):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", "--rank", "2",
                 "--int8", "--calibration", images, "--onnx", project / "s.onnx", "--providers", "cpu",
                 "--report", project / "r.json", "-o", project / "s.pt")
    assert result.exit_code == 0, result.output
    int8 = json.loads((project / "r.json").read_text())["int8"]
    assert int8["path"] == str(project / "s.int8.onnx") and (project / "s.int8.onnx").exists()
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(project / "s.int8.onnx")).graph.node)
    fp32_convs = [n for n in onnx.load(str(project / "s.onnx")).graph.node if n.op_type == "Conv"]
    assert int8["int8_convs"] == len(fp32_convs) and int8["float_convs"] == []  # every conv of the file runs in int8
    assert int8["calibration_samples"] == 30 and int8["held_out"] == 10  # a quarter held out, never calibrated on
    (original, dense, fp32, quantized), = timed
    assert (int8["original_ms"], int8["dense_int8_ms"], int8["fp32_ms"], int8["int8_ms"]) == (original, dense, fp32, quantized)
    assert int8["vs_original"] == quantized / original and int8["vs_dense_int8"] == quantized / dense
    for key in ("int8", "fp32", "dense_int8"):
        assert int8[key]["sqnr_db"] > 10 and 0 <= int8[key]["top1_agreement"] <= 1
    shown = " ".join((result.output + result.stderr).split())  # the terminal table wraps lines
    assert f"{int8['vs_dense_int8']:.3f} of the dense int8 model's" in shown
    assert "Against the fp32 original on 10 held-out samples: separated int8: SQNR" in shown


def test_an_onnx_model_gets_its_int8_file_beside_the_output(project, images, timed):
    import torch

    import convtool

    namespace: dict = {}
    exec((project / "archs.py").read_text(), namespace)
    convtool.export_onnx(namespace["small"]().eval(), torch.randn(1, 3, 16, 16), project / "small.onnx")
    result = run("separate", project / "small.onnx", "--rank", "2", "--int8", "--calibration", images,
                 "--report", project / "r.json")
    assert result.exit_code == 0, result.output
    int8 = json.loads((project / "r.json").read_text())["int8"]
    assert int8["path"] == str(project / "small.separated.int8.onnx") and (project / "small.separated.int8.onnx").exists()
    assert len(timed) == 1 and int8["vs_dense_int8"] == timed[0][3] / timed[0][1]
    assert not list(project.glob(".*.tmp"))


def test_int8_without_calibration_is_refused_in_one_line(project):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", "--int8",
                 "--onnx", project / "s.onnx", "-o", project / "s.pt")
    assert "--int8 calibrates the int8 file on your data and verifies it on a held-out part: give --calibration" in one_line(result)
    assert not (project / "s.pt").exists() and not (project / "s.onnx").exists()


def test_int8_of_a_pytorch_model_needs_the_onnx_file_it_quantizes(project, images):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", "--int8",
                 "--calibration", images, "-o", project / "s.pt")
    assert "--int8 needs --onnx OUT.onnx" in one_line(result)


def test_too_little_calibration_data_for_a_held_out_part_is_refused(project):
    np.save(project / "few.npy", np.zeros((9, 3, 16, 16), np.float32))
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", "--int8",
                 "--calibration", project / "few.npy", "--onnx", project / "s.onnx", "-o", project / "s.pt")
    assert "holds 9 samples; int8 holds 0.25 of them out" in one_line(result)


def test_an_existing_int8_file_is_not_overwritten_without_force(project, images):
    (project / "s.int8.onnx").write_bytes(b"keep me")
    before = digest(project / "s.int8.onnx")
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", "--int8",
                 "--calibration", images, "--onnx", project / "s.onnx", "-o", project / "s.pt")
    assert result.exit_code == 2 and "s.int8.onnx" in result.stderr and "--force" in result.stderr
    assert digest(project / "s.int8.onnx") == before and not (project / "s.pt").exists()


def test_the_latency_target_help_says_its_baseline_with_int8():
    result = run("separate", "--help")
    assert "--latency-target is then of the dense int8 model" in " ".join(result.output.split())
