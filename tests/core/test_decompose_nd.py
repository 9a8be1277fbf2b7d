"""Exactness over the configuration space of 1-d and 3-d convs and of transposed convs, and their algebra."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import convtool
from convtool import SeparableConv
from convtool.core.decompose import dense_weight, max_rank, rank_errors, separable_factors

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@st.composite
def nd_configs(draw, transposed: bool):
    dims = draw(st.sampled_from([1, 3] if not transposed else [1, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2]))
    m = groups * draw(st.integers(2, 3))
    n = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4 if dims < 3 else 3)) for _ in range(dims))
    if all(k == 1 for k in kernel):
        kernel = (2, *kernel[1:])
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    config = dict(in_channels=m, out_channels=n, kernel_size=kernel, dilation=dilation, groups=groups, bias=draw(st.booleans()))
    if transposed:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
        # output padding must be smaller than the stride or the dilation
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        return dims, dict(config, stride=stride, padding=padding, output_padding=output_padding)
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"])))
    return dims, dict(config, stride=(1,) * dims if padding == "same" else stride, padding=padding, padding_mode=mode)


def _module(dims: int, config: dict, transposed: bool, dtype) -> nn.Module:
    kind = {1: "1d", 2: "2d", 3: "3d"}[dims]
    cls = getattr(nn, f"ConvTranspose{kind}" if transposed else f"Conv{kind}")
    return cls(**config, dtype=dtype).eval()


def _input(conv: nn.Module, dims: int, dtype) -> torch.Tensor:
    if conv.transposed:  # large enough that padding up to 2 leaves an output
        return torch.randn(2, conv.in_channels, *([6] * dims), dtype=dtype)
    size = [(k - 1) * d + 4 for k, d in zip(conv.kernel_size, conv.dilation)]
    if dims == 3:
        size = [min(s, 7) for s in size]
    return torch.randn(2, conv.in_channels, *size, dtype=dtype)


@settings(max_examples=60, deadline=None)
@given(spec=nd_configs(transposed=False), dtype=st.sampled_from([torch.float32, torch.float64]),
       order=st.sampled_from(["dw-pw", "pw-dw"]), seed=st.integers(0, 2**16))
def test_full_rank_reproduces_any_1d_or_3d_conv(spec, dtype, order, seed):
    conv, x, pair = _separated_at_full_rank(spec, False, dtype, order, seed)
    assert pair.dims == spec[0]


def _separated_at_full_rank(spec, transposed: bool, dtype, order: str, seed: int):
    """The conv of ``spec``, an input, and its full-rank pair, checked to compute the same outputs."""
    torch.manual_seed(seed)
    dims, config = spec
    conv = _module(dims, config, transposed, dtype)
    x = _input(conv, dims, dtype)
    result = convtool.separate(conv, x, rank="full", order=order)
    pair = result.model
    assert isinstance(pair, SeparableConv) and pair.transposed == transposed
    with torch.no_grad():
        out, ref = pair(x), conv(x)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert _relative(out, ref) <= 1e-5
    assert result.layers[0].weight_error < 1e-6
    return conv, x, pair


@settings(max_examples=60, deadline=None)
@given(spec=nd_configs(transposed=True), dtype=st.sampled_from([torch.float32, torch.float64]),
       order=st.sampled_from(["dw-pw", "pw-dw"]), seed=st.integers(0, 2**16))
def test_full_rank_reproduces_any_transposed_conv(spec, dtype, order, seed):
    conv, x, pair = _separated_at_full_rank(spec, True, dtype, order, seed)
    with torch.no_grad():
        ref = conv(x)
        # output_size= picks the output padding, as it does for the dense conv
        size = [s + 1 for s in ref.shape[2:]] if all(op == 0 for op in conv.output_padding) else list(ref.shape[2:])
        try:
            expected = conv(x, output_size=size)
        except ValueError:  # a size this conv cannot produce: nothing to compare
            return
        torch.testing.assert_close(pair(x, output_size=size), expected, **TOL[dtype])
    torch.testing.assert_close(pair.weight, conv.weight, **TOL[dtype])


@settings(max_examples=40, deadline=None)
@given(spec=nd_configs(transposed=True), order=st.sampled_from(["dw-pw", "pw-dw"]), seed=st.integers(0, 2**16))
def test_transposed_factors_are_the_best_rank_r_approximation(spec, order, seed):
    """The algebra: factors of a transposed weight recompose to it at full rank, and errors match the singular values."""
    torch.manual_seed(seed)
    dims, config = spec
    w = _module(dims, config, True, torch.float64).weight.detach()
    g = config["groups"]
    top = max_rank(w, g, order, transposed=True)
    errors = []
    for r in range(1, top + 1):
        f = separable_factors(w, r, g, order, transposed=True)
        rebuilt = dense_weight(f.spatial, f.mixing, f.rank, g, order, transposed=True)
        assert rebuilt.shape == w.shape
        errors.append(_relative(rebuilt, w))
    torch.testing.assert_close(torch.tensor(errors, dtype=torch.float64), rank_errors(w, g, order, transposed=True)[1:],
                               rtol=1e-8, atol=1e-9)
    assert errors[-1] < 1e-12


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_refit_of_transposed_pairs_reports_the_error_it_leaves(order, dims):
    """The refit reads a transposed conv as the conv of its spread input: its error must be the true one."""
    torch.manual_seed(0)
    kind = {1: "1d", 2: "2d", 3: "3d"}[dims]
    model = nn.Sequential(getattr(nn, f"ConvTranspose{kind}")(6, 8, 3, stride=2, padding=1, output_padding=1)).eval()
    # Channels correlated, as activations are: on white noise the SVD pair is already the least
    # squares in expectation, and the judged refit rightly keeps it.
    data = torch.einsum("nc...,cd->nd...", torch.randn(40, 2, *([5] * dims)), torch.randn(2, 6)) + 0.1 * torch.randn(40, 6, *([5] * dims))
    plain = convtool.separate(model, data[:1], rank=1, order=order)
    result = convtool.separate(model, data[:1], rank=1, order=order, calibration=data)
    with torch.no_grad():
        ref = model(data)
        refit_error = _relative(result.model(data), ref)
        svd_error = _relative(plain.model(data), ref)
    assert result.layers[0].output_error == pytest.approx(refit_error, rel=1e-3)
    assert refit_error < svd_error
