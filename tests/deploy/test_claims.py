"""Deployment claims: a provider timed ran, the opset written is the one asked, the result is a path."""

import logging
import sys
import threading

import onnx
import pytest
import torch
from torch import nn

import convtool
from convtool import InvalidOptionError, ProviderUnavailableError


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda_provider(), reason="this onnxruntime has CUDA")
def test_timing_on_a_provider_that_cannot_run_is_refused_not_filed_under_its_name(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 8, 16, 16)
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider is not in this onnxruntime build"):
        convtool.separate(model, x, rank=1, latency_provider="cuda")
    with pytest.raises(ProviderUnavailableError, match="convtool\\[gpu\\]"):
        convtool.benchmark(model, convtool.separate(model, x).model, x, provider="cuda", runs=1, warmup=0)
    with pytest.raises(ProviderUnavailableError):
        convtool.export_onnx(convtool.separate(model, x, rank=2).model, x, tmp_path / "m.onnx", layout="measured", provider="cuda")


@pytest.mark.parametrize("opset,exporter", [(17, "torch.export"), (11, "torchscript"), (None, "torch.export")])
def test_the_opset_asked_is_the_opset_written(tmp_path, opset, exporter):
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8)
    exported = convtool.export_onnx(model, x, tmp_path / "m.onnx", opset=opset)
    written = next(o.version for o in onnx.load(exported.path).opset_import if o.domain in ("", "ai.onnx"))
    assert exported.opset == written and (opset is None or written == opset)
    assert exported.exporter == exporter
    if opset == 11:  # torch.export writes 16 and up: the fallback says why it was used
        assert "not the 11 asked" in exported.fallback_reason


@pytest.mark.parametrize("opset", [5, 0, 99, "18"])
def test_an_opset_no_exporter_writes_is_refused_before_any_work(tmp_path, opset):
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(InvalidOptionError, match="opset"):
        convtool.export_onnx(model, x, tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.other = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, d):
        return self.other(torch.relu(self.conv(d["image"]))) * d["scale"]


def test_a_model_taking_a_dict_separates_exports_and_verifies(tmp_path):
    model = DictInput().eval()
    inputs = ({"image": torch.randn(1, 3, 8, 8), "scale": torch.tensor(2.0)},)
    result = convtool.separate(model, inputs, rank="full")
    assert [layer.name for layer in result.layers] == ["conv", "other"] and result.verified
    exported = convtool.export_onnx(result.model, inputs, tmp_path / "d.onnx")
    assert exported.input_names == ("image", "scale")
    (check,) = convtool.verify_onnx(exported, result.model, inputs, providers=["cpu"], runs=1)
    assert check.passed, check.reason
    assert result.report(inputs).layers[0].calls == 1


def test_the_export_result_is_its_path_everywhere(tmp_path):
    import onnxruntime as ort

    model, x = nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), torch.randn(1, 3, 8, 8)
    exported = convtool.export_onnx(model, x, tmp_path / "m.onnx")
    assert str(exported) == str(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input"


class DataDependent(nn.Module):
    """torch.export refuses it and dumps its partial graph to stderr; TorchScript traces it."""

    def __init__(self, during=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.during = during

    def forward(self, x):
        if self.during is not None:
            self.during()
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(x) * 2


def test_export_silences_only_its_own_thread(tmp_path, capfd):
    """Another thread's logging and printing go on while an export runs; nothing stays changed after."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("convtool-test-other-thread")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    done = threading.Event()

    def other_thread():
        logger.warning("other thread logs")
        print("other thread prints", file=sys.stderr)
        done.set()

    def during_export():
        if not done.is_set():
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()

    stdout, stderr = sys.stdout, sys.stderr
    try:
        exported = convtool.export_onnx(DataDependent(during_export).eval(), torch.ones(1, 3, 8, 8), tmp_path / "m.onnx")
    finally:
        logger.removeHandler(handler)
    assert exported.exporter == "torchscript"
    assert done.is_set() and records == ["other thread logs"]
    err = capfd.readouterr().err
    assert "other thread prints" in err
    assert "def forward" not in err  # torch.export's partial graph, printed from the exporting thread
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert logging.root.manager.disable == logging.NOTSET
