"""Every form of the forms zoo: exact at full rank, and at rank 1 every reported layer proven by the test itself."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import convtool
from convtool import SeparableConv

from ..forms import FORMS, Form, build_form
from ..helpers import (
    assert_layers_proven,
    assert_outputs_close,
    assert_same_state,
    eval_mode,
    module_at,
    state_snapshot,
    watch_run,
)

# Relative to the output's scale: half precisions carry 11 and 8 significant bits.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _leaves(output) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def _scale(output) -> float:
    return max(float(x.detach().abs().max()) for x in _leaves(output))


def assert_close_at(actual, expected, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    assert_outputs_close(actual, expected, rtol=tol, atol=tol * _scale(expected))


_results: dict[tuple[str, object], convtool.Separation] = {}


def separated(form: Form, rank=1) -> tuple[nn.Module, tuple, convtool.Separation]:
    """The form's model, inputs and separation, each separation computed once per run (they are frozen records)."""
    model, inputs = build_form(form)
    key = (form.name, rank)
    if key not in _results:
        _results[key] = convtool.separate(model, inputs, rank=rank)
    result = _results[key]
    return result.original, inputs, result


def form_named(name: str) -> Form:
    return next(f for f in FORMS if f.name == name)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_full_rank_reproduces_outputs(form):
    model, inputs = build_form(form)
    snapshot, before = state_snapshot(model), repr(model)
    result = convtool.separate(model, inputs, rank="full")
    assert_same_state(model, snapshot)
    assert repr(model) == before
    assert result.verified and result.layers
    assert result.model.training == form.train and model.training == form.train
    with eval_mode(model), eval_mode(result.model), torch.no_grad():
        expected = model(*inputs)
        actual = result.model(*inputs)
    assert all(x.dtype == form.dtype for x in _leaves(actual))
    assert_close_at(actual, expected, form.dtype)
    assert_same_state(model, snapshot)
    assert repr(model) == before


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_rank_one_layers_are_proven(form):
    model, inputs, result = separated(form)
    assert result.verified
    run = assert_layers_proven(result, model, inputs)
    # The rewrite took effect: random weights are not rank 1, so the output moves.
    with eval_mode(model), torch.no_grad():
        expected = model(*inputs)
    moved = max(float((a.double() - e.double()).abs().max()) for a, e in zip(_leaves(run.output), _leaves(expected)))
    assert moved > 10 * TOLERANCE[form.dtype] * _scale(expected), f"rank 1 left the output unchanged ({moved})"


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_rank_one_reports_what_the_form_allows(form):
    _, _, result = separated(form)
    layers = {layer.name: layer for layer in result.layers}
    skipped = {s.name: s.reason for s in result.skipped}
    assert sorted(layers) == sorted(form.layers), skipped
    assert not set(layers) & set(skipped), "a layer reported both separated and skipped"
    for name, word in form.skipped.items():
        assert name in skipped, (name, skipped)
        assert word in skipped[name].lower(), (name, skipped[name])
        # Left dense in the separated model, as it was.
        assert type(module_at(result.model, name)) is type(module_at(result.original, name))
    for name, expected in form.aliases.items():
        if expected:
            assert set(expected) <= set(layers[name].aliases), layers[name].aliases
        else:
            assert layers[name].aliases == ()
    for name, calls in form.calls.items():
        assert layers[name].calls == calls, (name, layers[name].calls)
    for layer in result.layers:
        assert layer.rank == 1
        # Aliases name other places than the layer's own name, each once.
        places = ["<model>" if n == "" else n for n in (layer.name, *layer.aliases)]
        assert len(set(places)) == len(places), (layer.name, layer.aliases)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_report_lists_the_separated_layers(form):
    model, inputs, result = separated(form)
    report = result.report(inputs)
    assert isinstance(report, convtool.Comparison)
    assert [layer.name for layer in report.layers] == [layer.name for layer in result.layers]
    assert report.verified is True


# Form by form: what the separated model looks like.


@pytest.mark.parametrize("name", ["list_attr", "dict_attr", "tuple_attr", "list_in_child"])
def test_plain_containers_point_at_the_pairs(name):
    _, _, result = separated(form_named(name))
    m = result.model
    if name == "list_attr":
        assert m.stages[0] is m.a and m.stages[1] is m.b
    elif name == "dict_attr":
        assert m.by_name["x"] is m.a and m.by_name["y"] is m.b
    elif name == "tuple_attr":
        assert isinstance(m.pair, tuple) and m.pair[0] is m.a and m.pair[1] is m.b
    else:
        assert m.body.order[0] is m.body.first and m.body.order[1] is m.body.second
        assert isinstance(m.body.first[0], SeparableConv)
    assert all(isinstance(module_at(m, layer.name), SeparableConv) for layer in result.layers)


@pytest.mark.parametrize("name", ["closure", "closure_setattr"])
def test_closures_are_rewired_in_the_copy_only(name):
    model, _, result = separated(form_named(name))
    (cell,) = result.model.apply_c.__closure__
    assert cell.cell_contents is result.model.c and isinstance(result.model.c, SeparableConv)
    assert model.apply_c.__closure__[0].cell_contents is model.c  # the caller's closure is untouched


