"""Least squares for a conv: its calls as columns, the normal equations they sum to, and their solution.

A conv is a matmul of its weight with the columns of its input (:func:`columns`), so fitting a
conv to target outputs is a linear least-squares problem per group, summed over calls and
batches (and processes) as :class:`NormalEquations`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.decompose import as_conv_weight
from ..errors import InvalidOptionError
from ..measure.conv_calls import explicit_padding
from .distributed import all_reduce_sum, world
from .row_solves import ridge_scale, row_solver, shifted_solve


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
    pad = []
    for k, p, d, o in reversed(list(zip(kernel, padding, dilation, output_padding))):
        pad += [d * (k - 1) - p, d * (k - 1) - p + o]  # negative crops
    return spread(x, stride), (1,) * len(kernel), tuple(pad)


def spread(x: Tensor, stride: Sequence[int]) -> Tensor:
    """``x`` (batch, channels, *size) with ``stride - 1`` zeros between its pixels: a transposed conv's input as a stride-1 conv reads it."""
    b, c, *size = x.shape
    out = x.new_zeros(b, c, *((n - 1) * s + 1 for n, s in zip(size, stride)))
    out[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = x
    return out


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

    ``precise``: the products are taken in float64, as the exact full-rank refit needs (its
    least squares reproduce the dense conv to float precision only from float64 sums). Else,
    for float32 activations, in float32 GEMMs of at most :data:`BLOCK` positions, summed in
    float64: about half the time of float64 GEMMs, and relative errors near 1e-7 of the sums,
    far below what a lossy pair's fit, or the judging of its shrinkage, can tell apart.

    While they sum fewer rows than :data:`FEW_ROWS` per feature, the rows themselves are kept
    too (in float64, at most half the Gram matrix's size) and solved in their own terms
    (:func:`row_solver`): a calibration's first batch gives a wide pitch-tracker layer 4,128
    rows for 10,241 features, and each solve of them was a factorisation of the features
    (3.4 s, against 1.8 s for the rows' Gram matrix and 0.5 s a solve). Their solves are then
    those of float64 sums, for a lossy pair too.
    """

    def __init__(self, bias_slots: int, precise: bool = True) -> None:
        self.slots = bias_slots
        self.precise = precise
        self.xx: Tensor | None = None
        self.xy: Tensor | None = None
        self.yy = 0.0
        self.rows = 0  # positions summed, per group
        self.kept: list[tuple[Tensor, Tensor]] | None = []  # the rows summed, while few; None once not all are

    def add(self, cols: Tensor, target: Tensor, slot: int | None) -> None:
        """Add a call's columns (batch, groups, features, pixels) and target, a few samples at a time.

        A call's columns can be several times the activations (a 1,024-channel 64x1 depthwise
        conv: 3 GB in float64 for 32 pitch frames), so they are taken in chunks of at most
        :data:`CHUNK_BYTES` and summed in place.
        """
        b, g, f, length = cols.shape
        self.kept = _few(self.kept, [], self.rows + b * length, f + self.slots)
        dtype = torch.float64 if self.precise or cols.dtype == torch.float64 else torch.float32
        size = torch.finfo(dtype).bits // 8
        step = max(1, int(CHUNK_BYTES // max(g * f * length * size, 1)))
        target = target.reshape(b, g, -1, length)
        for start in range(0, b, step):
            part = slice(start, start + step)
            n = cols[part].shape[0]
            x = cols[part].permute(1, 2, 0, 3).reshape(g, f, n * length).to(dtype)
            y = target[part].permute(1, 2, 0, 3).reshape(g, -1, n * length).to(dtype)
            block = n * length if dtype == torch.float64 else BLOCK
            for first in range(0, n * length, block):
                self._sum(x[..., first : first + block], y[..., first : first + block], slot)
            if self.kept is not None:
                self.kept.append((_with_ones(x, self.slots, slot), y.to(torch.float64, copy=True)))
            del x
            self.yy += float(y.pow(2).sum(dtype=torch.float64))
            self.rows += n * length

    def _sum(self, x: Tensor, y: Tensor, slot: int | None) -> None:
        """Add one block's products to the float64 sums; a bias slot's column of ones is summed, not multiplied."""
        g, f, length = x.shape
        if self.xx is None:
            self.xx = torch.zeros(g, f + self.slots, f + self.slots, dtype=torch.float64, device=x.device)
            self.xy = torch.zeros(g, f + self.slots, y.shape[1], dtype=torch.float64, device=x.device)
        self.xx[:, :f, :f] += _gram(x)
        self.xy[:, :f] += x @ y.transpose(1, 2)
        if slot is not None:
            sums = x.sum(2, dtype=torch.float64)
            self.xx[:, :f, f + slot] += sums
            self.xx[:, f + slot, :f] += sums
            self.xx[:, f + slot, f + slot] += length
            self.xy[:, f + slot] += y.sum(2, dtype=torch.float64)

    def plus(self, other: "NormalEquations") -> "NormalEquations":
        """The equations of both sets of data."""
        total = NormalEquations(self.slots, self.precise)
        parts = [e for e in (self, other) if e.xx is not None]
        if parts:
            total.xx = sum((e.xx for e in parts[1:]), parts[0].xx)
            total.xy = sum((e.xy for e in parts[1:]), parts[0].xy)
        total.yy, total.rows = self.yy + other.yy, self.rows + other.rows
        total.kept = _few(self.kept, other.kept, total.rows, total.xx.shape[1] if total.xx is not None else 0)
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
        total = NormalEquations(self.slots, self.precise)
        total.kept = None  # the other processes' rows are not here
        total.xx, total.xy = all_reduce_sum(xx.clone()), all_reduce_sum(xy.clone())
        sums = all_reduce_sum(torch.tensor([self.yy, float(self.rows)], dtype=torch.float64, device=device))
        total.yy, total.rows = float(sums[0]), int(sums[1])
        return total

    def relative_error(self, w: Tensor) -> float:
        """||Y - W^T X|| / ||Y|| for weights ``w`` shaped like :meth:`solve`'s result."""
        residual = self.yy + _error_less_constant(self.xx, self.xy, w.to(self.xx))
        return math.sqrt(max(residual, 0.0) / self.yy) if self.yy > 0 else 0.0

    def solve(self, strength: float = 1e-6, prior: Tensor | None = None) -> Tensor:
        """Ridge-regularised least squares, shape (groups, features + bias slots, outputs per group).

        ``strength`` is relative to the mean of X X^T's diagonal; with ``prior``, the ridge pulls
        towards it instead of towards zero.
        """
        rows = self._kept_rows()
        if rows is not None:
            return row_solver(*rows)(ridge_scale(self.xx, strength), prior)
        return solve_normal_equations(self.xx, self.xy, strength, prior)

    def _kept_rows(self) -> tuple[Tensor, Tensor] | None:
        """Every row summed, (groups, features + slots, rows), and its targets, (groups, outputs, rows), where they were kept."""
        if not self.kept or self.xx is None:
            return None
        if len(self.kept) > 1:  # joined once (a block of :meth:`including` lets the joined copy go after)
            self.kept = [(torch.cat([x for x, _ in self.kept], 2), torch.cat([y for _, y in self.kept], 2))]
        return self.kept[0]

    def solve_judged(self, prior: Tensor, held: "NormalEquations", hint: float | None = None) -> tuple[Tensor, float | None]:
        """Least squares shrunk towards ``prior`` as far as ``held`` (data it is not fit on) says helps.

        Few samples for many features (a wide layer at few output positions: 64 pitch frames
        give its last layer 512 rows for 768 features) let the plain solve fit the calibration
        data exactly and generalise worse than the SVD initialisation. Strengths of
        :data:`SHRINKAGE` are solved on these equations and judged on ``held``; the held-out
        error falls, then rises, along the ridge path, so the walk goes from a first strength
        towards the lower error and stops where it rises (:func:`_walk`). The prior itself (an
        infinite strength) is judged too, and the best is then solved on both (see
        :meth:`solve_at`). Returns the weights and the strength (None: the prior).

        The walk starts at ``hint`` (the strength judged for this layer before, on less data),
        else at the weakest strength where there are many more rows than features, else at
        the middle: every solve of a wide layer is a factorisation of thousands of features,
        and three of them usually find its minimum.

        The strength is one for the layer, so it is judged on at most :data:`JUDGING_GROUPS` of
        its groups, evenly spread: a wide pointwise-first layer's depthwise half is hundreds of
        problems of a thousand features, and each judging solve of them all took seconds.
        """
        groups = self.xx.shape[0]
        pick = torch.linspace(0, groups - 1, JUDGING_GROUPS).round().long().unique() if groups > JUDGING_GROUPS else None
        sub = (lambda t: t) if pick is None else (lambda t: t[pick.to(t.device)])  # noqa: E731
        xx, xy, held_xx, held_xy = sub(self.xx), sub(self.xy), sub(held.xx), sub(held.xy)
        start = sub(prior).to(xy)
        rows = self._kept_rows()
        in_rows = None if rows is None else row_solver(sub(rows[0]), sub(rows[1]))  # their Gram matrix, once for every strength

        def score(i: int) -> float:
            if in_rows is not None:
                return _error_less_constant(held_xx, held_xy, in_rows(ridge_scale(xx, SHRINKAGE[i]), start))
            return _error_less_constant(held_xx, held_xy, solve_normal_equations(xx, xy, SHRINKAGE[i], start))

        if hint in SHRINKAGE:
            first = SHRINKAGE.index(hint)
        else:
            first = 0 if self.rows >= WELL_DETERMINED * self.xx.shape[1] else len(SHRINKAGE) // 2
        index, best = _walk(score, first)
        strength = SHRINKAGE[index] if best < _error_less_constant(held_xx, held_xy, start) else None  # ties: the prior
        return self.solve_at(strength, prior, held), strength

    def solve_at(self, strength: float | None, prior: Tensor, held: "NormalEquations") -> Tensor:
        """The least squares at a strength :meth:`solve_judged` chose, on these equations and ``held`` (None: ``prior``)."""
        if strength is None:
            return prior
        with self.including(held):
            return self.solve(strength, prior)

    def absorb(self, other: "NormalEquations") -> None:
        """Add ``other``'s equations to these, in place (``other`` is left as it was)."""
        if other.xx is None:
            return
        if self.xx is None:
            self.xx, self.xy = other.xx.clone(), other.xy.clone()
        else:
            self.xx += other.xx
            self.xy += other.xy
        self.yy += other.yy
        self.rows += other.rows
        self.kept = _few(self.kept, other.kept, self.rows, self.xx.shape[1])

    @contextlib.contextmanager
    def including(self, other: "NormalEquations") -> Iterator["NormalEquations"]:
        """These equations with ``other``'s added in place for the block, then taken out again.

        A layer's equations can be gigabytes (a pointwise-first pair's depthwise half: N
        problems of r·K features); :meth:`plus` would copy them.
        """
        if other.xx is None:
            yield self
            return
        kept = self.kept
        self.kept = _few(kept, other.kept, self.rows + other.rows, other.xx.shape[1])
        if self.xx is None:
            self.xx, self.xy = other.xx.clone(), other.xy.clone()
            self.yy += other.yy
            self.rows += other.rows
            try:
                yield self
            finally:
                self.xx, self.xy, self.yy, self.rows = None, None, self.yy - other.yy, self.rows - other.rows
                self.kept = kept
            return
        self.xx += other.xx
        self.xy += other.xy
        self.yy += other.yy
        self.rows += other.rows
        try:
            yield self
        finally:
            self.xx -= other.xx
            self.xy -= other.xy
            self.yy -= other.yy
            self.rows -= other.rows
            self.kept = kept


def _walk(score, first: int) -> tuple[int, float]:
    """The index of a local minimum of ``score`` over :data:`SHRINKAGE`'s indices, and its score, from ``first``.

    From ``first``, towards weaker strengths while the score falls strictly, else towards
    stronger ones while it does not rise (ties: the stronger). From index 0 this is the walk
    of weakest first that stops at the first rise; each index is scored once.
    """
    scores: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in scores:
            scores[i] = score(i)
        return scores[i]

    best = first
    while best > 0 and at(best - 1) < at(best):
        best -= 1
    if best == first:
        while best + 1 < len(SHRINKAGE) and at(best + 1) <= at(best):
            best += 1
    return best, at(best)


def _few(kept: list | None, more: list | None, rows: int, features: int) -> list | None:
    """Both lists of kept rows, while ``rows`` in all are few for ``features`` (:data:`FEW_ROWS`); else None."""
    if kept is None or more is None or rows > FEW_ROWS * features:
        return None
    return kept + more


def _with_ones(x: Tensor, slots: int, slot: int | None) -> Tensor:
    """Rows (groups, features, n) in float64 with the bias slots' rows below: ones in ``slot``'s, zeros in the rest."""
    g, f, n = x.shape
    out = x.new_zeros(g, f + slots, n, dtype=torch.float64)
    out[:, :f] = x
    if slot is not None:
        out[:, f + slot] = 1
    return out


def _gram(x: Tensor) -> Tensor:
    """x xᵀ for x of (groups, features, positions); for many features, only the blocks on and above the diagonal are multiplied.

    The Gram matrix is symmetric: with 2,048-row blocks, a 7,168-feature one costs 57% of the
    full product, and the lower blocks are copies.
    """
    f = x.shape[1]
    if f < 2 * SYMMETRIC_BLOCK:
        return x @ x.transpose(1, 2)
    out = x.new_empty(x.shape[0], f, f)
    for i in range(0, f, SYMMETRIC_BLOCK):
        j = min(i + SYMMETRIC_BLOCK, f)
        out[:, i:j, i:] = x[:, i:j] @ x[:, i:].transpose(1, 2)
        out[:, j:, i:j] = out[:, i:j, j:].transpose(1, 2)
    return out


def _error_less_constant(xx: Tensor, xy: Tensor, w: Tensor) -> float:
    """||Y - W^T X||² less ||Y||² (which no weights change), read off the equations: W·(XX^T W) - 2 W·XY^T."""
    return float((w * (xx @ w)).sum()) - 2 * float((w * xy).sum())


def add_held_out(fit: NormalEquations, held: NormalEquations, cols: Tensor, target: Tensor, slot: int | None,
                 batch_number: int) -> None:
    """Add a call's samples, its batch's last quarter to ``held`` and the rest to ``fit`` (batches of one: every fourth batch to ``held``).

    ``held`` judges how far :meth:`NormalEquations.solve_judged` shrinks the fit.
    """
    b = cols.shape[0]
    if b > 1:
        cut = b - max(b // 4, 1)
        fit.add(cols[:cut], target[:cut], slot)
        held.add(cols[cut:], target[cut:], slot)
    else:
        (held if batch_number % 4 == 0 else fit).add(cols, target, slot)


def fitted(fit: NormalEquations, held: NormalEquations, prior: Tensor, strength: float | None | str = "judge",
           hint: float | None = None) -> tuple[Tensor, float | None]:
    """The weights a refit installs, and the strength used (None: ``prior``, the SVD initialisation).

    Judged (:meth:`NormalEquations.solve_judged`, from ``hint``) when both sets of equations
    hold data, or at a ``strength`` judged before; with one set only, its plain least squares
    unless they fit it worse than ``prior`` (ill-conditioned data can).
    """
    if fit.xx is not None and held.xx is not None:
        if strength == "judge":
            return fit.solve_judged(prior, held, hint)
        return fit.solve_at(strength, prior, held), strength
    only = fit if fit.xx is not None else held
    if only.xx is None:
        return prior, None
    solution = only.solve()
    if only.relative_error(solution) <= only.relative_error(prior):
        return solution, SHRINKAGE[0]
    return prior, None


CHUNK_BYTES = 256 * 2**20  # the columns :meth:`NormalEquations.add` holds at once

SYMMETRIC_BLOCK = 2048  # rows of the Gram matrix multiplied at once where only its upper blocks are (:func:`_gram`)

BLOCK = 8192  # positions summed in one float32 GEMM before the float64 sum takes it (its rounding grows with them)

JUDGING_GROUPS = 32  # the most groups of a layer :meth:`NormalEquations.solve_judged` judges its strength on

FEW_ROWS = 0.5  # rows per feature up to which equations keep their rows and solve in their terms (:func:`row_solver`)

WELL_DETERMINED = 4  # rows per feature from which a judged walk starts at the weakest strength, not the middle

# Ridge strengths (relative to the mean of X X^T's diagonal) a judged solve chooses among.
SHRINKAGE = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def solve_normal_equations(xx: Tensor, xy: Tensor, ridge: float = 1e-6, prior: Tensor | None = None) -> Tensor:
    """Solve (XX^T + λI) W = XY^T + λ W0 for a batch of symmetric positive semi-definite systems.

    λ is ``ridge`` times the mean of each system's diagonal; W0 is ``prior`` (zero without it):
    the least squares with a penalty λ||W - W0||².

    Cholesky, the solver for such systems, where it succeeds (``cholesky_ex`` reports instead
    of raising); a pseudo-inverse for the rest. Not an LU solve: batched float64 LU in MKL fails
    on well-conditioned systems once a program has called ``torch.set_num_threads``.
    """
    solution = xy.new_empty(xy.shape)
    step = max(1, int(CHUNK_BYTES // max(xx[0].numel() * xx.element_size(), 1)))
    for start in range(0, xx.shape[0], step):  # a few groups at a time: the shifted copy and its factor are each xx's size
        part = slice(start, start + step)
        solution[part] = _solve_some(xx[part], xy[part], ridge, None if prior is None else prior[part])
    return solution


def _solve_some(xx: Tensor, xy: Tensor, ridge: float, prior: Tensor | None) -> Tensor:
    """:func:`solve_normal_equations` on a few groups."""
    scale = ridge_scale(xx, ridge)
    if prior is not None:
        xy = xy + scale[:, None, None] * prior.to(xy)
    return shifted_solve(xx, xy, scale)


def as_solution(weight: Tensor, biases: Sequence[Tensor], groups: int) -> Tensor:
    """A weight in a conv's layout (N, M/g, *k) and its biases as a solution: (groups, features + slots, outputs per group)."""
    w = weight.detach().double().reshape(groups, weight.shape[0] // groups, -1).transpose(1, 2)
    return torch.cat([w, *(b.detach().double().reshape(groups, 1, -1) for b in biases)], 1)


def from_solution(solution: Tensor, weight_shape: Sequence[int], slots: int) -> tuple[Tensor, list[Tensor]]:
    """The inverse of :func:`as_solution`: the weight (conv layout) and one bias per slot."""
    f = math.prod(weight_shape[1:])
    weight = solution[:, :f, :].permute(0, 2, 1).reshape(tuple(weight_shape))
    return weight, [solution[:, f + i, :].reshape(-1) for i in range(slots)]
