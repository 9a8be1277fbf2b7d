"""Every claim true: each item of the review that found convtool reporting what did not happen.

Each test reproduces the case the review reported and pins the behaviour now expected.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convtool
from convtool import InvalidOptionError, NothingToSeparateError, SeparableConv

from ..helpers import assert_layers_proven


class ThroughList(nn.Module):
    """Convs run from a plain list: replacing ``self.a`` alone changes nothing the model runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.stages = [self.a, self.b]

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


def test_convs_reached_through_a_plain_list_are_rewired_and_proven():
    model, x = ThroughList().eval(), torch.randn(1, 3, 8, 8)
    result = convtool.separate(model, x, rank=1)
    assert [layer.name for layer in result.layers] == ["a", "b"] and result.verified
    assert all(isinstance(stage, SeparableConv) for stage in result.model.stages)
    with torch.no_grad():
        assert float((result.model(x) - model(x)).abs().max()) > 1e-3  # the rewrite took effect
    assert_layers_proven(result, model, (x,))
    report = result.report(x)
    assert [layer.name for layer in report.layers] == ["a", "b"] and all(layer.calls == 1 for layer in report.layers)
    assert isinstance(model.stages[0], nn.Conv2d)  # the caller's list is untouched


class Closure(nn.Module):
    """A conv captured in a closure: deepcopy shares it with the caller unless convtool copies it."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        conv = self.c
        self.apply_c = lambda x: conv(x)

    def forward(self, x):
        return self.d(self.apply_c(x))


def test_a_conv_in_a_closure_is_rewired_in_an_independent_copy():
    model, x = Closure().eval(), torch.randn(1, 3, 8, 8)
    result = convtool.separate(model, x, rank=1)
    assert [layer.name for layer in result.layers] == ["c", "d"]
    assert_layers_proven(result, model, (x,))
    assert result.model.apply_c.__closure__[0].cell_contents is result.model.c
    assert model.apply_c.__closure__[0].cell_contents is model.c
    assert result.report(x).layers[0].calls == 1  # fvcore traces it: no caller's tensor inside


class Holder:
    """An object with __slots__: no __dict__ for convtool to follow."""

    __slots__ = ("conv",)

    def __init__(self, conv):
        self.conv = conv


class HeldConv(nn.Module):
    """A conv run through an object convtool cannot rewire."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.holder = Holder(self.c)

    def forward(self, x):
        return self.d(self.holder.conv(x))


def test_a_conv_that_cannot_be_proven_is_left_dense_with_the_reason():
    model, x = HeldConv().eval(), torch.randn(1, 3, 8, 8)
    result = convtool.separate(model, x, rank=1)
    assert [layer.name for layer in result.layers] == ["d"]
    assert "without going through the module" in dict(result.skipped)["c"]
    assert isinstance(result.model.c, nn.Conv2d)  # put back as it was
    full = convtool.separate(model, x, rank="full")
    torch.testing.assert_close(full.model(x), model(x), rtol=1e-4, atol=1e-5)


class Chained(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)

    def forward(self, x):
        y = F.conv2d(F.conv2d(x, self.w1, padding=1), self.w2, padding=1)
        return F.conv2d(F.conv2d(y, self.w, padding=1), self.w, padding=1)  # one weight twice, same settings


def test_chained_functional_convs_and_one_weight_twice():
    model, x = Chained(), torch.randn(2, 3, 8, 8)
    full = convtool.separate(model, x, rank="full")
    torch.testing.assert_close(full.model(x), model(x), rtol=1e-4, atol=1e-4)
    result = convtool.separate(model, x, rank=1, calibration=torch.randn(16, 3, 8, 8))
    layers = {layer.name: layer for layer in result.layers}
    assert sorted(layers) == ["w", "w1", "w2"]
    assert layers["w"].calls == 2 and layers["w"].aliases == ()  # one pair, called twice
    assert all(layer.output_error is not None for layer in result.layers)  # calibrated, "w" on both calls
    assert_layers_proven(result, model, (x,))


def test_a_shared_weight_is_costed_once_under_a_flop_budget():
    model, x = Chained(), torch.randn(1, 3, 16, 16)
    result = convtool.separate(model, x, rank=convtool.FlopsTarget(0.5))
    assert result.flops_before == pytest.approx(convtool.analyze(model, x).flops)
    assert result.flops_after == pytest.approx(convtool.analyze(result.model, x).flops)


