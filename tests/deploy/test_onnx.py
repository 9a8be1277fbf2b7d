"""ONNX export and onnxruntime verification, on the CPU (CUDA checks skip without a GPU)."""

import os

import onnx
import pytest
import torch
from torch import nn

import convtool
from convtool import ExportError, OnnxFileError
from convtool.measure.onnxrt import provider_name

from ..zoo import DetectorLike, EarlyExit, TwoInputs, VGGLike, randomize_batchnorm


@pytest.fixture(scope="module")
def separated_vgg(tmp_path_factory):
    torch.manual_seed(0)
    model = VGGLike().eval()
    x = torch.randn(2, 3, 32, 32)
    separated = convtool.separate(model, x, rank=1).model
    path = tmp_path_factory.mktemp("onnx") / "vgg.onnx"
    return separated, x, convtool.export_onnx(separated, x, path)


def test_separated_model_exports_to_standard_conv_nodes(separated_vgg):
    _, _, exported = separated_vgg
    assert exported.exporter == "torch.export" and exported.fallback_reason is None
    proto = onnx.load(exported.path)
    domains = {node.domain for node in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    groups = sorted({a.i for n in convs for a in n.attribute if a.name == "group"} | {1})
    assert len(convs) == 2 * 6 and 3 in groups  # six separated layers; depthwise has group = channels
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def test_verify_on_cpu_checks_two_batch_sizes(separated_vgg):
    model, x, exported = separated_vgg
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=3)
    assert (check.provider, check.available, check.used, check.passed) == ("CPUExecutionProvider", True, True, True)
    assert check.batch_sizes == (1, 3)
    assert check.max_abs_error < 1e-4 and check.latency_ms > 0 and check.reason is None


def test_verify_against_a_different_model_fails_with_a_reason(separated_vgg):
    _, x, exported = separated_vgg
    other = VGGLike().eval()
    (check,) = convtool.verify_onnx(exported, other, x, providers=["CPUExecutionProvider"], runs=1)
    assert check.used and not check.passed and "differs" in check.reason


def test_cuda_on_a_cpu_only_install_is_reported_unavailable(separated_vgg):
    model, x, exported = separated_vgg
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    cpu, cuda = convtool.verify_onnx(exported, model, x, runs=1)
    assert cpu.passed
    assert (cuda.provider, cuda.available, cuda.used, cuda.passed) == ("CUDAExecutionProvider", False, False, False)
    assert "convtool[gpu]" in cuda.reason


def test_multi_input_tuple_output_names(tmp_path):
    model = TwoInputs().eval()
    x = (torch.randn(1, 3, 16, 16), torch.randn(1, 1, 16, 16))
    exported = convtool.export_onnx(convtool.separate(model, x).model, x, tmp_path / "two.onnx", exporter="torchscript")
    assert exported.input_names == ("input_0", "input_1")
    assert exported.output_names == ("output_0", "output_1")
    sep = convtool.separate(model, x).model
    exported = convtool.export_onnx(sep, x, tmp_path / "two.onnx")
    (check,) = convtool.verify_onnx(exported, sep, x, providers=["cpu"], runs=1)
    assert check.passed and check.batch_sizes == (1, 3)


def test_dict_outputs_keep_their_keys(tmp_path):
    model = randomize_batchnorm(DetectorLike()).eval()
    x = torch.randn(1, 3, 32, 32)
    exported = convtool.export_onnx(model, x, tmp_path / "det.onnx", exporter="torchscript")
    assert exported.output_names == ("logits_0", "logits_1", "boxes_0", "boxes_1")
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=1)
    assert check.passed, check.reason


def test_fixed_batch_is_checked_at_its_own_size(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    exported = convtool.export_onnx(model, x, tmp_path / "fixed.onnx", dynamic_batch=False, exporter="torchscript")
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=1)
    assert check.passed and check.batch_sizes == (2,)


def test_fallback_exporter_says_so(tmp_path):
    model = EarlyExit().eval()
    x = torch.randn(1, 3, 16, 16)
    exported = convtool.export_onnx(model, x, tmp_path / "exit.onnx")
    assert exported.exporter == "torchscript"
    assert "data-dependent" in exported.fallback_reason
    assert any("trace" in w.lower() or "boolean" in w.lower() for w in exported.warnings)
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=1)
    assert check.used


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10])
def test_corrupted_file_gives_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxFileError, match="not a valid ONNX model"):
        convtool.verify_onnx(path, nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8), providers=["cpu"])


def test_truncated_file_gives_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    x = torch.randn(1, 3, 8, 8)
    path = convtool.export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript").path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OnnxFileError):
        convtool.verify_onnx(path, model, x, providers=["cpu"])


def test_missing_file_and_unknown_provider(tmp_path):
    with pytest.raises(OnnxFileError, match="does not exist"):
        convtool.verify_onnx(tmp_path / "none.onnx", nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8), providers=["cpu"])
    with pytest.raises(convtool.InvalidOptionError, match="unknown provider"):
        provider_name("quantum")


class Broken(nn.Module):
    def forward(self, x):
        if x.shape[0] > 0:
            raise RuntimeError("cannot run")
        return x


def test_failed_export_leaves_an_existing_file_alone(tmp_path):
    path = tmp_path / "keep.onnx"
    path.write_bytes(b"precious")
    with pytest.raises((ExportError, convtool.InvalidOptionError)):
        convtool.export_onnx(Broken(), torch.randn(1, 3, 4, 4), path)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["keep.onnx"]


def test_benchmark_times_both_models_on_one_provider():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.randn(1, 32, 32, 32)
    result = convtool.benchmark(model, convtool.separate(model, x).model, x, runs=5, warmup=1, threads=1)
    assert result.provider == "CPUExecutionProvider"
    assert result.original_ms > 0 and result.separated_ms > 0 and result.speedup > 0


@pytest.mark.gpu
def test_cuda_provider_runs_and_matches(separated_vgg):
    model, x, exported = separated_vgg
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cuda"], runs=5)
    assert check.used and check.passed, check.reason
