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
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..core.inputs import eval_mode, model_device, on_device
from ..core.modules import SeparableConv
from ..measure.conv_calls import ALL_CONV_FUNCTIONS, conv_arguments, record
from .distributed import all_reduce_sum, world
from .equations import NormalEquations, add_held_out, as_solution, columns, conv_layout, fitted, from_solution

log = logging.getLogger(__name__)


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
        first_targets: the reference's conv outputs on ``batches[0]`` by id of its weights, in
            the order of their first calls, when already recorded (the planner costs ranks on
            that batch): not run again.
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
    count = _length(batches)
    with eval_mode(separated), torch.no_grad():
        for i, batch in enumerate(batches):
            batch = on_device(batch, device)
            if i == 0 and first_targets is not None:
                targets, first_targets = first_targets, None
            else:
                calls = record(reference, batch, keep=wanted, keep_inputs=False).by_weight()
                targets = {key: [c.output for c in group] for key, group in calls.items()}
            fed = _feeding(targets, wanted)
            for key, fit in wanted.items():
                fit.begin(targets.get(key, []), last=i + 1 == count, feeds=key in fed)
            with _Refitting(fits):
                separated(*batch)
            for fit in fits.values():
                fit.end()
    return {fit.layer.name: fit.finish(across_processes) for fit in fits.values()}


