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


class ListHeld(nn.Module):
    """Conv and BatchNorm reached through a plain list: the runtime form must reach them there too."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 16, 3, padding=1)
        self.stages = [self.conv, self.bn]

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.head(torch.relu(x))


def test_the_runtime_form_reaches_modules_held_in_lists(tmp_path):
    from tests.zoo import randomize_batchnorm

    model, x = randomize_batchnorm(ListHeld()).eval(), torch.randn(1, 8, 8, 8)
    separated = convtool.separate(model, x, rank=2).model
    exported = convtool.export_onnx(separated, x, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(exported.path).graph.node]
    assert exported.branched_layers == ("conv", "head") and ops.count("Concat") == 2
    assert exported.folded_batchnorms == ("bn",) and "BatchNormalization" not in ops
    (check,) = convtool.verify_onnx(exported, separated, x, providers=["cpu"], runs=1)
    assert check.passed, check.reason


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(1, -1))


def test_a_model_that_takes_one_batch_size_is_exported_with_a_fixed_batch(tmp_path):
    model, x = FixedBatch().eval(), torch.randn(1, 3, 8, 8)
    exported = convtool.export_onnx(model, x, tmp_path / "m.onnx")
    assert not exported.dynamic_batch and "does not run at batch 2" in exported.fixed_batch_reason
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=1)
    assert check.passed and check.batch_sizes == (1,)


def test_verification_of_double_and_half_precision_models_says_what_ran(tmp_path):
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), torch.randn(1, 3, 16, 16)
    double = convtool.export_onnx(model.double().eval(), x.double(), tmp_path / "d.onnx")
    (check,) = convtool.verify_onnx(double, model, x.double(), providers=["cpu"], runs=1)
    assert not check.passed and not check.used and "cannot run" in check.reason  # no float64 Conv kernel
    half_model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).half().eval()
    half = convtool.export_onnx(half_model, x.half(), tmp_path / "h.onnx")
    (check,) = convtool.verify_onnx(half, half_model, x.half(), providers=["cpu"], runs=1)
    assert check.passed, check.reason  # float16 tolerances, not float32's


def test_a_verification_against_a_different_model_reports_no_error_figure(tmp_path):
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), torch.randn(1, 3, 8, 8)
    exported = convtool.export_onnx(model, x, tmp_path / "m.onnx")
    (check,) = convtool.verify_onnx(exported, nn.Sequential(nn.Conv2d(3, 8, 5)).eval(), x, providers=["cpu"], runs=1)
    assert not check.passed and check.max_abs_error is None and "shape" in check.reason


def test_inputs_the_model_does_not_take_give_one_line_errors(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    wrong = torch.randn(1, 5, 8, 8)
    for call in (
        lambda: convtool.separate(model, wrong),
        lambda: convtool.separate(model, torch.randn(1, 3, 8, 8), calibration=torch.randint(0, 255, (8, 3, 8, 8))),
        lambda: convtool.separate(model, calibration=[(torch.randn(4, 3, 8, 8), torch.arange(4))]),
        lambda: convtool.compare(model, model, wrong),
        lambda: convtool.export_onnx(model, wrong, tmp_path / "m.onnx"),
        lambda: convtool.verify_onnx(tmp_path / "m.onnx", model, wrong),
        lambda: convtool.distill(model, model, wrong, steps=1),
    ):
        with pytest.raises(InvalidOptionError, match="does not run on"):
            call()
    with pytest.raises(InvalidOptionError, match="cannot be compared"):
        convtool.compare(model, nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8))


class Scaled(nn.Module):
    """A second input that is not per-sample: a (C,) scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, scale):
        return self.conv(x) * scale[None, :, None, None]


def test_inputs_without_a_batch_dimension_keep_their_shape(tmp_path):
    model = Scaled().eval()
    inputs = (torch.randn(1, 3, 8, 8), torch.rand(8))
    exported = convtool.export_onnx(model, inputs, tmp_path / "s.onnx")
    assert exported.dynamic_batch and exported.fixed_batch_reason is None
    (check,) = convtool.verify_onnx(exported, model, inputs, providers=["cpu"], runs=1)
    assert check.passed and check.batch_sizes == (1, 3), check.reason


def test_verification_tolerance_follows_the_output_scale(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 16, 16) * 1000  # large outputs: float32 rounding is far above 1e-4
    exported = convtool.export_onnx(model, x, tmp_path / "m.onnx")
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=1)
    assert check.passed, check.reason
