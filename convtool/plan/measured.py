"""Each rank's error measured on data: at the layer's output, or at the model's (sensitivity).

The planner's options start with weight errors; where calibration activations can change a
decision these replace them (:func:`output_errors`, from one factorisation per order), and with
sensitivity, the error one layer's pair causes at the model's output (:func:`model_errors`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.decompose import separable_factors
from ..core.modules import SeparableConv, conv_class
from ..core.threads import one_thread_for
from ..recovery.calibrate import Layer, give_biases, refit
from .knapsack import DENSE, Choice, pareto
from .site import Site

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# The model's output divergence on calibration data with one conv's weight (by identity)
# replaced by another: measure.sensitivity.OutputError.
Sensitivity = Callable[[torch.Tensor, torch.Tensor], float]

SENSITIVITY_POINTS = 4  # ranks per layer whose effect on the model's output is measured
# Features of a last conv's least squares (M/g x r for a pointwise, r x K for a depthwise) above
# which sensitivity measures SVD pairs instead of refit ones: on the tall-kernel benchmark
# (1,024 channels, ranks to 32) the refits took the plan from 10 s to 3 minutes.
SENSITIVITY_REFIT_LIMIT = 1024


def pair_for(site: Site, order: str, rank: int) -> SeparableConv:
    use = site.uses[0]
    return SeparableConv.from_weight(site.weight, use.bias, groups=site.groups, rank=rank, order=order,
                                     transposed=site.transposed, **use.options)


def dense_for(site: Site) -> nn.Module:
    use, w = site.uses[0], site.weight
    conv = conv_class(w.dim() - 2, site.transposed)(
        *site.channels, tuple(w.shape[2:]), groups=site.groups, bias=use.bias is not None, device=w.device,
        dtype=w.dtype, **use.options,
    )
    with torch.no_grad():
        conv.weight.copy_(w)
        if use.bias is not None:
            conv.bias.copy_(use.bias)
    return conv


def output_errors(site: Site, x: torch.Tensor, output: torch.Tensor, choice: Choice) -> Choice:
    """Replace weight-space errors by measured output errors on calibration activations.

    ``x`` and ``output`` are one call of the dense conv, bias included in ``output``. One
    factorisation per order: the rank-r pair's output is the sum of its first r rank-1
    components (each a depthwise and a pointwise conv), so the errors of every rank come from
    one pass over the components, not from a new SVD and a new pair per rank.
    """
    bias = site.uses[0].bias
    options: dict[tuple[str, int], tuple[float, float]] = {}
    with torch.no_grad():
        reference = output.reshape(-1).double()
        norm = float(reference @ reference) or 1.0
        # The residual starts in float64: subtracting the bias in float32 would round it.
        dense = reference.reshape(output.shape)
        if bias is not None:
            dense = dense - bias.double().reshape(1, -1, *[1] * (output.dim() - 2))
        for order in {key[0] for key in choice.options if key != DENSE}:
            top = max(key[1] for key in choice.options if key[0] == order)
            conv_options = dict(site.options, transposed=site.transposed)
            errors = rank_output_errors(site.weight, bias, site.groups, order, x, top, conv_options, dense=dense.clone())
            options.update({key: (cost, errors[key[1]] / norm) for key, (cost, _) in choice.options.items() if key[0] == order})
    options[DENSE] = (choice.options[DENSE][0], 0.0)
    return Choice(options)


def rank_output_errors(
    weight: torch.Tensor, bias: torch.Tensor | None, groups: int, order: str, x: torch.Tensor, top: int, options: dict,
    dense: torch.Tensor | None = None,
) -> dict[int, float]:
    """Squared output error on ``x`` of the rank-r pair, for r = 1 .. ``top``, from one SVD.

    ``options`` holds the conv's stride, padding and dilation (zero padding), and for a
    transposed conv ``transposed`` and ``output_padding``; ``dense``, the
    dense conv's output on ``x`` without bias, when the caller has it (it may be consumed).
    The residual is kept in float64: the errors of high ranks are small differences of large
    outputs.
    """
    transposed = options.get("transposed", False)
    dims = weight.dim() - 2
    if order == "dw-pw" and not transposed and weight.shape[1] == 1:
        return _one_input_errors(weight, groups, x, top, options)
    f = separable_factors(weight, top, groups, order, transposed)
    conv = _CONV_FUNCTIONS[dims]
    in_channels = weight.shape[0] if transposed else weight.shape[1] * groups
    m_g = in_channels // groups
    n = f.mixing.shape[0] if order == "dw-pw" else f.mixing.shape[0] // f.rank
    ones = (1,) * dims

    output_padding = options.get("output_padding", 0)
    if transposed and dense is not None:  # a call with output_size= picks its own output padding: match its output
        output_padding = _output_padding(x, weight, dense, options)

    def spatial_conv(t: torch.Tensor, w: torch.Tensor, g: int) -> torch.Tensor:
        if transposed:
            return _TRANSPOSED_FUNCTIONS[dims](t, w, None, options["stride"], options["padding"],
                                               output_padding, g, options["dilation"])
        return conv(t, w, None, options["stride"], options["padding"], options["dilation"], g)

    if dense is None:
        dense = spatial_conv(x, weight, groups)
    residual = dense.double()
    errors = {}
    for i in range(f.rank):
        if order == "dw-pw":
            # filter i of every input channel
            spatial = f.spatial[:, i : i + 1] if transposed else f.spatial[i :: f.rank]
            mixing = f.mixing.reshape(n, m_g, f.rank, *ones)[:, :, i]
            part = conv(spatial_conv(x, spatial, in_channels), mixing, None, 1, 0, 1, groups)
        else:
            mixing = f.mixing.reshape(n, f.rank, m_g, *ones)[:, i]
            spatial = f.spatial[i :: f.rank] if transposed else f.spatial[:, i : i + 1]
            part = spatial_conv(conv(x, mixing, None, 1, 0, 1, groups), spatial, n)
        residual -= part  # promoted in place: no float64 copy of each part
        flat = residual.reshape(-1)
        errors[i + 1] = float(flat @ flat)
    return errors


def _one_input_errors(weight: torch.Tensor, groups: int, x: torch.Tensor, top: int, options: dict) -> dict[int, float]:
    """:func:`rank_output_errors` of a depthwise-first pair where each group reads one input channel, in closed form.

    A filterbank (one input channel, hundreds of filters) or a depthwise conv: every
    component of input channel m is u (the pointwise weights of m's outputs, orthonormal over
    components) times its depthwise filter v applied to x_m, so components are orthogonal and
    the error of rank r is the sum over the dropped ones of s² ||v * x_m||². One conv of x with
    every right singular vector replaces a conv and a float64 residual update per rank (a
    1,024-filter, 512-tap bank costed to rank 341 took 50 s that way, loaded).
    """
    n, _, *kernel = weight.shape
    m = x.shape[1]
    slices = weight.detach().double().reshape(m, n // m, -1)
    with one_thread_for(slices):
        _, s, vh = torch.linalg.svd(slices, full_matrices=False)
    ranks = s.shape[1]
    z = _CONV_FUNCTIONS[weight.dim() - 2](x.double(), vh.reshape(m * ranks, 1, *kernel), None, options["stride"],
                                         options["padding"], options["dilation"], m)
    energy = z.transpose(0, 1).reshape(m, ranks, -1).pow(2).sum(2)  # ||v_(m,i) * x_m||²
    dropped = (s.pow(2) * energy).sum(0).flip(0).cumsum(0).flip(0)  # [i]: the components from i on
    return {r: float(dropped[r]) if r < ranks else 0.0 for r in range(1, top + 1)}


def _output_padding(x: torch.Tensor, weight: torch.Tensor, output: torch.Tensor, options: dict) -> tuple[int, ...]:
    """The output padding a transposed conv call used, read off its output's size."""
    dims = weight.dim() - 2
    tup = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, padding, dilation = tup(options["stride"]), tup(options["padding"]), tup(options["dilation"])
    return tuple(
        out - ((size - 1) * s - 2 * p + d * (k - 1) + 1)
        for out, size, s, p, d, k in zip(output.shape[-dims:], x.shape[-dims:], stride, padding, dilation, weight.shape[2:])
    )