class Tied(nn.Module):
    def __init__(self, stride: int = 1):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, stride=stride)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("stride", [1, 2])
def test_tied_weights_give_one_shared_pair_counted_once(stride):
    model, x = Tied(stride).eval(), torch.randn(1, 8, 8, 8)
    full = convtool.separate(model, x, rank="full")
    torch.testing.assert_close(full.model(x), model(x), rtol=1e-4, atol=1e-5)
    result = convtool.separate(model, x, rank=1)
    (layer,) = result.layers
    assert (layer.name, layer.aliases, layer.calls) == ("a", ("b",), 2)
    a, b = result.model.a, result.model.b
    assert a.depthwise.weight is b.depthwise.weight and a.pointwise.weight is b.pointwise.weight
    assert a.bias is not b.bias  # each conv keeps its own bias
    assert layer.params_before == 8 * 8 * 9 + 2 * 8 and layer.params_after == 8 * 9 + 8 * 8 + 2 * 8
    report = result.report(x)
    assert [row.name for row in report.layers] == ["a"]
    assert report.after.params == sum(p.numel() for p in result.model.parameters())


class SpectralNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 8, 3, padding=1))
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_spectral_norm_in_train_mode_is_baked_as_it_computes_in_eval():
    torch.manual_seed(0)
    model, x = SpectralNormed().train(), torch.randn(2, 4, 8, 8)
    model(x)  # a few training steps' worth of power iterations
    result = convtool.separate(model, x, rank="full")
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_old_style_weight_norm_is_baked():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        conv = torch.nn.utils.weight_norm(nn.Conv2d(4, 8, 3, padding=1))
    model, x = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 8, 3)).eval(), torch.randn(1, 4, 8, 8)
    model(x)  # the hook has computed a non-leaf weight, which deepcopy refuses
    result = convtool.separate(model, x, rank="full")
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)
    assert [layer.name for layer in result.layers] == ["0", "2"]


def test_model_on_the_meta_device_is_refused_with_what_to_do():
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).to("meta")
    with pytest.raises(InvalidOptionError, match="meta device.*load the trained weights"):
        convtool.separate(model, torch.randn(1, 3, 8, 8))


