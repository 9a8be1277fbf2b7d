"""Properties of the separation over the Conv2d configuration space."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import convtool
from convtool import SeparableConv
from convtool.core.decompose import max_rank, rank_errors, separable_factors, singular_values

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    m = groups * draw(st.integers(1, 4))
    if m == groups:  # at least two input channels per group, or it would be depthwise
        m *= 2
    n = groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if (kh, kw) == (1, 1):
        kh = 3
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(
        st.one_of(
            st.integers(0, 2),
            st.tuples(st.integers(0, 2), st.integers(0, 2)),
            st.sampled_from(["same", "valid"]),
        )
    )
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return dict(
        in_channels=m,
        out_channels=n,
        kernel_size=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
    )


def _input(conv: nn.Conv2d, dtype, batch: int = 2) -> torch.Tensor:
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    h = (kh - 1) * dh + 4
    w = (kw - 1) * dw + 5
    return torch.randn(batch, conv.in_channels, h, w, dtype=dtype)


@given(config=conv_configs(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_full_rank_reproduces_any_conv(config, dtype, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**config, dtype=dtype)
    x = _input(conv, dtype)
    result = convtool.separate(conv, x, rank="full")
    assert isinstance(result.model, SeparableConv)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), conv(x), **TOL[dtype])
    assert result.layers[0].weight_error < 1e-6


@given(config=conv_configs(), seed=st.integers(0, 2**16), order=st.sampled_from(["dw-pw", "pw-dw"]))
def test_error_never_grows_with_rank(config, seed, order):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**config, dtype=torch.float64)
    top = max_rank(conv.weight, conv.groups, order)
    errors = [separable_factors(conv.weight, r, conv.groups, order).weight_error for r in range(1, top + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-9
    # The closed form from singular values agrees with the factors.
    torch.testing.assert_close(rank_errors(conv.weight, conv.groups, order)[1:], torch.tensor(errors, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@given(config=conv_configs(), seed=st.integers(0, 2**16))
def test_rank_one_parameter_count(config, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**config)
    pair = SeparableConv.from_conv(conv, rank=1)
    m, n, (kh, kw), g = conv.in_channels, conv.out_channels, conv.kernel_size, conv.groups
    expected = m * kh * kw + n * (m // g) + (n if config["bias"] else 0)
    assert sum(p.numel() for p in pair.parameters()) == expected


@given(config=conv_configs(), seed=st.integers(0, 2**16))
def test_pointwise_first_order_is_exact_at_full_rank(config, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**config, dtype=torch.float64)
    x = _input(conv, torch.float64)
    pair = SeparableConv.from_conv(conv, rank=10**6, order="pw-dw")
    with torch.no_grad():
        torch.testing.assert_close(pair(x), conv(x), **TOL[torch.float64])


def test_rank_one_is_the_best_rank_one_slice():
    """Eckart-Young: no other rank-1 factor pair of a slice has a smaller error."""
    torch.manual_seed(0)
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    f = separable_factors(w, 1)
    approx = (f.mixing.reshape(6, 1) @ f.spatial.reshape(1, 9)).reshape_as(w)
    best = torch.linalg.norm(w - approx)
    for _ in range(50):
        a, b = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 9, dtype=torch.float64)
        assert torch.linalg.norm(w - (a @ b).reshape_as(w)) >= best
    assert f.weight_error == pytest.approx(float(best / torch.linalg.norm(w)))


def test_singular_values_shape_follows_order():
    w = torch.randn(8, 4, 3, 3)
    assert singular_values(w, order="dw-pw").shape == (4, 8)
    assert singular_values(w, order="pw-dw").shape == (8, 4)
    assert singular_values(torch.randn(8, 2, 3, 3), groups=2).shape == (4, 4)


def test_zero_weight_has_zero_error():
    f = separable_factors(torch.zeros(4, 4, 3, 3), 1)
    assert f.weight_error == 0.0
    assert rank_errors(torch.zeros(4, 4, 3, 3)).abs().sum() == 0
