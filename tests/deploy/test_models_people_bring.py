"""Export and verification on the models people have (issue 35): a batch their code fixes, pytree
outputs without key paths, a None among the outputs, and an exporter's dump kept off stdout."""

import onnx
import pytest
import torch
from torch import nn

import convtool
from convtool import ExportError

from ..zoo import ZOO, DataclassUNet, ShapeCacheDetect, build

PEOPLES = [e for e in ZOO if e.name in ("unet_dataclass", "shape_cache_detect", "recurrent_ocr")]


def _batch_dims(path):
    return [i.type.tensor_type.shape.dim[0] for i in onnx.load(str(path)).graph.input]


@pytest.mark.parametrize("entry", PEOPLES, ids=lambda e: e.name)
def test_separated_models_people_bring_export_and_verify_at_two_batches(entry, tmp_path):
    model, inputs = build(entry)
    separated = convtool.separate(model, inputs, rank=2).model
    exported = convtool.export_onnx(separated, inputs, tmp_path / "m.onnx")
    (check,) = convtool.verify_onnx(exported, separated, inputs, providers=["cpu"], runs=1)
    assert check.passed, check.reason
    assert exported.dynamic_batch and check.batch_sizes == (1, 3)


def test_a_batch_the_models_code_fixes_is_not_claimed_dynamic(tmp_path):
    """torch.export specialises the batch a shape cache compares (it wrote batch 2 and said dynamic):
    the file's inputs are read back, and the TorchScript exporter, which keeps it dynamic, used."""
    model = ShapeCacheDetect().eval()
    x = torch.randn(1, 3, 32, 32)
    exported = convtool.export_onnx(model, x, tmp_path / "det.onnx")
    assert exported.exporter == "torchscript" and "fixed batch of 2" in exported.fallback_reason
    assert exported.dynamic_batch and all(d.dim_param for d in _batch_dims(exported.path))
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=1)
    assert check.passed and check.batch_sizes == (1, 3), check.reason


def test_a_fixed_batch_is_reported_where_no_exporter_keeps_it_dynamic(tmp_path):
    model = ShapeCacheDetect().eval()
    x = torch.randn(1, 3, 32, 32)
    exported = convtool.export_onnx(model, x, tmp_path / "det.onnx", exporter="torch.export")
    assert not exported.dynamic_batch and "fixed batch of 2" in exported.fixed_batch_reason
    assert [d.dim_value for d in _batch_dims(exported.path)] == [1]  # the batch given, not the one traced
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=1)
    assert check.passed and check.batch_sizes == (1,), check.reason


def test_onnxruntimes_whole_message_is_kept(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    exported = convtool.export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "two.onnx", dynamic_batch=False)
    (check,) = convtool.verify_onnx(exported, model, torch.randn(1, 3, 8, 8), providers=["cpu"], runs=1)
    assert not check.passed and "Got: 1 Expected: 2" in check.reason  # past the message's first line


def test_outputs_registered_without_key_paths_are_named_by_position(tmp_path):
    model, inputs = build(next(e for e in ZOO if e.name == "unet_dataclass"))
    exported = convtool.export_onnx(model, inputs, tmp_path / "unet.onnx")
    assert exported.output_names == ("output_0",)
    result = convtool.separate(model, inputs, rank=1)
    report = result.report(inputs)  # "the two models' outputs cannot be compared" before
    assert report.fidelity.outputs[0].name == "[0]" and report.fidelity.relative_error > 0
    assert isinstance(result.model(*inputs), type(model(*inputs)))
    assert isinstance(DataclassUNet().eval()(*inputs).sample, torch.Tensor)


class NoneAmongOutputs(nn.Module):
    """An RT-DETR-style head: an output that is None outside training."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, None, y.mean((2, 3))


@pytest.mark.parametrize("exporter", ["torch.export", "torchscript"])
def test_a_none_among_the_outputs_is_no_output(exporter, tmp_path):
    model, x = NoneAmongOutputs().eval(), torch.randn(1, 3, 8, 8)
    exported = convtool.export_onnx(model, x, tmp_path / "none.onnx", exporter=exporter)
    assert exported.output_names == ("output_0", "output_2")
    assert [o.name for o in onnx.load(str(exported.path)).graph.output] == ["output_0", "output_2"]
    (check,) = convtool.verify_onnx(exported, model, x, providers=["cpu"], runs=1)
    assert check.passed, check.reason


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x).flatten(2)
        return torch.linalg.eigh(y @ y.transpose(1, 2))[0]


def test_an_exporters_dump_never_reaches_stdout(capfd):
    torch._C._jit_set_onnx_log_enabled(False)  # as a fresh process has it (any TorchScript export elsewhere leaves it on)
    model = Unexportable().eval()
    with pytest.raises(ExportError, match="could not export"):
        convtool.benchmark(model, model, torch.randn(1, 3, 8, 8), runs=1, warmup=0)
    out, _ = capfd.readouterr()
    assert out == ""  # 32k characters of TorchScript IR before
    assert not torch._C._jit_is_onnx_log_enabled()  # and torch's exporter log is not left on
