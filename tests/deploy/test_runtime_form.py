"""The shipped form: BatchNorm folding, the branch layout, latency-aware rank choice."""

import onnx
import pytest
import torch
from torch import nn

import convtool
from convtool.pytorch import dense as separate_module  # where layers are timed
from hypothesis import given, settings
from hypothesis import strategies as st

from convtool.core.modules import BranchedSeparableConv, Conv1dAs2d, WidthOneConv2d
from convtool.deploy.runtime_form import branch_layout, fold_batchnorm

from ..helpers import assert_outputs_close
from ..zoo import ZOO, ResNetLike, build, randomize_batchnorm


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_folding_batchnorm_keeps_the_outputs(order):
    model = randomize_batchnorm(ResNetLike()).eval()
    x = torch.randn(2, 3, 32, 32)
    separated = convtool.separate(model, x, rank=2, order=order).model
    folded, names = fold_batchnorm(separated)
    assert "bn1" in names and isinstance(folded.bn1, nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), separated(x), rtol=1e-4, atol=1e-5)
    assert isinstance(separated.bn1, nn.BatchNorm2d)  # the input model is untouched


def test_batchnorm_used_twice_or_after_other_ops_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.bn(x)

    model = randomize_batchnorm(Shared()).eval()
    folded, names = fold_batchnorm(model)
    assert names == []
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("entry", [e for e in ZOO if e.name in ("vgg", "resnet", "unet", "detector", "two_inputs", "unet_dataclass",
                                                             "shape_cache_detect", "recurrent_ocr")],
                         ids=lambda e: e.name)
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_branch_layout_is_the_same_function(entry, order):
    model, inputs = build(entry)
    separated = convtool.separate(model, inputs, rank=3, order=order).model
    branched, names = branch_layout(separated)
    assert names and all(isinstance(branched.get_submodule(n) if n else branched, BranchedSeparableConv) for n in names)
    with torch.no_grad():
        assert_outputs_close(branched(*inputs), separated(*inputs), rtol=1e-4, atol=1e-5)


def test_export_ships_the_runtime_form(tmp_path):
    model = randomize_batchnorm(ResNetLike()).eval()
    x = torch.randn(1, 3, 32, 32)
    separated = convtool.separate(model, x, rank=2).model
    exported = convtool.export_onnx(separated, x, tmp_path / "m.onnx", exporter="torchscript")
    assert exported.folded_batchnorms and exported.branched_layers
    ops = [n.op_type for n in onnx.load(exported.path).graph.node]
    assert "BatchNormalization" not in ops and "Concat" in ops
    groups = {a.i for n in onnx.load(exported.path).graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"}
    plain = convtool.export_onnx(separated, x, tmp_path / "p.onnx", exporter="torchscript", fold_bn=False, layout="multiplier")
    assert not plain.folded_batchnorms and not plain.branched_layers
    for path in (exported.path, plain.path):
        (check,) = convtool.verify_onnx(path, separated, x, providers=["cpu"], runs=1)
        assert check.passed, check.reason
    assert groups  # depthwise convs are there


def test_slow_separated_forms_stay_dense(monkeypatch):
    """Options onnxruntime does not run faster than the dense conv are dropped."""
    timings = {"dense": 1.0}

    def fake_latency(module, shape, provider):
        if not isinstance(module, convtool.SeparableConv):
            return timings["dense"]
        return 0.5 if (module.order, module.rank) == ("dw-pw", 1) else 2.0

    monkeypatch.setattr(separate_module, "module_latency", fake_latency)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 16, 16, 16)
    result = convtool.separate(model, x, rank=convtool.FlopsTarget(0.9), order="auto", latency_provider="cpu")
    assert {(layer.order, layer.rank) for layer in result.layers} == {("dw-pw", 1)}
    timings["dense"] = 0.1  # now nothing beats the dense conv
    with pytest.raises(convtool.NothingToSeparateError, match="dense"):
        convtool.separate(model, x, rank=convtool.FlopsTarget(0.9), latency_provider="cpu")
    with pytest.raises(convtool.NothingToSeparateError, match="not faster than the dense conv"):
        convtool.separate(model, x, rank=convtool.Energy(0.6), latency_provider="cpu")