class UntracedReadsWeight(nn.Module):
    """fx cannot trace it, and its code reads the conv's weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.conv(x) * self.conv.weight.abs().mean()


def test_without_inputs_the_model_is_run_on_a_guessed_input_and_keeps_working():
    model = UntracedReadsWeight()
    result = convtool.separate(model, rank="full")  # no example inputs
    assert result.verified and "1x3x224x224" in result.verification
    x = torch.randn(1, 3, 10, 10)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)  # .weight reads the dense equivalent
    assert result.layers[0].calls == 1


def test_without_any_input_that_runs_the_result_says_unverified():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))  # only runs at 8x8
    result = convtool.separate(model, rank=1)
    assert not result.verified and "not run" in result.verification
    assert all(layer.calls is None and layer.flops_before is None for layer in result.layers)
    assert result.report(torch.randn(1, 3, 8, 8)).verified is False


def test_separable_weight_property_is_the_dense_weight_it_computes():
    torch.manual_seed(0)
    for order in ("dw-pw", "pw-dw"):
        for groups in (1, 2):
            conv = nn.Conv2d(8, 12, (3, 5), groups=groups)
            pair = SeparableConv.from_conv(conv, rank=100, order=order)
            torch.testing.assert_close(pair.weight, conv.weight, rtol=1e-5, atol=1e-6)
            low = SeparableConv.from_conv(conv, rank=1, order=order)
            x = torch.randn(1, 8, 9, 9)
            torch.testing.assert_close(
                low(x), F.conv2d(x, low.weight, low.bias, conv.stride, conv.padding, conv.dilation, groups), rtol=1e-4, atol=1e-5
            )


def test_calibration_survives_a_program_that_set_the_thread_count():
    from convtool.recovery.equations import solve_normal_equations

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        x = torch.randn(16, 321, 2000, dtype=torch.float64)
        a, b = x @ x.mT, torch.randn(16, 321, 8, dtype=torch.float64)
        solution = solve_normal_equations(a, b, ridge=0.0)  # the system whose batched LU fails in MKL
        torch.testing.assert_close(a @ solution, b, rtol=1e-8, atol=1e-8)
        model = nn.Sequential(nn.Conv2d(40, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
        data = torch.randn(64, 40, 10, 10)
        result = convtool.separate(model, data[:1], rank=convtool.FlopsTarget(0.3), order="auto", calibration=data)
        assert all(layer.output_error is not None for layer in result.layers)
    finally:
        torch.set_num_threads(threads)


def test_a_singular_system_falls_back_instead_of_failing():
    from convtool.recovery.equations import solve_normal_equations

    xx = torch.zeros(2, 3, 3, dtype=torch.float64)
    xx[0] = torch.eye(3)
    xy = torch.ones(2, 3, 1, dtype=torch.float64)
    solution = solve_normal_equations(xx, xy, ridge=0.0)
    assert torch.isfinite(solution).all()
    torch.testing.assert_close(solution[0], xy[0])


def test_energy_keeps_dense_a_layer_whose_pair_would_cost_more():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    conv = model[0]
    with torch.no_grad():  # layer 0 easy (rank 1 per slice), layer 2 random: 90% of its energy needs rank 6
        conv.weight.copy_(torch.randn(16, 8, 1, 1) * torch.randn(1, 8, 3, 3))
    result = convtool.separate(model, rank=convtool.Energy(0.9))
    assert [layer.name for layer in result.layers] == ["0"]
    reason = dict(result.skipped)["2"]
    assert "costs" in reason and "dense conv" in reason
    for layer in result.layers:
        assert layer.params_after < layer.params_before


class IntegerOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return y, y.argmax(1)


def test_distill_matches_float_outputs_only_and_refuses_when_there_are_none():
    teacher = IntegerOutput().eval()
    data = torch.randn(16, 3, 8, 8)
    student = convtool.separate(teacher, data[:1], rank=1).model
    result = convtool.distill(student, teacher, data, steps=3, batch_size=4)
    assert len(result.losses) == 3 and result.model is result.student

    class OnlyIndices(IntegerOutput):
        def forward(self, x):
            return self.conv(x).mean((2, 3)).argmax(1)

    only = OnlyIndices().eval()
    with pytest.raises(InvalidOptionError, match="no float output"):
        convtool.distill(convtool.separate(only, data[:1], rank=1).model, only, data, steps=2)


def test_non_finite_calibration_data_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    bad = torch.randn(8, 3, 10, 10)
    bad[3, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidOptionError, match="NaN or infinite"):
        convtool.separate(model, bad[:1].nan_to_num(), calibration=bad)


def test_nothing_to_separate_names_the_reason_when_every_claim_fails():
    model = HeldConv().eval()
    with pytest.raises(NothingToSeparateError, match="without going through the module"):
        convtool.separate(model, torch.randn(1, 3, 8, 8), include=["c"])


class Reparameterised(nn.Module):
    """RepVGG-style: trains through the module, runs F.conv2d on its weight at inference."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.other = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if self.training:
            y = self.conv(x)
        else:
            y = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        return self.other(y)


def test_a_conv_the_model_runs_another_way_at_inference_is_not_claimed():
    model, x = Reparameterised().train(), torch.randn(2, 3, 8, 8)
    result = convtool.separate(model, x, rank=1)
    assert [layer.name for layer in result.layers] == ["other"]
    assert "applies it itself" in dict(result.skipped)["conv"]
    assert isinstance(result.model.conv, nn.Conv2d)


class ClosuresInAList(nn.Module):
    """Lambdas in a list, over BatchNorm blocks: deepcopy shares them with the caller's model."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)) for _ in range(2))
        self.heads = [lambda x, i=i: self.blocks[i](x) for i in range(2)]

    def forward(self, x):
        for head in self.heads:
            x = head(x)
        return x


def test_closures_in_a_list_are_copied_so_the_callers_model_is_never_touched():
    model, x = ClosuresInAList().train(), torch.randn(4, 4, 8, 8)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    result = convtool.separate(model, x, rank=1, calibration=torch.randn(8, 4, 8, 8))
    convtool.distill(result.model, model, torch.randn(8, 4, 8, 8), steps=2, batch_size=4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshot[k], rtol=0, atol=0, msg=k)
    assert [layer.name for layer in result.layers] == ["blocks.0.0", "blocks.1.0"]
    assert all(layer.output_error is not None for layer in result.layers)


def test_calibration_of_a_closure_model_fits_against_the_dense_model():
    """The refit's reference must stay dense: it is a copy whose closure is its own."""

    class Direct(Closure):
        def forward(self, x):
            return self.d(self.c(x))

    torch.manual_seed(0)
    model, twin = Closure().eval(), Direct().eval()
    twin.load_state_dict(model.state_dict())
    data = torch.randn(64, 3, 8, 8)
    through_closure = convtool.separate(model, data[:1], rank=1, calibration=data)
    direct = convtool.separate(twin, data[:1], rank=1, calibration=data)
    errors = [layer.output_error for layer in through_closure.layers]
    assert errors == pytest.approx([layer.output_error for layer in direct.layers], rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(through_closure.model(data), direct.model(data))


class TiedModuleAndFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.w = self.conv.weight
        self.other = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.other(F.conv2d(self.conv(x), self.w, padding=1))


class ReadsFunctionalWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3))
        self.other = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.other(F.conv2d(x, self.w, padding=1) * self.w.abs().mean())


