"""Every conv type (1-d, 3-d, transposed, subclasses, lazy) on the models of the N-d zoo, through the public API."""

import math

import pytest
import torch
from torch import nn

import convtool
from convtool import NothingToSeparateError, SeparableConv
from convtool.core.modules import CONV_TYPES

from ..helpers import assert_layers_proven, assert_outputs_close, assert_same_state, state_snapshot
from ..zoo import build
from ..zoo_nd import ZOO_ND


def _standard_convs(model: torch.nn.Module, halves: set[int]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, CONV_TYPES) and id(m) not in halves]


@pytest.mark.parametrize("entry", ZOO_ND, ids=lambda e: e.name)
def test_full_rank_reproduces_outputs_and_leaves_the_model_alone(entry):
    model, inputs = build(entry)
    lazy = entry.name == "lazy"
    snapshot, before = (None if lazy else state_snapshot(model)), repr(model)
    torch.manual_seed(1)
    result = convtool.separate(model, inputs, rank="full")
    if lazy:  # convtool materialised its copy, not the caller's model: do that here, from the same seed
        assert any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in model.parameters())
        torch.manual_seed(1)
        with torch.no_grad():
            model(*inputs)
        before = repr(model)
    with torch.no_grad():
        out, ref = result.model(*inputs), model(*inputs)
    assert_outputs_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((out - ref).norm() / ref.norm(), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert result.layers and all(layer.weight_error < 1e-6 for layer in result.layers)
    if not lazy:
        assert_same_state(model, snapshot)
    assert repr(model) == before


@pytest.mark.parametrize("entry", ZOO_ND, ids=lambda e: e.name)
def test_rank_one_leaves_no_standard_conv_of_any_kind(entry):
    model, inputs = build(entry)
    result = convtool.separate(model, inputs, rank=1)
    with torch.no_grad():
        model(*inputs)  # materialises a lazy model, for the checks against its dense weights below
    assert result.verified and all(layer.rank == 1 for layer in result.layers)
    halves = {id(m) for p in result.model.modules() if isinstance(p, SeparableConv) for m in p.children()}
    left = set(_standard_convs(result.model, halves))
    skipped = {s.name: s.reason for s in result.skipped}
    assert left <= set(entry.stays_dense), (left, skipped)
    for name, word in entry.stays_dense.items():
        assert word in skipped[name], (name, skipped.get(name))
    with pytest.raises(NothingToSeparateError):
        convtool.separate(result.model, inputs, rank=1, exclude=list(entry.stays_dense))
    assert_layers_proven(result, model, inputs)


@pytest.mark.parametrize("entry", [e for e in ZOO_ND if e.name in ("wav2vec2", "hifigan", "unet3d", "dcgan", "deconv_output_size")],
                         ids=lambda e: e.name)
def test_flop_target_with_calibration_and_auto_order(entry):
    """deconv_output_size: a transposed conv called with output_size= is costed at the output padding it used."""
    model, inputs = build(entry)
    data = tuple(torch.cat([x] * 4) for x in inputs)
    result = convtool.separate(model, inputs, rank=convtool.FlopsTarget(0.6), order="auto",
                               calibration=data if len(data) > 1 else data[0])
    assert result.budget_met is not None and result.flops_after <= result.flops_before
    assert all(layer.output_error is not None for layer in result.layers)
    with torch.no_grad():
        out, ref = result.model(*inputs), model(*inputs)
    assert float((out - ref).norm() / ref.norm()) < 1.0


@pytest.mark.parametrize("entry", ZOO_ND, ids=lambda e: e.name)
def test_rank_one_exports_and_verifies_on_cpu(entry, tmp_path):
    model, inputs = build(entry)
    separated = convtool.separate(model, inputs, rank=1).model
    exported = convtool.export_onnx(separated, inputs, tmp_path / f"{entry.name}.onnx")
    (check,) = convtool.verify_onnx(exported, separated, inputs, providers=["cpu"], runs=1)
    assert check.passed, check.reason
    norms = [n for n, m in separated.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if entry.name in ("unet3d", "dcgan"):  # BatchNorm3d after Conv3d pairs, BatchNorm2d after transposed pairs
        assert norms and set(exported.folded_batchnorms) == set(norms), (exported.folded_batchnorms, norms)


@pytest.mark.parametrize("entry", [e for e in ZOO_ND if e.name in ("tcn", "unet3d", "hifigan")], ids=lambda e: e.name)
def test_distillation_with_features_and_energy_ranks(entry):
    model, inputs = build(entry)
    energy = convtool.separate(model, inputs, rank=convtool.Energy(0.3))  # random weights: flat spectra
    assert energy.layers and all(1 <= layer.rank for layer in energy.layers)
    student = convtool.separate(model, inputs, rank=1).model
    data = torch.cat([inputs[0]] * 4)
    with torch.no_grad():
        before = float((student(data) - model(data)).norm())
    result = convtool.distill(student, model, data, steps=6, batch_size=4, lr=1e-3, features=True)
    with torch.no_grad():
        after = float((result.student.eval()(data) - model(data)).norm())
    assert len(result.losses) == 6 and after < before


def test_fvcore_counts_every_conv_type_as_the_hand_formula():
    """fvcore's counts (what reports and budgets use) for 1-d, 3-d and transposed convs, against hand counts."""
    cases = [
        (nn.Conv1d(4, 8, 5, stride=2, padding="valid"), torch.randn(2, 4, 31)),
        (nn.Conv1d(4, 8, 5, padding="same", groups=2), torch.randn(2, 4, 31)),
        (nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1), torch.randn(1, 4, 5, 9, 9)),
        (nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1, output_padding=1, groups=2), torch.randn(2, 4, 11)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), torch.randn(1, 4, 7, 5)),
        (nn.ConvTranspose3d(4, 4, 2, stride=2, dilation=2, groups=4), torch.randn(1, 4, 3, 4, 5)),
    ]
    for conv, x in cases:
        with torch.no_grad():
            y = conv(x)
        if conv.transposed:  # every input element scatters into a kernel window of its group's outputs
            hand = x.numel() * (conv.out_channels // conv.groups) * math.prod(conv.kernel_size)
        else:
            hand = y.numel() * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
        assert convtool.analyze(conv, x).flops == hand, conv


@pytest.mark.real_timing
def test_the_latency_filter_times_1d_and_transposed_pairs_on_onnxruntime():
    """Real timings (no assertion on which layers win): every layer is separated or kept dense with the provider named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(32, 32, 9, padding=4), nn.ReLU(), nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1)).eval()
    x = torch.randn(1, 32, 256)
    result = convtool.separate(model, x, rank=1, latency_provider="cpu")
    kept = {s.name: s.reason for s in result.skipped}
    assert {layer.name for layer in result.layers} | set(kept) == {"0", "2"}
    assert all("not faster than the dense conv on CPUExecutionProvider" in kept[n] for n in kept)


class _ConvReLU(nn.Conv2d):
    """A subclass whose forward changes the conv's output in place after the call."""

    def forward(self, x):
        return torch.relu_(super().forward(x))


class _CoordConv(nn.Conv2d):
    """A subclass whose forward adds channels: a probe of its declared channels fails."""

    def __init__(self, cin, cout, k):
        super().__init__(cin + 2, cout, k, padding=1)

    def forward(self, x):
        n, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(n, 1, h, w)
        return super().forward(torch.cat([x, ys, xs], 1))


def test_subclasses_the_probe_cannot_vouch_for_stay_dense_and_exclude_reaches_padded_ones():
    from .. import zoo_nd

    torch.manual_seed(0)
    model = nn.Sequential(_ConvReLU(3, 8, 3, padding=1), _CoordConv(8, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    result = convtool.separate(model, x, rank="full")
    assert [layer.name for layer in result.layers] == ["2"]
    skipped = dict(result.skipped)
    assert "overrides Conv2d's forward" in skipped["0"] and "overrides Conv2d's forward" in skipped["1"]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)
    same = nn.Sequential(zoo_nd.Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), zoo_nd.Conv2dSame(8, 8, 3)).eval()
    kept = convtool.separate(same, torch.randn(1, 3, 11, 10), rank=1, exclude=["0"])
    assert [layer.name for layer in kept.layers] == ["2.conv"]
