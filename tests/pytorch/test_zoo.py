"""Every feature of the separation engine, on every architecture of the zoo."""

import copy

import pytest
import torch

import convtool
from convtool import NothingToSeparateError, SeparableConv

from ..helpers import assert_layers_proven, assert_outputs_close, assert_same_state, state_snapshot
from ..zoo import ZOO, InceptionV3Like, MobileNetLike, build, randomize_batchnorm

SEPARABLE = [e for e in ZOO if e.name != "mobilenet"]


@pytest.mark.parametrize("entry", SEPARABLE, ids=lambda e: e.name)
def test_full_rank_reproduces_outputs(entry):
    model, inputs = build(entry)
    snapshot, before = state_snapshot(model), repr(model)
    result = convtool.separate(model, inputs, rank="full")
    with torch.no_grad():
        assert_outputs_close(result.model(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    assert result.layers and all(layer.weight_error < 1e-6 for layer in result.layers)
    assert_same_state(model, snapshot)
    assert repr(model) == before


@pytest.mark.parametrize("entry", SEPARABLE, ids=lambda e: e.name)
def test_rank_one_leaves_no_standard_conv(entry):
    model, inputs = build(entry)
    result = convtool.separate(model, inputs, rank=1)
    assert all(layer.rank == 1 for layer in result.layers)
    # Separating the result again finds nothing left that could be separated.
    with pytest.raises(NothingToSeparateError):
        convtool.separate(result.model, inputs, rank=1, exclude=list(entry.stays_dense))
    skipped = {s.name: s.reason for s in result.skipped}
    for name, word in entry.stays_dense.items():
        assert word in skipped[name], (name, skipped.get(name))
    untraced = {name for name, reason in skipped.items() if "fx cannot trace" in reason}
    assert untraced == set(entry.untraced)  # a part fx cannot trace is reported only where it leaves a conv dense
    with torch.no_grad():
        out, ref = result.model(*inputs), model(*inputs)
    assert torch.utils._pytree.tree_structure(out) == torch.utils._pytree.tree_structure(ref)
    assert result.verified
    assert_layers_proven(result, model, inputs)


@pytest.mark.parametrize("entry", SEPARABLE, ids=lambda e: e.name)
def test_rank_one_pays_for_every_layer_it_can(entry):
    model, inputs = build(entry)
    result = convtool.separate(model, inputs, rank=1)
    after = sum(p.numel() for p in result.model.parameters())
    assert after < sum(p.numel() for p in model.parameters())
    for layer in result.layers:
        m, n, (kh, kw) = layer.in_channels, layer.out_channels, layer.kernel_size
        bias = layer.params_before - n * (m // layer.groups) * kh * kw
        assert layer.params_after == m * kh * kw + n * (m // layer.groups) + bias


def test_mobilenet_stem_is_the_only_standard_conv():
    model = MobileNetLike(stem=True).eval()
    result = convtool.separate(model, torch.randn(1, 3, 32, 32))
    assert [layer.name for layer in result.layers] == ["features.0.0"]
    reasons = {s.reason for s in result.skipped}
    assert reasons == {"already depthwise", "1x1 conv: already pointwise"}, reasons


def test_mobilenet_without_standard_convs_has_nothing_to_do():
    with pytest.raises(NothingToSeparateError, match="already depthwise"):
        convtool.separate(MobileNetLike(stem=False).eval(), torch.randn(1, 3, 32, 32))


def test_training_only_branch_is_kept_and_separated():
    entry = next(e for e in ZOO if e.name == "inception")
    model, inputs = build(entry)
    model.train()
    result = convtool.separate(model, inputs, rank="full")
    assert result.model.training
    assert isinstance(result.model.aux[0], SeparableConv)
    torch.manual_seed(0)
    logits, aux = result.model(*inputs)
    ref_logits, ref_aux = model(*inputs)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-4, atol=1e-5)


def _buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


def test_a_training_only_aux_head_of_an_eval_model_is_proven_in_train_mode_and_separated():
    """inception-v3's AuxLogits runs only in train mode: on an eval-mode model it is proven by a
    train-mode pass on the working copy, whose BatchNorm statistics and modes are then restored."""
    model = randomize_batchnorm(InceptionV3Like()).eval()
    inputs = (torch.randn(2, 3, 32, 32),)
    before = _buffers(model)
    result = convtool.separate(model, inputs, rank="full")
    names = {layer.name for layer in result.layers}
    assert {"AuxLogits.conv1.conv", "stem.conv", "mixed.conv"} == names, result.skipped
    aux = next(layer for layer in result.layers if layer.name == "AuxLogits.conv1.conv")
    assert aux.calls == 1  # proven to run, in the train-mode pass
    assert isinstance(result.model.AuxLogits.conv1.conv, SeparableConv)
    assert not any(m.training for m in result.model.modules()) and not any(m.training for m in model.modules())
    for name, value in _buffers(model).items():  # the caller's model: untouched
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    for name, value in _buffers(result.model).items():  # the separated model: statistics as they were (and num_batches_tracked)
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    teacher, student = copy.deepcopy(model).train(), copy.deepcopy(result.model).train()
    torch.manual_seed(0)
    ref_logits, ref_aux = teacher(*inputs)
    torch.manual_seed(0)
    logits, aux_out = student(*inputs)
    torch.testing.assert_close(aux_out, ref_aux, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_a_training_only_conv_that_cannot_run_in_train_mode_says_what_to_give():
    model = randomize_batchnorm(InceptionV3Like()).eval()
    result = convtool.separate(model, torch.randn(1, 3, 32, 32), rank=1)  # one value per channel for the aux BatchNorm
    reasons = {s.name: s.reason for s in result.skipped}
    assert "AuxLogits.conv1.conv" not in {layer.name for layer in result.layers}
    assert "pass in train mode" in reasons["AuxLogits.conv1.conv"] and "a batch of 2 or more" in reasons["AuxLogits.conv1.conv"]
    assert not any(m.training for m in result.model.modules())


def test_reused_conv_is_separated_once_and_stays_shared():
    entry = next(e for e in ZOO if e.name == "reused")
    model, inputs = build(entry)
    result = convtool.separate(model, inputs, rank=2)
    assert [layer.name for layer in result.layers] == ["stem", "body"]
    assert result.model.body is result.model.alias
    assert isinstance(result.model.body, SeparableConv)


def test_functional_convs_become_named_pairs():
    entry = next(e for e in ZOO if e.name == "functional")
    model, inputs = build(entry)
    result = convtool.separate(model, inputs, rank="full")
    names = sorted(layer.name for layer in result.layers)
    # One weight at two dilations is one layer with two pairs sharing factors; a pair takes its weight's name.
    assert names == ["shared", "stem_weight"]
    shared = next(layer for layer in result.layers if layer.name == "shared")
    assert shared.calls == 2 and len(shared.aliases) == 1
    first, second = result.model.get_submodule(shared.name), result.model.get_submodule(shared.aliases[0])
    assert first.depthwise.weight is second.depthwise.weight and first.dilation != second.dilation
    assert all(layer.source == "function" for layer in result.layers)
    assert isinstance(result.model.stem_weight, SeparableConv)
    assert "stem_bias" not in dict(result.model.named_parameters())


def test_untraceable_model_keeps_its_class_and_control_flow():
    entry = next(e for e in ZOO if e.name == "refine_loop")
    model, inputs = build(entry)
    result = convtool.separate(model, inputs, rank=1)
    assert type(result.model) is type(model)
    assert isinstance(result.model.update, SeparableConv)
    assert isinstance(result.model.encoder[0], SeparableConv)