def test_weights_that_cannot_be_rewritten_once_are_left_dense_not_counted_twice():
    x = torch.randn(1, 8, 8, 8)
    tied = convtool.separate(TiedModuleAndFunction().eval(), x, rank=1)
    assert [layer.name for layer in tied.layers] == ["other"]
    assert "tied to" in dict(tied.skipped)["conv"]
    model = ReadsFunctionalWeight()
    read = convtool.separate(model, x, rank=1)
    assert [layer.name for layer in read.layers] == ["other"]
    assert "reads this weight outside conv calls" in dict(read.skipped)["w"]
    report = read.report(x)
    assert report.after.params < report.before.params  # no layer row hides a weight kept beside its pair


class SharedFunctionalBlock(nn.Module):
    """A module whose forward calls F.conv2d, reached by two names."""

    def __init__(self):
        super().__init__()
        self.block = FunctionalBlock()
        self.again = self.block

    def forward(self, x):
        return self.again(self.block(x))


class FunctionalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)

    def forward(self, x):
        return torch.relu(F.conv2d(x, self.w, padding=1))


def test_a_shared_module_with_a_functional_conv_is_replaced_at_every_name():
    model, x = SharedFunctionalBlock().eval(), torch.randn(1, 8, 8, 8)
    full = convtool.separate(model, x, rank="full")
    torch.testing.assert_close(full.model(x), model(x), rtol=1e-4, atol=1e-5)
    result = convtool.separate(model, x, rank=1)
    (layer,) = result.layers
    assert layer.name == "block.w" and layer.calls == 2
    assert result.model.block is result.model.again
    assert_layers_proven(result, model, (x,))


class ListsInPrivateAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self._stages = [self.a, self.b]

    def forward(self, x):
        for stage in self._stages:
            x = stage(x)
        return x


def test_lists_in_underscore_attributes_are_rewired_too():
    model, x = ListsInPrivateAttributes().eval(), torch.randn(1, 3, 8, 8)
    result = convtool.separate(model, x, rank=1)
    assert [layer.name for layer in result.layers] == ["a", "b"]
    assert_layers_proven(result, model, (x,))


def test_error_columns_describe_the_weights_the_pairs_apply_now():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    data = torch.randn(32, 8, 8, 8)
    result = convtool.separate(model, data[:1], rank=1, calibration=data)
    for layer in result.layers:
        pair, dense = result.model.get_submodule(layer.name), model.get_submodule(layer.name).weight
        applied = float((pair.weight - dense).norm() / dense.norm())
        assert layer.weight_error == pytest.approx(applied, rel=1e-5)  # after the refit, not the SVD's
    tuned = convtool.distill(result.model, model, data, steps=3, batch_size=8)
    report = convtool.compare(model, tuned.model, data[:1], separation=result)
    assert all(layer.output_error is None for layer in report.layers)  # measured on another model
    assert all(layer.output_error is not None for layer in result.report(data[:1]).layers)


class Bag:
    def __init__(self, run):
        self.run = run


def _block():
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))


class EveryWayToHoldAFunction(nn.Module):
    """Functions reaching blocks through defaults, nesting, closures over closures, partials and objects."""

    def __init__(self):
        import functools

        super().__init__()
        self.blocks = nn.ModuleList(_block() for _ in range(5))
        b = list(self.blocks)
        inner = lambda x: b[2](x)  # noqa: E731
        self.defaults = [lambda x, blk=b[0]: blk(x)]
        self.nested = {"stages": [lambda x: b[1](x)]}
        self.outer = lambda x: inner(x)
        self.partial = functools.partial(lambda blk, x: blk(x), b[3])
        self.bag = Bag(lambda x: b[4](x))

    def forward(self, x):
        x = self.defaults[0](x)
        x = self.nested["stages"][0](x)
        x = self.outer(x)
        x = self.partial(x)
        return self.bag.run(x)