@pytest.mark.parametrize("name", ["slots_holder", "closure_partial", "bound_method"])
def test_captured_conv_stays_dense_and_exact(name):
    model, inputs, result = separated(form_named(name))
    assert [layer.name for layer in result.layers] == ["a"]
    assert type(result.model.c) is nn.Conv2d
    # Only "a" changed: the captured conv's output is the dense one.
    with torch.no_grad():
        x = torch.relu(result.model.a(inputs[0]))
        run = result.model.holder.conv if name == "slots_holder" else result.model.apply_c
        reference = model.holder.conv if name == "slots_holder" else model.apply_c
        torch.testing.assert_close(run(x), reference(x))


@pytest.mark.parametrize("name", ["tied", "tied_stride"])
def test_tied_weights_are_one_layer_with_shared_factors(name):
    model, _, result = separated(form_named(name))
    (layer,) = result.layers
    assert (layer.name, layer.aliases, layer.source) == ("a", ("b",), "module")
    a, b = result.model.a, result.model.b
    assert a is not b
    assert a.depthwise.weight is b.depthwise.weight and a.pointwise.weight is b.pointwise.weight
    # Each conv keeps its own bias and stride.
    assert a.bias is not b.bias
    torch.testing.assert_close(a.bias, model.a.bias, rtol=0, atol=0)
    torch.testing.assert_close(b.bias, model.b.bias, rtol=0, atol=0)
    assert a.stride == model.a.stride and b.stride == model.b.stride
    # Factors counted once.
    assert layer.params_after == sum(p.numel() for p in {id(p): p for p in [*a.parameters(), *b.parameters()]}.values())


def test_functional_twice_is_one_pair_called_twice():
    model, inputs, result = separated(form_named("functional_twice"))
    (layer,) = result.layers
    assert (layer.name, layer.aliases, layer.source) == ("w", (), "function")
    assert isinstance(result.model.w, SeparableConv)
    assert "w" not in dict(result.model.named_parameters())
    assert watch_run(result.model, inputs, ["w"]).calls == {"w": 2}


def test_functional_dilations_share_factors():
    _, inputs, result = separated(form_named("functional_dilations"))
    (layer,) = result.layers
    assert len(layer.aliases) == 1
    first, second = result.model.get_submodule("w"), result.model.get_submodule(layer.aliases[0])
    assert first is not second and first.dilation != second.dilation
    assert first.depthwise.weight is second.depthwise.weight and first.pointwise.weight is second.pointwise.weight
    assert watch_run(result.model, inputs, ["w", layer.aliases[0]]).calls == {"w": 1, layer.aliases[0]: 1}


def test_hook_on_parent_still_runs():
    model, inputs, result = separated(form_named("hooked_parent"))
    assert all(isinstance(result.model.block[i], SeparableConv) for i in (0, 2))
    before = result.model.block.hook_calls
    result.model(*inputs)
    assert result.model.block.hook_calls == before + 1
    # And at full rank the outputs, halved by the hook on both sides, agree.
    full = convtool.separate(model, inputs, rank="full")
    with torch.no_grad():
        torch.testing.assert_close(full.model(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_hooked_convs_keep_their_hooks():
    _, _, result = separated(form_named("hooked_conv"))
    assert type(result.model.b) is nn.Conv2d and result.model.b._forward_hooks
    assert type(result.model.c) is nn.Conv2d and result.model.c._forward_pre_hooks


@pytest.mark.parametrize("form", [f for f in FORMS if f.computed], ids=lambda f: f.name)
def test_parametrized_conv_becomes_a_plain_pair(form):
    model, _, result = separated(form)
    pair = result.model.a
    assert isinstance(pair, SeparableConv)
    assert not list(pair._forward_pre_hooks.values())
    assert not torch.nn.utils.parametrize.is_parametrized(pair)
    # The caller's conv keeps its parametrization or hook.
    conv = model.a
    assert torch.nn.utils.parametrize.is_parametrized(conv, "weight") or conv._forward_pre_hooks


def test_subclass_adding_attributes_is_separated_and_overriding_one_is_not():
    _, _, result = separated(form_named("subclasses"))
    assert isinstance(result.model.labeled, SeparableConv)
    assert type(result.model.scaled).__name__ == "ScaledConv"


def test_bare_conv_becomes_a_pair():
    model, inputs, result = separated(form_named("bare_conv"))
    assert isinstance(result.model, SeparableConv)
    assert result.layers[0].name == "<model>"
    assert type(model) is nn.Conv2d


# The proof helper itself: it must catch a layer whose pair does not run, and a dense conv still running.


def test_proof_catches_a_pair_that_does_not_run():
    model, inputs, result = separated(form_named("list_attr"))
    broken = copy.deepcopy(result.model)
    broken.stages[0] = copy.deepcopy(model.a)  # the list runs a dense copy, not the pair at "a"
    with pytest.raises(AssertionError, match="did not run"):
        assert_layers_proven(dataclasses.replace(result, model=broken), model, inputs)


def test_proof_catches_a_dense_weight_still_running():
    model, inputs, result = separated(form_named("list_attr"))
    broken = copy.deepcopy(result.model)
    broken.stages.append(model.b)  # the pairs run, and so does the caller's own conv "b"
    with pytest.raises(AssertionError, match="caller's dense weight still runs"):
        assert_layers_proven(dataclasses.replace(result, model=broken), model, inputs)
    broken.stages[-1] = copy.deepcopy(model.b)  # a copy of it
    with pytest.raises(AssertionError, match="copy of the dense weight still runs"):
        assert_layers_proven(dataclasses.replace(result, model=broken), model, inputs)
