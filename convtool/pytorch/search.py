"""``AgreementTarget``: the smallest FLOP budget whose separation still agrees with the original.

The costing of the layers (each rank's FLOPs and error, sensitivity included) is the expensive
part of a FLOP target and does not depend on the budget: it is done once, and every budget tried
reuses it. Each budget's separation is refit on the calibration data less a held-out part, and
judged on that part alone, so the figure the search trusts was never fit to.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..core.inputs import eval_mode, model_device, on_device
from ..core.records import AgreementTarget, BudgetSearch, BudgetTried, FlopsTarget, measured_words
from ..errors import InvalidOptionError, NothingToSeparateError
from ..measure.fidelity import output_fidelity
from ..plan.ranks import Costing
from ..recovery.batches import calibration_batches

log = logging.getLogger(__name__)

STEPS = 7  # bisections of the budget range: about 1/128 of it


def split_held_out(calibration: Any, share: float) -> tuple[list[tuple], list[tuple]]:
    """The calibration batches to refit on, and those held out to judge by (``share`` of the samples).

    Every fourth batch (or the share's nearest stride) is held out when there are enough
    batches; otherwise the last rows of each batch, so a single tensor of 64 samples still
    gives both parts. Streamed data is read into memory here: the search runs the same data
    once per budget.
    """
    batches = [tuple(b) for b in calibration_batches(calibration)]
    stride = max(round(1 / share), 2)
    if len(batches) >= stride:
        held = [b for i, b in enumerate(batches) if i % stride == stride - 1]
        fit = [b for i, b in enumerate(batches) if i % stride != stride - 1]
        return fit, held
    fit, held = [], []
    for batch in batches:
        n = batch[0].shape[0]
        cut = n - max(round(n * share), 1)
        if cut < 1:
            raise InvalidOptionError(
                f"an agreement target holds {share:g} of the calibration data out to judge by: give at least "
                f"{max(round(1 / share), 2)} samples")
        fit.append(tuple(t[:cut] for t in batch))
        held.append(tuple(t[cut:] for t in batch))
    return fit, held


class HeldOut:
    """The original's outputs on the held-out batches, and the measure of a separated model against them.

    ``target`` None (a sweep) measures whatever the outputs give, refusing nothing.
    """

    def __init__(self, original: nn.Module, batches: list[tuple], target: AgreementTarget | None) -> None:
        self.batches, self.target = batches, target
        self.samples = sum(b[0].shape[0] for b in batches)
        self.reference = self._outputs(original)
        if target is not None and target.top1 is not None:
            probe = output_fidelity(self.reference, self.reference)
            if probe.top1_agreement is None:
                raise InvalidOptionError(
                    "a top-1 agreement floor needs a model returning one (batch, classes) float output; "
                    "use an SQNR floor (--min-sqnr DB) for other outputs")

    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        device = model_device(model)
        leaves: list[list[torch.Tensor]] = []
        with eval_mode(model), torch.no_grad():
            for batch in self.batches:
                flat, _ = tree_flatten(model(*on_device(batch, device)))
                leaves.append([t.detach().cpu() for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()])
        return [torch.cat(parts) for parts in zip(*leaves)]

    def measure(self, model: nn.Module) -> tuple[float | None, float | None]:
        """(top-1 agreement, SQNR in dB) of ``model`` against the original on the held-out samples."""
        fidelity = output_fidelity(self._outputs(model), self.reference)
        return fidelity.top1_agreement, fidelity.sqnr_db


def search_budget(
    original: nn.Module, target: AgreementTarget, calibration: Any,
    separate_at: Callable[[FlopsTarget, Any, Costing], Any],
) -> tuple[Any, BudgetSearch]:
    """Bisect the FLOP budget for the smallest one meeting ``target`` on held-out data.

    ``separate_at(flops_target, fit_batches, costing)`` separates the model at one budget
    (the first call fills ``costing``; later ones reuse it). Agreement need not fall exactly
    monotonically with the budget; the result is always a budget that was measured to meet the
    floors, never an interpolated one.

    Returns the separation and the record of the search.

    Raises:
        NothingToSeparateError: no budget that separates a layer meets the floors.
    """
    fit, held_batches = split_held_out(calibration, target.held_out)
    held = HeldOut(original, held_batches, target)
    costing = Costing()
    tried: list[BudgetTried] = []
    best: tuple[float, Any, tuple] | None = None
    closest: BudgetTried | None = None

    outcomes: dict[tuple, bool | None] = {}  # by the plan's picks: a budget giving a plan already tried is not tried again

    def attempt(fraction: float) -> bool | None:
        """Whether the separation at ``fraction`` meets the floors (None: it separates nothing)."""
        picks = costing.picks(fraction) if costing.choices else None
        if picks in outcomes:
            return outcomes[picks]
        outcomes[picks or costing.picks(fraction)] = outcome = _attempt(fraction)
        return outcome

    def _attempt(fraction: float) -> bool | None:
        nonlocal best, closest
        try:
            result = separate_at(FlopsTarget(fraction, sensitivity=target.sensitivity), fit, costing)
        except NothingToSeparateError:
            if not costing.choices:  # nothing to separate at any budget: the model's own reason
                raise
            return None  # this budget keeps every conv dense
        top1, sqnr = held.measure(result.model)
        reached = result.flops_after / result.flops_before
        met = target.met(top1, sqnr)
        record = BudgetTried(fraction, reached, top1, sqnr, met)
        tried.append(record)
        log.info("FLOP budget %.3f (reached %.3f): top-1 agreement %s, SQNR %s dB%s", fraction, reached, top1, sqnr,
                 " meets the floor" if met else "")
        if met and (best is None or reached < best[0]):
            best = (reached, result, (top1, sqnr))
        if closest is None or _closer(record, closest):
            closest = record
        return met

    first = attempt(0.5)  # fills the costing; its floor bounds the search from below
    low, high = (0.5, 1.0) if first is False else (min(costing.floor, 0.5), 0.5)
    for _ in range(STEPS):
        middle = (low + high) / 2
        if high - low < 1e-3:
            break
        outcome = attempt(middle)
        if outcome:
            high = middle
        else:
            # too little agreement, or every layer dense (the budget then buys nothing): search below
            low, high = (middle, high) if outcome is False else (low, middle)
    if best is None:
        near = (f"; the closest was {measured_words(closest.top1_agreement, closest.sqnr_db)} at "
                f"{closest.flops_fraction:.2f} of the FLOPs") if closest else ""
        raise NothingToSeparateError(
            f"no FLOP budget meets {target.floors()} on {held.samples} held-out calibration samples{near}: "
            "lower the floor, or give more calibration data")
    reached, result, (top1, sqnr) = best
    return result, BudgetSearch(target, held.samples, reached, top1, sqnr, tuple(tried))


def _closer(a: BudgetTried, b: BudgetTried) -> bool:
    """Whether ``a`` is nearer the floor than ``b``: higher agreement, then higher SQNR."""
    key = lambda t: (t.top1_agreement if t.top1_agreement is not None else -1.0,  # noqa: E731
                     float("inf") if t.sqnr_db is None else t.sqnr_db)
    return key(a) > key(b)