def test_the_copy_shares_nothing_with_the_callers_model_however_functions_hold_it():
    torch.manual_seed(0)
    model, x = EveryWayToHoldAFunction().train(), torch.randn(4, 4, 8, 8)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    result = convtool.separate(model, x, rank=1, calibration=torch.randn(8, 4, 8, 8))
    assert [layer.name for layer in result.layers] == [f"blocks.{i}.0" for i in range(5)]
    result.model.train()(x)  # training the result must not reach the caller's modules either
    convtool.distill(result.model, model, torch.randn(8, 4, 8, 8), steps=2, batch_size=4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshot[k], rtol=0, atol=0, msg=k)
    assert all(p.grad is None for p in model.parameters())
    assert_layers_proven(result, model, (x,))


class FunctionalWithDropout(nn.Module):
    """Code that reads self.training next to a functional conv: a traced GraphModule would freeze it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)

    def forward(self, x):
        y = F.conv2d(self.stem(x), self.w, padding=1)
        return F.dropout(y, 0.5, training=self.training)


def test_a_functional_conv_in_mode_dependent_code_is_left_dense():
    model, x = FunctionalWithDropout().train(), torch.randn(2, 3, 8, 8)
    result = convtool.separate(model, x, rank="full")
    assert [layer.name for layer in result.layers] == ["stem"]
    assert "depends on train/eval mode" in dict(result.skipped)["w"]
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    assert type(result.model) is FunctionalWithDropout  # not frozen into a GraphModule


class FusedAtInference(nn.Module):
    """RepVGG-style fusion: eval runs one conv on a weight computed from two."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 1)
        self.other = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if self.training:
            y = self.conv(x) + self.c1(x)
        else:
            fused = self.conv.weight + F.pad(self.c1.weight, (1, 1, 1, 1))
            y = F.conv2d(x, fused, self.conv.bias + self.c1.bias, padding=1)
        return self.other(y)


def test_a_weight_fused_at_inference_is_not_claimed_by_the_training_branch():
    model, x = FusedAtInference().train(), torch.randn(2, 8, 8, 8)
    result = convtool.separate(model, x, rank=1)
    assert [layer.name for layer in result.layers] == ["other"]
    assert "applies it itself" in dict(result.skipped)["conv"]


class SpectralPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 8, 3, padding=1))
        self.b = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_parametrized_convs_left_dense_keep_their_parametrization():
    model, x = SpectralPair().eval(), torch.randn(1, 4, 8, 8)
    result = convtool.separate(model, x, rank=1, exclude=["a"])
    assert [layer.name for layer in result.layers] == ["b"]
    assert torch.nn.utils.parametrize.is_parametrized(result.model.a)
    assert any(k.startswith("a.parametrizations") for k in result.model.state_dict())


class BudgetWithAHeldConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.holder = Holder(self.b)  # __slots__: the proof must put b back

    def forward(self, x):
        return self.holder.conv(torch.relu(self.a(x)))


def test_a_flop_budget_is_reported_on_the_model_returned_after_the_proof():
    model, x = BudgetWithAHeldConv().eval(), torch.randn(1, 16, 16, 16)
    result = convtool.separate(model, x, rank=convtool.FlopsTarget(0.3))
    assert "b" in dict(result.skipped)
    assert result.flops_after == pytest.approx(convtool.analyze(result.model, x).flops)
    assert result.budget_met is False


class NestedContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.cfg = {"stages": [(self.a, "first"), (self.b, "second")]}

    def forward(self, x):
        for conv, _ in self.cfg["stages"]:
            x = conv(x)
        return x


def test_convs_in_nested_containers_are_rewired():
    model, x = NestedContainers().eval(), torch.randn(1, 3, 8, 8)
    result = convtool.separate(model, x, rank=1)
    assert [layer.name for layer in result.layers] == ["a", "b"]
    assert_layers_proven(result, model, (x,))
    assert model.cfg["stages"][0][0] is model.a  # the caller's containers untouched