def test_explicit_rank_with_latency_keeps_slow_layers_dense(monkeypatch):
    fake = lambda module, shape, provider: 2.0 if isinstance(module, convtool.SeparableConv) else 1.0  # noqa: E731
    monkeypatch.setattr(separate_module, "module_latency", fake)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 16, 16, 16)
    with pytest.raises(convtool.NothingToSeparateError, match="not faster"):
        convtool.separate(model, x, rank=2, latency_provider="cpu")
    assert len(convtool.separate(model, x, rank=2).layers) == 2  # without a provider, the rank is forced


def test_measured_layout_is_the_same_function_and_exports(tmp_path):
    from convtool.deploy.runtime_form import measured_layout

    model = randomize_batchnorm(ResNetLike()).eval()
    x = torch.randn(1, 3, 32, 32)
    separated = convtool.separate(model, x, rank=2).model
    chosen, names = measured_layout(separated, x, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(chosen(x), separated(x), rtol=1e-4, atol=1e-5)
    assert all(isinstance(chosen.get_submodule(n), BranchedSeparableConv) for n in names)
    exported = convtool.export_onnx(separated, x, tmp_path / "m.onnx", exporter="torchscript", layout="measured")
    eligible = {n for n, m in separated.named_modules() if isinstance(m, convtool.SeparableConv) and m.rank > 1}
    assert set(exported.branched_layers) <= eligible  # which ones depends on this machine's timings
    (check,) = convtool.verify_onnx(exported, separated, x, providers=["cpu"], runs=1)
    assert check.passed


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 9), stride=st.integers(1, 3), dilation=st.integers(1, 2), pad=st.integers(0, 4),
    width=st.sampled_from([1, 3]), mode=st.sampled_from(["zeros", "reflect", "circular", "same"]),
    depthwise=st.booleans(), bias=st.booleans(),
)
def test_a_tall_kernel_run_wide_is_the_same_function(k, stride, dilation, pad, width, mode, depthwise, bias):
    channels = 4
    padding = "same" if mode == "same" else (pad, 0) if mode == "zeros" else (min(pad, 10), 0)
    conv = nn.Conv2d(channels, channels if depthwise else 6, (k, 1), stride=1 if mode == "same" else stride,
                     padding=padding, dilation=dilation, groups=channels if depthwise else 1, bias=bias,
                     padding_mode="zeros" if mode == "same" else mode)
    x = torch.randn(2, channels, 24, width)
    with torch.no_grad():
        torch.testing.assert_close(WidthOneConv2d(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 9), stride=st.integers(1, 3), dilation=st.integers(1, 2), pad=st.integers(0, 4),
    mode=st.sampled_from(["zeros", "reflect", "circular", "replicate", "same", "valid"]),
    depthwise=st.booleans(), bias=st.booleans(), batched=st.booleans(),
)
def test_a_1d_conv_run_as_a_row_is_the_same_function(k, stride, dilation, pad, mode, depthwise, bias, batched):
    channels = 4
    padding = mode if mode in ("same", "valid") else pad
    conv = nn.Conv1d(channels, channels if depthwise else 6, k, stride=1 if mode == "same" else stride, padding=padding,
                     dilation=dilation, groups=channels if depthwise else 1, bias=bias,
                     padding_mode="zeros" if mode in ("same", "valid") else mode)
    x = torch.randn(2, channels, 30) if batched else torch.randn(channels, 30)
    with torch.no_grad():
        torch.testing.assert_close(Conv1dAs2d(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order,rank", [("dw-pw", 1), ("dw-pw", 3), ("pw-dw", 2)])
def test_1d_pairs_ship_their_depthwise_as_rows_and_verify(tmp_path, order, rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(16, 32, 9, padding=4), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 32, 5, stride=2)).eval()
    x = torch.randn(2, 16, 200)
    separated = convtool.separate(model, x, rank=rank, order=order).model
    shipped, names = branch_layout(separated, x)
    assert set(names) == {"0", "3"}
    assert sum(isinstance(m, Conv1dAs2d) for m in shipped.modules()) == 2 * (rank if rank > 1 else 1)
    with torch.no_grad():
        torch.testing.assert_close(shipped(x), separated(x), rtol=1e-4, atol=1e-5)
    exported = convtool.export_onnx(separated, x, tmp_path / "m.onnx")
    assert set(exported.branched_layers) == {"0", "3"} and exported.folded_batchnorms == ("1",)
    (check,) = convtool.verify_onnx(exported, separated, x, providers=["cpu"], runs=1)
    assert check.passed, check.reason


class TallKernels(nn.Module):
    """A 1-D signal stored as an image of width 1, read by 15 x 1 kernels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 32, (15, 1), padding=(7, 0))
        self.b = nn.Conv2d(32, 32, (15, 1), padding=(7, 0))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("order,rank", [("dw-pw", 1), ("dw-pw", 3), ("pw-dw", 1), ("pw-dw", 3)])
def test_tall_kernels_on_width_one_ship_wide_and_verify(tmp_path, order, rank):
    torch.manual_seed(0)
    model, x = TallKernels().eval(), torch.randn(1, 16, 128, 1)
    separated = convtool.separate(model, x, rank=rank, order=order).model
    shipped, names = branch_layout(separated, x)
    assert set(names) == {"a", "b"}
    assert sum(isinstance(m, WidthOneConv2d) for m in shipped.modules()) == 2 * rank
    with torch.no_grad():
        torch.testing.assert_close(shipped(x), separated(x), rtol=1e-4, atol=1e-5)
    exported = convtool.export_onnx(separated, x, tmp_path / "m.onnx")
    assert set(exported.branched_layers) == {"a", "b"}
    (check,) = convtool.verify_onnx(exported, separated, x, providers=["cpu"], runs=1)
    assert check.passed, check.reason
    wider = torch.randn(1, 16, 128, 3)  # not width 1: nothing to gain, nothing rewritten
    assert branch_layout(separated, wider)[1] == ([] if rank == 1 else ["a", "b"])


def test_the_latency_filter_times_pairs_in_the_form_they_ship_in(monkeypatch):
    """A rank-2 pair slow with a channel multiplier but fast as branches ships as branches: keep it."""
    def fake(module, shape, provider):
        if isinstance(module, BranchedSeparableConv):
            return 0.5
        return 2.0 if isinstance(module, convtool.SeparableConv) else 1.0

    monkeypatch.setattr(separate_module, "module_latency", fake)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    result = convtool.separate(model, torch.randn(1, 16, 16, 16), rank=2, latency_provider="cpu")
    assert [(layer.name, layer.rank) for layer in result.layers] == [("0", 2)]


def test_the_latency_filter_wants_a_clear_win(monkeypatch):
    """Within timing noise of the dense conv is not faster: such a pair made whole models slower."""
    fake = lambda module, shape, provider: 0.95 if isinstance(module, convtool.SeparableConv) else 1.0  # noqa: E731
    monkeypatch.setattr(separate_module, "module_latency", fake)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    with pytest.raises(convtool.NothingToSeparateError, match="not faster"):
        convtool.separate(model, torch.randn(1, 16, 16, 16), rank=1, latency_provider="cpu")


def test_3d_pairs_keep_their_channel_multiplier_and_2d_ones_branch():
    torch.manual_seed(0)
    for conv, x, branched in ((nn.Conv3d(8, 8, 3, padding=1), torch.randn(1, 8, 4, 6, 6), False),
                              (nn.Conv2d(8, 8, 3, padding=1), torch.randn(1, 8, 6, 6), True)):
        separated = convtool.separate(nn.Sequential(conv).eval(), x, rank=2).model
        shipped, names = branch_layout(separated, x)
        assert (names == ["0"]) is branched
        with torch.no_grad():
            torch.testing.assert_close(shipped(x), separated(x), rtol=1e-4, atol=1e-5)