def model_errors(site: Site, choice: Choice, sensitivity: Sensitivity, x: torch.Tensor | None = None,
                 points: int = SENSITIVITY_POINTS) -> Choice:
    """Each option's error at the model's output: a few measured, the rest interpolated.

    The options on the layer's cost/error front are measured at ``points`` spread along it,
    cheapest and dearest included: the model runs with this layer alone replaced by that
    rank's pair, as the refit will leave it where ``x`` (the layer's input on the batch) is
    given — its last conv refit on ``x`` alone, bias included — else, or where that refit has
    more than :data:`SENSITIVITY_REFIT_LIMIT` features, as the SVD gives it. The
    refit matters: a pair with few features (a stem on three colour channels) keeps its error,
    one with many fits most of it away, and measuring SVD pairs sent a FLOP budget to the stem
    of the zoo's inception model. Between the measured ranks the model error is interpolated
    against the layer error, log on log; outside them it scales in proportion. An option with
    no layer error keeps none.
    """
    options = {key: value for key, value in choice.options.items() if key != DENSE}
    front = pareto(options)
    chosen = {front[round(i * (len(front) - 1) / max(points - 1, 1))] for i in range(min(points, len(front)))}
    measured = {}
    m_g, kk = site.channels[0] // site.groups, math.prod(site.weight.shape[2:])
    if x is not None and max(m_g * r if order == "dw-pw" else r * kk for order, r in chosen) > SENSITIVITY_REFIT_LIMIT:
        x = None  # the one-layer refits would cost more than the whole plan: measure the SVD pairs
    for key in chosen:
        order, r = key
        if x is not None:
            measured[key] = sensitivity(site.weight, *_refit_alone(site, order, r, x))
        else:  # the SVD pair's dense weight
            measured[key] = sensitivity(site.weight, pair_for(site, order, r).weight.detach())
    curve = sorted((options[key][1], value) for key, value in measured.items() if options[key][1] > 0)
    result = {DENSE: choice.options[DENSE]}
    for key, (cost, error) in options.items():
        result[key] = (cost, measured[key] if key in measured else _interpolate(curve, error))
    return Choice(result)


def _refit_alone(site: Site, order: str, rank: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense weight and bias of the rank's pair with its last conv refit to the dense conv on ``x``."""
    dense, pair = dense_for(site).eval(), pair_for(site, order, rank).eval()
    layer = Layer(site.name, dense.weight, [pair])
    give_biases([layer])
    refit(dense, pair, [layer], [(x,)], across_processes=False)  # each process plans on its own batch
    return pair.weight.detach(), pair.bias.detach()


def _interpolate(curve: list[tuple[float, float]], x: float) -> float:
    """y at ``x`` on a curve of (x, y) points sorted by x: log-log between points, proportional beyond."""
    if x <= 0 or not curve:
        return 0.0
    if x <= curve[0][0]:
        return curve[0][1] * x / curve[0][0]
    if x >= curve[-1][0]:
        return curve[-1][1] * x / curve[-1][0]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            if y0 <= 0 or y1 <= 0 or x1 == x0:
                return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-300)
            t = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + t * math.log(y1 / y0))
    return curve[-1][1]