def _feeding(targets: dict[int, list[Tensor]], wanted: dict[int, "_Fit"]) -> set[int]:
    """The layers (by reference weight id) whose weights during this batch can reach another refit layer's equations.

    ``targets`` holds the reference's calls by weight in the order of their first calls. A layer
    called once, after every call of the other layers refit, feeds none of them: its installs
    before its last batch would be solved for nothing (a pitch tracker's 8,704-feature last
    refit layer spent 4 of its 9 solves on the first batch's). The rest are taken to feed.
    """
    ran = [key for key, outputs in targets.items() if key in wanted and outputs]
    if ran and all(len(targets[key]) == 1 for key in ran):
        return set(ran[:-1])
    return set(ran)


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
    matched by order, so a batch that took another path through the model is dropped. A
    quarter of each batch's samples (of every fourth batch, for batches of one) is held out:
    the weights are shrunk towards the SVD initialisation as far as those samples say helps
    (:meth:`NormalEquations.solve_judged`), then fit on all of them. A layer whose weights feed
    no other refit layer (called once, after all of them) is installed at its last batch only.
    """

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.last = layer.pairs[0].last
        self.biases = list({id(p.last.bias): p.last.bias for p in layer.pairs if p.last.bias is not None}.values())
        self.slot_of = {id(b): i for i, b in enumerate(self.biases)}
        self.initial = _as_solution(self.last, self.biases)  # the SVD initialisation
        self.precise = _exact(layer.pairs[0])  # float64 sums where the pair can reproduce the conv
        self.done, self.done_held = self._equations(), self._equations()
        self.batch, self.batch_held = self._equations(), self._equations()
        self.targets: list[Tensor] = []
        self.seen = 0
        self.batches = 0
        self.strength: float | None = None  # the shrinkage last chosen (None: the initialisation)
        self.judged = False  # whether an install has judged the shrinkage yet
        self.last_batch = False  # whether the current batch is the last
        self.feeds = True  # whether this layer's weights during the batch reach another refit layer
        self.added = 0  # calls added to the equations
        self.settled: tuple[int, float | None] | None = None  # (calls added, error) of an install judged on all of them

    def _equations(self) -> NormalEquations:
        return NormalEquations(len(self.biases), precise=self.precise)

    def begin(self, targets: list[Tensor], last: bool = False, feeds: bool = True) -> None:
        self.targets, self.seen, self.last_batch, self.feeds = targets, 0, last, feeds
        self.batch, self.batch_held = self._equations(), self._equations()
        self.batches += 1

    def see(self, call: dict[str, Any]) -> None:
        # A layer called once per batch adds straight into the sums: with one call there is no
        # order to mismatch, and a wide layer's batch copies would double its memory.
        once = len(self.targets) == 1
        if self.seen < len(self.targets):
            slot = self.slot_of.get(id(call["bias"])) if call["bias"] is not None else None
            cols, target = columns(call), self.targets[self.seen]
            fit, held = (self.done, self.done_held) if once else (self.batch, self.batch_held)
            add_held_out(fit, held, cols, target, slot, self.batches)
            self.added += 1
        self.seen += 1
        if self.seen == 1:  # the batch's equations join the finished ones in place for the install (no copies)
            # A layer called once has, at the last batch's call, every equation it will have:
            # judged there, its weights are final and the last batch already runs on them.
            final = once and self.last_batch
            if once and not final and not self.feeds:  # no refit layer reads its weights before the last batch's
                self.settled = None
                return
            with self.done.including(self.batch), self.done_held.including(self.batch_held):
                error = self._install(self.done, self.done_held, judge=final or not self.judged)
            self.settled = (self.added, error) if final else None

    def end(self) -> None:
        if self.seen and self.seen == len(self.targets):
            self.done.absorb(self.batch)
            self.done_held.absorb(self.batch_held)
        self.batch, self.batch_held = self._equations(), self._equations()  # let them go
        if self.seen and self.seen != len(self.targets):  # unmatched: its calls ran on weights the finished batches do not give
            self._install(self.done, self.done_held, judge=not self.judged)
            self.settled = None
        self.targets, self.seen = [], 0

    def finish(self, across_processes: bool = True) -> float | None:
        if across_processes:  # under a process group, every process's data
            reduced = self.done.all_reduce(), self.done_held.all_reduce()
            if reduced[0] is not self.done or reduced[1] is not self.done_held:
                self.settled = None  # other processes' equations joined
            self.done, self.done_held = reduced
        if self.done.xx is None and self.done_held.xx is None:
            log.info("%s did not run on the calibration data; it keeps its SVD initialisation", self.layer.name)
            return None
        if self.settled is not None and self.settled[0] == self.added:  # judged on these very equations: installed
            return self.settled[1]
        return self._install(self.done, self.done_held, judge=True)

    def _install(self, fit: NormalEquations, held: NormalEquations, judge: bool) -> float | None:
        """Install the least-squares weights shrunk as judged (or the plain ones, or the initialisation); the error left on all the data.

        The shrinkage is judged at the first install and the last: judging solves a few
        strengths (:meth:`NormalEquations.solve_judged`, from the one judged before), and the
        installs between only feed the layers after this one, so they reuse the first
        judgement (made on less data, so if anything shrinking more).
        """
        hint = self.strength if self.judged else None
        chosen, self.strength = fitted(fit, held, self.initial, "judge" if judge else self.strength, hint)
        self.judged = self.judged or (judge and fit.xx is not None and held.xx is not None)
        last = self.last
        layout = conv_layout(last.weight.detach(), last.groups, last.transposed)
        weight, biases = from_solution(chosen, layout.shape, len(self.biases))
        with torch.no_grad():
            last.weight.copy_(conv_layout(weight, last.groups, last.transposed).to(last.weight.dtype))
            for bias, value in zip(self.biases, biases):
                bias.copy_(value.to(bias.dtype))
        if fit.xx is None and held.xx is None:
            return None
        with fit.including(held) as every:  # of the weights as stored, cast included
            return every.relative_error(_as_solution(last, self.biases))


def _length(batches: Any) -> int | None:
    """How many batches a pass reads; None where the source cannot say (the last batch is then not known)."""
    try:
        return len(batches)
    except TypeError:
        return None


EXACT = 1e-6  # a pair's relative weight error up to which its refit is summed in float64


def _exact(pair: SeparableConv) -> bool:
    """Whether the pair's SVD factors are the dense weight itself (its exact rank, or a weight of lower rank).

    Its refit must then reproduce the conv to float precision, which only float64 sums of the
    equations give (:class:`NormalEquations`' ``precise``).
    """
    return not pair.weight_error > EXACT  # NaN (a pair built empty, or loaded) counts as exact: the careful side


def _as_solution(conv: nn.Module, biases: list[Tensor]) -> Tensor:
    """A conv module's weight and bias slots as a solution."""
    return as_solution(conv_layout(conv.weight.detach().double(), conv.groups, conv.transposed), biases, conv.groups)


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
