"""Calibration: refit separated layers on real activations, then re-estimate BatchNorm.

After the SVD initialisation each pair is the best separable approximation of the weights, not
of what the layer computes on data. With a few unlabeled inputs, the last conv of each pair
(the pointwise of ``"dw-pw"``, the spatial conv of ``"pw-dw"``) is refit by least squares so
the pair's outputs match the original layer's outputs. Layers are taken in execution order and
each is fed the activations of the already-refit layers before it, so later layers also absorb
the error of earlier ones.

Every call of a layer counts: a conv module run three times, or a weight called with two
settings, is refit on all its calls at once. The calls are read by the conv recorder, keyed by
weight, so a layer that did not run on the data is never "refit" on nothing: it keeps its SVD
initialisation and says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset

from ..core.decompose import as_conv_weight
from ..core.inputs import eval_mode, model_device, on_device
from ..core.modules import SeparableConv
from ..errors import InvalidOptionError
from ..measure.conv_calls import ALL_CONV_FUNCTIONS, conv_arguments, explicit_padding, record
from .distributed import all_reduce_sum, world

log = logging.getLogger(__name__)

BATCH = 32


def calibration_batches(calibration: Any, batch_size: int = BATCH) -> "list[tuple] | StreamedBatches":
    """Normalise calibration data to input tuples, refusing empty or non-finite data.

    A tensor is one input, cut into batches along dim 0; a tuple of tensors is a model's
    several inputs, cut alike; a list or any other iterable yields batches (each a tensor, or
    a tuple/list of tensors). A ``torch.utils.data.Dataset`` (items are inputs, batched by
    ``batch_size``) or ``DataLoader`` is not read into memory: it gives :class:`StreamedBatches`,
    read again on each pass and checked batch by batch.
    """
    if isinstance(calibration, (Dataset, DataLoader)):
        return StreamedBatches(calibration, batch_size)
    if isinstance(calibration, Tensor):
        calibration = (calibration,)
    if isinstance(calibration, tuple) and all(isinstance(t, Tensor) for t in calibration):
        n = calibration[0].shape[0] if calibration[0].dim() else 0
        if n == 0 or any(t.dim() == 0 or t.shape[0] != n for t in calibration):
            raise InvalidOptionError("calibration tensors must share a non-empty first (batch) dimension")
        batches = [tuple(t[i : i + batch_size] for t in calibration) for i in range(0, n, batch_size)]
    else:
        try:
            batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration]
        except TypeError:
            raise InvalidOptionError(f"calibration must be a tensor or an iterable of batches, got {type(calibration).__name__}") from None
        if not batches or not all(isinstance(t, Tensor) for b in batches for t in b):
            raise InvalidOptionError("calibration batches must be tensors or tuples of tensors")
    for batch in batches:
        _check_finite(batch)
    return batches


def _check_finite(batch: tuple) -> tuple:
    for t in batch:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidOptionError("calibration data holds NaN or infinite values; check its normalisation (--mean/--std)")
    return batch


class StreamedBatches:
    """Calibration batches read from a Dataset or DataLoader as a pass needs them, never all in memory.

    Iterable again for each pass (the refit and the BatchNorm re-estimation each make one);
    ``[0]`` is the first batch (kept: the planner and the refit both start from it). Under a
    process group, give each process its own share (a DataLoader with a ``DistributedSampler``):
    the refit sums the normal equations of all processes.
    """

    def __init__(self, source: "Dataset | DataLoader", batch_size: int = BATCH) -> None:
        self.loader = source if isinstance(source, DataLoader) else DataLoader(source, batch_size=batch_size)
        first = next(iter(self), None)
        if first is None:
            raise InvalidOptionError("the calibration data set yielded no batch")
        self.first = first

    def __iter__(self) -> Iterator[tuple]:
        for batch in self.loader:
            batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            if not batch or not all(isinstance(t, Tensor) for t in batch):
                raise InvalidOptionError("calibration batches must be tensors or tuples of tensors")
            yield _check_finite(batch)

    def __getitem__(self, index: int) -> tuple:
        if index != 0:
            raise IndexError("streamed calibration batches are read in order; only the first is kept")
        return self.first

    def __bool__(self) -> bool:
        return True


def columns(call: dict[str, Any]) -> Tensor:
    """A conv call's input as (batch, groups, features per group, output pixels): the conv is then a matmul.

    ``call`` holds the call's arguments by name (:func:`conv_arguments`). A transposed conv is
    the conv, with the kernel flipped, of its input spread by the stride (zeros between) and
    padded by what the kernel overhangs: its columns are that conv's (see :func:`conv_layout`).
    """
    x, w = call["input"], call["weight"]
    kernel = tuple(w.shape[2:])
    dims = len(kernel)
    if x.dim() == dims + 1:
        x = x[None]
    as_tuple = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, dilation = as_tuple(call["stride"]), as_tuple(call["dilation"])
    if call.get("transposed"):
        x, stride, pad = _spread(x, kernel, stride, as_tuple(call["padding"]), dilation, as_tuple(call["output_padding"]))
    else:
        pad = explicit_padding(call["padding"], kernel, dilation)
    if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(pad):
        cols = x.flatten(2)
    else:
        if any(pad):
            x = F.pad(x, pad)
        cols = F.unfold(x, kernel, dilation=dilation, stride=stride) if dims == 2 else _unfold(x, kernel, dilation, stride)
    b, _, length = cols.shape
    return cols.reshape(b, call["groups"], -1, length)


def _spread(x: Tensor, kernel, stride, padding, dilation, output_padding) -> tuple[Tensor, tuple, tuple]:
    """A transposed conv's input as the equivalent conv sees it: zeros between pixels, stride 1, and its padding."""
    b, c, *size = x.shape
    spread = x.new_zeros(b, c, *((n - 1) * s + 1 for n, s in zip(size, stride)))
    spread[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = x
    pad = []
    for k, p, d, o in reversed(list(zip(kernel, padding, dilation, output_padding))):
        pad += [d * (k - 1) - p, d * (k - 1) - p + o]  # negative crops
    return spread, (1,) * len(kernel), tuple(pad)


def _unfold(x: Tensor, kernel, dilation, stride) -> Tensor:
    """``F.unfold`` for any number of spatial dimensions: (batch, channels x kernel, positions)."""
    dims = len(kernel)
    for i in range(dims):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    b, c = x.shape[:2]
    x = x.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return x.reshape(b, c * math.prod(kernel), -1)


def conv_layout(weight: Tensor, groups: int, transposed: bool) -> Tensor:
    """A conv's weight as the matmul of :func:`columns` applies it: (N, M/g, *k).

    A transposed conv's weight (M, N/g, *k), read in a conv's layout with its kernel flipped;
    its own inverse for a transposed conv's shape (apply it to the result to get back).
    """
    if not transposed:
        return weight
    return as_conv_weight(weight.flip(list(range(2, weight.dim()))), groups)


class NormalEquations:
    """Accumulates X X^T, X Y^T and Y.Y over calls, in float64, with one bias column per bias tensor.

    They hold all the data says about a linear fit: the error of any weights can be read off
    them, so no activation needs keeping past its batch.
    """

    def __init__(self, bias_slots: int) -> None:
        self.slots = bias_slots
        self.xx: Tensor | None = None
        self.xy: Tensor | None = None
        self.yy = 0.0

    def add(self, cols: Tensor, target: Tensor, slot: int | None) -> None:
        b, g, f, length = cols.shape
        x = cols.permute(1, 2, 0, 3).reshape(g, f, b * length).double()
        if self.slots:
            ones = x.new_zeros(g, self.slots, b * length)
            if slot is not None:
                ones[:, slot] = 1
            x = torch.cat([x, ones], 1)
        y = target.reshape(b, g, -1, length).permute(1, 2, 0, 3).reshape(g, -1, b * length).double()
        xx, xy = x @ x.transpose(1, 2), x @ y.transpose(1, 2)
        self.xx = xx if self.xx is None else self.xx + xx
        self.xy = xy if self.xy is None else self.xy + xy
        self.yy += float(y.pow(2).sum())

    def plus(self, other: "NormalEquations") -> "NormalEquations":
        """The equations of both sets of data."""
        total = NormalEquations(self.slots)
        parts = [e for e in (self, other) if e.xx is not None]
        if parts:
            total.xx = sum((e.xx for e in parts[1:]), parts[0].xx)
            total.xy = sum((e.xy for e in parts[1:]), parts[0].xy)
        total.yy = self.yy + other.yy
        return total

    def all_reduce(self) -> "NormalEquations":
        """The equations of every process's data (a sum across the process group; unchanged in one process).

        Every process must call it, in the same order; one that saw no data contributes zeros.
        """
        if world().size == 1:
            return self
        import torch.distributed as dist

        shapes: list = [None] * world().size
        dist.all_gather_object(shapes, None if self.xx is None else (tuple(self.xx.shape), tuple(self.xy.shape), str(self.xx.device)))
        known = [s for s in shapes if s is not None]
        if not known:
            return self
        if len(set(s[:2] for s in known)) > 1:
            raise InvalidOptionError("the processes' calibration equations differ in shape: every process must separate "
                                     "the model the same way (the same rank, or the same first calibration batch)")
        device = self.xx.device if self.xx is not None else torch.device(known[0][2])
        xx = self.xx if self.xx is not None else torch.zeros(known[0][0], dtype=torch.float64, device=device)
        xy = self.xy if self.xy is not None else torch.zeros(known[0][1], dtype=torch.float64, device=device)
        total = NormalEquations(self.slots)
        total.xx, total.xy = all_reduce_sum(xx.clone()), all_reduce_sum(xy.clone())
        total.yy = float(all_reduce_sum(torch.tensor([self.yy], dtype=torch.float64, device=device)))
        return total

    def relative_error(self, w: Tensor) -> float:
        """||Y - W^T X|| / ||Y|| for weights ``w`` shaped like :meth:`solve`'s result."""
        w = w.to(self.xx)
        residual = self.yy - 2 * float((w * self.xy).sum()) + float((w * (self.xx @ w)).sum())
        return math.sqrt(max(residual, 0.0) / self.yy) if self.yy > 0 else 0.0

    def solve(self) -> Tensor:
        """Ridge-regularised least squares, shape (groups, features + bias slots, outputs per group)."""
        return solve_normal_equations(self.xx, self.xy)


def solve_normal_equations(xx: Tensor, xy: Tensor, ridge: float = 1e-6) -> Tensor:
    """Solve (XX^T + λI) W = XY^T for a batch of symmetric positive semi-definite systems.

    Cholesky, the solver for such systems, where it succeeds (``cholesky_ex`` reports instead
    of raising); a pseudo-inverse for the rest. Not an LU solve: batched float64 LU in MKL fails
    on well-conditioned systems once a program has called ``torch.set_num_threads``.
    """
    diag = xx.diagonal(dim1=1, dim2=2)
    scale = ridge * diag.mean(1).clamp_min(1e-12)
    a = xx + scale[:, None, None] * torch.eye(xx.shape[1], dtype=xx.dtype, device=xx.device)
    factor, info = torch.linalg.cholesky_ex(a)
    solution = torch.cholesky_solve(xy, factor)
    failed = info != 0
    if bool(failed.any()):
        solution[failed] = torch.linalg.pinv(a[failed], hermitian=True) @ xy[failed]
    return solution


@dataclass
class Layer:
    """A layer to refit: the dense weight in the reference model, and the pairs standing in for it."""

    name: str
    reference_weight: Tensor
    pairs: list[SeparableConv]


def refit(
    reference: nn.Module, separated: nn.Module, layers: Sequence[Layer], batches: list[tuple],
    first_targets: dict[int, list[Tensor]] | None = None, across_processes: bool = True,
) -> dict[str, float | None]:
    """Refit each layer's last conv so its outputs match the reference layer's, in one pass over the data.

    Each batch runs through the dense reference once (recording every layer's outputs) and then
    through the separated model, whose layers are refit as the pass reaches them: at a layer's
    first call, its least-squares weights are solved from the normal equations of all batches
    so far plus this call, and installed before the call runs. Later layers therefore see the
    activations of already-refit earlier layers and absorb their error, which is what recovers
    accuracy (fitting all layers on the activations of the unrefit model lost it entirely on a
    nine-layer digits net), at the cost of one pass per batch rather than one per layer.

    Args:
        reference: the dense model (run, never changed).
        separated: the model holding the pairs.
        layers: the layers to refit, in any order.
        batches: calibration input tuples.
        first_targets: the reference's conv outputs on ``batches[0]`` by id of its weights,
            when already recorded (the planner costs ranks on that batch): not run again.
        across_processes: under a process group, fit on every process's data (each process
            must then refit the same layers); False fits on this process's batches alone.

    Returns:
        Per layer name, the relative output error of its final weights on the calibration data
        (the layer's inputs as the pass met them); None for a layer that did not run on the
        data (it keeps its SVD initialisation).
    """
    device = model_device(separated)
    fits = {id(layer.pairs[0].last.weight): _Fit(layer) for layer in layers}  # the pairs share their last weight
    wanted = {id(fit.layer.reference_weight): fit for fit in fits.values()}
    with eval_mode(separated), torch.no_grad():
        for i, batch in enumerate(batches):
            batch = on_device(batch, device)
            if i == 0 and first_targets is not None:
                targets, first_targets = first_targets, None
            else:
                calls = record(reference, batch, keep=wanted, keep_inputs=False).by_weight()
                targets = {key: [c.output for c in group] for key, group in calls.items()}
            for key, fit in wanted.items():
                fit.begin(targets.get(key, []))
            with _Refitting(fits):
                separated(*batch)
            for fit in fits.values():
                fit.end()
    return {fit.layer.name: fit.finish(across_processes) for fit in fits.values()}


class _Refitting(TorchFunctionMode):
    """Refits a layer's last conv on each of its calls, before the call runs."""

    def __init__(self, fits: dict[int, "_Fit"]) -> None:
        super().__init__()
        self.fits = fits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ALL_CONV_FUNCTIONS:
            call = conv_arguments(args, kwargs, func)
            fit = self.fits.get(id(call["weight"]))
            if fit is not None:
                fit.see(call)
        return func(*args, **(kwargs or {}))


class _Fit:
    """One layer's normal equations: those of finished batches, and the current batch's, kept apart.

    A batch's equations count only if the layer ran as often as in the reference: calls are
    matched by order, so a batch that took another path through the model is dropped.
    """

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.last = layer.pairs[0].last
        self.biases = list({id(p.last.bias): p.last.bias for p in layer.pairs if p.last.bias is not None}.values())
        self.slot_of = {id(b): i for i, b in enumerate(self.biases)}
        self.initial = _as_solution(self.last, self.biases)  # the SVD initialisation
        self.done = NormalEquations(len(self.biases))
        self.batch = NormalEquations(len(self.biases))
        self.targets: list[Tensor] = []
        self.seen = 0

    def begin(self, targets: list[Tensor]) -> None:
        self.targets, self.seen = targets, 0
        self.batch = NormalEquations(len(self.biases))

    def see(self, call: dict[str, Any]) -> None:
        if self.seen < len(self.targets):
            slot = self.slot_of.get(id(call["bias"])) if call["bias"] is not None else None
            self.batch.add(columns(call), self.targets[self.seen], slot)
        self.seen += 1
        if self.seen == 1:
            self._install(self.done.plus(self.batch))

    def end(self) -> None:
        if self.seen and self.seen == len(self.targets):
            self.done = self.done.plus(self.batch)
        elif self.seen:  # unmatched: this batch's calls ran on weights the finished batches do not give
            self._install(self.done)
        self.targets, self.seen = [], 0

    def finish(self, across_processes: bool = True) -> float | None:
        if across_processes:
            self.done = self.done.all_reduce()  # under a process group, every process's data
        if self.done.xx is None:
            log.info("%s did not run on the calibration data; it keeps its SVD initialisation", self.layer.name)
            return None
        return self._install(self.done)

    def _install(self, equations: "NormalEquations") -> float | None:
        """Install the least-squares weights, or the SVD initialisation where they fit worse; the error left."""
        chosen, error = self.initial, None
        if equations.xx is not None:
            error = equations.relative_error(self.initial)
            solution = equations.solve()
            fitted = equations.relative_error(solution)
            if fitted <= error:  # ill-conditioned data can make the solve worse: keep the initialisation
                chosen, error = solution, fitted
        last = self.last
        layout = conv_layout(last.weight.detach(), last.groups, last.transposed)
        weight, biases = from_solution(chosen, layout.shape, len(self.biases))
        with torch.no_grad():
            last.weight.copy_(conv_layout(weight, last.groups, last.transposed).to(last.weight.dtype))
            for bias, value in zip(self.biases, biases):
                bias.copy_(value.to(bias.dtype))
        if equations.xx is not None:  # of the weights as stored, cast included
            error = equations.relative_error(_as_solution(last, self.biases))
        return error


def as_solution(weight: Tensor, biases: Sequence[Tensor], groups: int) -> Tensor:
    """A weight in a conv's layout (N, M/g, *k) and its biases as a solution: (groups, features + slots, outputs per group)."""
    w = weight.detach().double().reshape(groups, weight.shape[0] // groups, -1).transpose(1, 2)
    return torch.cat([w, *(b.detach().double().reshape(groups, 1, -1) for b in biases)], 1)


def from_solution(solution: Tensor, weight_shape: Sequence[int], slots: int) -> tuple[Tensor, list[Tensor]]:
    """The inverse of :func:`as_solution`: the weight (conv layout) and one bias per slot."""
    f = math.prod(weight_shape[1:])
    weight = solution[:, :f, :].permute(0, 2, 1).reshape(tuple(weight_shape))
    return weight, [solution[:, f + i, :].reshape(-1) for i in range(slots)]


def _as_solution(conv: nn.Module, biases: list[Tensor]) -> Tensor:
    """A conv module's weight and bias slots as a solution."""
    return as_solution(conv_layout(conv.weight.detach().double(), conv.groups, conv.transposed), biases, conv.groups)


ALS_LIMIT = 4096  # features (M x K) and filter weights (M x r x K) above which a pair keeps the one-sided refit
# Pointwise-first pairs: N·r·(M·K)² multiply-adds per step. Memory is that over K (the
# N·r·K·M·M intermediate) in float64: up to about 1.8 GB for 3x3 kernels at the limit.
PER_OUTPUT_LIMIT = 2e9


def refit_both_halves(
    reference: nn.Module, separated: nn.Module, layers: Sequence[Layer], batches: list[tuple], rounds: int = 3,
) -> dict[str, float]:
    """Refit both convs of each pair by alternating least squares, layer by layer in order.

    For each eligible layer (one ungrouped, untransposed pair called once per pass, of at most
    :data:`ALS_LIMIT` features), the dense conv's normal equations are gathered over the pair's
    input in ``separated`` (earlier layers already refit, so their error is absorbed) and the
    original conv's output in ``reference``. Then ``rounds`` times, each step exact least squares
    with the refit's ridge: for a depthwise-first pair the depthwise filters given the pointwise
    mix (Hessian (P^T P) x G), then the mix and bias given the filters; for a pointwise-first
    pair, per output, the spatial filters and bias given the mixes, then the mixes
    (:func:`_alternate_pointwise_first`, within :data:`PER_OUTPUT_LIMIT`). The result is kept only where it fits the data better
    than the pair's current weights on a held-out quarter of each batch. Costs two passes up to
    each layer per batch.

    Returns the relative output error left, per layer refit this way.
    """
    device = model_device(separated)
    errors: dict[str, float] = {}
    with eval_mode(separated), torch.no_grad():
        for layer in layers:
            pair = layer.pairs[0]
            m, r, k, n = pair.in_channels, pair.rank, math.prod(pair.kernel_size), pair.out_channels
            if len(layer.pairs) > 1 or pair.groups != 1 or pair.transposed or m * k > ALS_LIMIT:
                continue
            if pair.order == "dw-pw" and m * r * k > ALS_LIMIT:
                continue
            if pair.order == "pw-dw" and (n * r * m * m * k * k > PER_OUTPUT_LIMIT or pair.depthwise.padding_mode != "zeros"):
                continue  # a padding mode pads inside the depthwise half, after the pointwise: not the dense conv's columns
            equations = _dense_equations(reference, separated, layer, batches, device)
            if world().size > 1:  # fit on every process's data, so every process ends with the same pair
                failed = float(all_reduce_sum(torch.tensor([float(equations is None)], device=device)))
                if failed:
                    continue
                equations = (equations[0].all_reduce(), equations[1].all_reduce())
            if equations is None:
                continue
            alternate = _alternate if pair.order == "dw-pw" else _alternate_pointwise_first
            error = alternate(pair, *equations, rounds)
            if error is not None:
                errors[layer.name] = error
    return errors


def _dense_equations(reference, separated, layer: Layer, batches, device) -> "tuple[NormalEquations, NormalEquations] | None":
    """The dense conv's normal equations over the pair's input in ``separated`` and the original's output:
    those to fit on, and those of a held-out quarter of each batch to judge the fit on."""
    pair = layer.pairs[0]
    slots = 1 if pair.bias is not None else 0  # the pair's bias is fit with the half that holds it
    equations, held = NormalEquations(slots), NormalEquations(slots)
    first = pair.depthwise if pair.order == "dw-pw" else pair.pointwise  # it receives the pair's input
    for batch in batches:
        batch = on_device(batch, device)
        target = record(reference, batch, keep={id(layer.reference_weight)}, stop_after=2, keep_inputs=False)
        seen = record(separated, batch, keep={id(first.weight)}, stop_after=2, own_mode=True)
        outputs = [c.output for c in target.calls if c.output is not None]
        inputs = [c for c in seen.calls if c.input is not None]
        spatial = [c for c in seen.calls if c.weight is pair.depthwise.weight]
        if len(outputs) != 1 or len(inputs) != 1 or len(spatial) != 1:  # called more than once a pass: not this refit's case
            return None
        # The spatial half's call carries the stride, padding and dilation (padding 0 where a
        # padding mode padded its input first, as for a depthwise-first pair's own input).
        call, options = inputs[0], spatial[0]
        dense = dict(input=call.input, weight=layer.reference_weight, stride=options.stride, padding=options.padding,
                     dilation=options.dilation, groups=1)
        cols, target = columns(dense), outputs[0]
        cut = cols.shape[0] - max(cols.shape[0] // 4, 1)  # a quarter of each batch is held out to judge the fit
        if cut < 1:
            return None
        equations.add(cols[:cut], target[:cut], 0 if slots else None)
        held.add(cols[cut:], target[cut:], 0 if slots else None)
    return (equations, held) if equations.xx is not None else None


def _alternate(pair: SeparableConv, equations: "NormalEquations", held: "NormalEquations", rounds: int) -> float | None:
    """Alternate least squares on ``pair``'s depthwise filters D (M, r, K) and pointwise mix P (N, M, r) with bias c.

    Fit on ``equations``, judged on ``held``: the pair changes only if the held-out error falls.
    Returns the error on all the data, or None where the pair keeps its weights.
    """
    m, r, k, n = pair.in_channels, pair.rank, math.prod(pair.kernel_size), pair.out_channels
    f, slots = m * k, equations.slots  # features: M*K, then the bias's 1 when the pair has a bias
    xx, xy = equations.xx[0].cpu(), equations.xy[0].cpu()
    d = pair.depthwise.weight.detach().double().reshape(m, r, k).cpu()
    p = pair.pointwise.weight.detach().double().reshape(n, m, r).cpu()
    c = pair.bias.detach().double().cpu() if slots else torch.zeros(n, dtype=torch.float64)

    def solution(d: Tensor, p: Tensor, c: Tensor) -> Tensor:
        return as_solution(torch.einsum("nmi,mik->nmk", p, d), [c] if slots else [], 1)

    before = solution(d, p, c)
    g = xx[:f, :f].reshape(m, k, m, k)
    shift = xx[:f, f:] @ c[None, :] if slots else torch.zeros(f, n, dtype=torch.float64)  # the bias's share of X Y^T
    for _ in range(rounds):
        # D given P and c: H[(m,i,k),(m',i',k')] = (P^T P)[(m,i),(m',i')] G[(m,k),(m',k')]
        h = torch.einsum("mioj,mkol->mikojl", torch.einsum("nmi,noj->mioj", p, p), g).reshape(m * r * k, m * r * k)
        b = torch.einsum("nmi,mkn->mik", p, (xy[:f] - shift).reshape(m, k, n)).reshape(-1)
        d = solve_normal_equations(h[None], b[None, :, None])[0, :, 0].reshape(m, r, k)
        # P (and c) given D: the features are the depthwise outputs z_(m,i) (and the bias's 1)
        lift = torch.zeros(m * r + slots, f + slots, dtype=torch.float64)
        for channel in range(m):
            lift[channel * r:(channel + 1) * r, channel * k:(channel + 1) * k] = d[channel]
        if slots:
            lift[-1, -1] = 1
        mix = solve_normal_equations((lift @ xx @ lift.t())[None], (lift @ xy)[None])[0]  # (M*r + slots, N)
        p = mix[: m * r].t().reshape(n, m, r)
        if slots:
            c = mix[-1]
            shift = xx[:f, f:] @ c[None, :]
    return _keep_if_better(pair, equations, held, before, solution(d, p, c), d, p, c)


def _keep_if_better(pair: SeparableConv, equations, held, before: Tensor, after: Tensor,
                    depthwise: Tensor, pointwise: Tensor, bias: Tensor) -> float | None:
    """Install the alternated weights only if they fit the held-out data better; the error on all the data, or None."""
    if held.xx is None or not held.relative_error(after) < held.relative_error(before):
        return None  # no better on data it was not fit to: keep what the pair has
    fitted = equations.plus(held).relative_error(after)
    with torch.no_grad():
        pair.depthwise.weight.copy_(depthwise.reshape(pair.depthwise.weight.shape).to(pair.depthwise.weight))
        pair.pointwise.weight.copy_(pointwise.reshape(pair.pointwise.weight.shape).to(pair.pointwise.weight))
        if equations.slots:
            pair.bias.copy_(bias.to(pair.bias))
    return fitted


def _alternate_pointwise_first(pair: SeparableConv, equations: "NormalEquations", held: "NormalEquations", rounds: int) -> float | None:
    """Alternate least squares on a pointwise-first pair: mixes P (N, r, M), spatial filters S (N, r, K), bias c.

    Output n applies W_n = P_nᵀ S_n, so the objective splits over outputs: every step is N
    small exact least-squares problems, batched (size r·M for the mixes, r·K + 1 for the
    filters with the bias, which the depthwise half holds). Fit on ``equations``, judged on
    ``held`` as :func:`_alternate` is.
    """
    m, r, k, n = pair.in_channels, pair.rank, math.prod(pair.kernel_size), pair.out_channels
    f, slots = m * k, equations.slots
    xx, xy = equations.xx[0].cpu(), equations.xy[0].cpu()
    g = xx[:f, :f].reshape(m, k, m, k)
    g0 = xx[:f, f] if slots else torch.zeros(f, dtype=torch.float64)  # the bias's column: the input's sums
    p = pair.pointwise.weight.detach().double().reshape(n, r, m).cpu()
    s = pair.depthwise.weight.detach().double().reshape(n, r, k).cpu()
    c = pair.bias.detach().double().cpu() if slots else torch.zeros(n, dtype=torch.float64)
    target = xy[:f].reshape(m, k, n)

    def solution(p: Tensor, s: Tensor, c: Tensor) -> Tensor:
        return as_solution(torch.einsum("nim,nik->nmk", p, s), [c] if slots else [], 1)

    before = solution(p, s, c)
    for _ in range(rounds):
        # S (and c) given P: features (i, k) of output n, and the bias's 1
        h = torch.einsum("nikol,njo->nikjl", torch.einsum("nim,mkol->nikol", p, g), p).reshape(n, r * k, r * k)
        b = torch.einsum("nim,mkn->nik", p, target).reshape(n, r * k)
        if slots:
            cross = torch.einsum("nim,mk->nik", p, g0.reshape(m, k)).reshape(n, r * k, 1)
            h = torch.cat([torch.cat([h, cross], 2), torch.cat([cross.transpose(1, 2), xx[f:, f:].expand(n, 1, 1)], 2)], 1)
            b = torch.cat([b, xy[f:].t()], 1)
        solved = solve_normal_equations(h, b[:, :, None])[:, :, 0]
        s = solved[:, : r * k].reshape(n, r, k)
        if slots:
            c = solved[:, -1]
        # P given S (c fixed): features (i, m) of output n
        h = torch.einsum("nimol,njl->nimjo", torch.einsum("nik,mkol->nimol", s, g), s).reshape(n, r * m, r * m)
        shifted = target - c[None, None, :] * g0.reshape(m, k, 1)
        b = torch.einsum("nik,mkn->nim", s, shifted).reshape(n, r * m)
        p = solve_normal_equations(h, b[:, :, None])[:, :, 0].reshape(n, r, m)
    return _keep_if_better(pair, equations, held, before, solution(p, s, c), s, p, c)


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches``; returns how many.

    Only the BatchNorm layers run in train mode (dropout and the rest stay in eval), with a
    cumulative average, so the result does not depend on the order of the batches.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = model_device(model)
    saved = [(m, m.momentum) for m in norms]
    with eval_mode(model), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for batch in batches:
                model(*on_device(batch, device))
        finally:
            for m, momentum in saved:
                m.momentum = momentum
        _average_over_processes(norms)
    return len(norms)


def _average_over_processes(norms: list[_BatchNorm]) -> None:
    """Under a process group, every process's statistics weighted by the batches it saw: those of all the data."""
    if world().size == 1:
        return
    for m in norms:
        count = m.num_batches_tracked.to(m.running_mean.device, torch.float64)
        total = all_reduce_sum(count.clone()).clamp_min(1)
        for stat in (m.running_mean, m.running_var):
            stat.copy_(all_reduce_sum(stat.double() * count) / total)
        m.num_batches_tracked.copy_(total.to(m.num_batches_tracked))


def give_biases(layers: Sequence[Layer]) -> list[str]:
    """Give a zero bias to each layer whose last conv has none, so the refit can fit it; the layers given one.

    Bias correction, as post-training quantization does it: the separated layer's error has a
    mean per output channel on real data, and a bias fitted with the weights by least squares
    removes it. A conv trained without bias (the one before a BatchNorm) would otherwise keep
    that shift. The pairs of one layer share their last weight, so they share the new bias too.
    """
    given = []
    for layer in layers:
        lasts = [pair.last for pair in layer.pairs]
        if any(last.bias is not None for last in lasts):
            continue
        first = lasts[0]
        bias = nn.Parameter(torch.zeros(first.out_channels, device=first.weight.device, dtype=first.weight.dtype),
                            requires_grad=first.weight.requires_grad)
        for last in lasts:
            last.bias = bias
        given.append(layer.name)
    return given
