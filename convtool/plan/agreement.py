"""``AgreementTarget``: the smallest budget whose separated model still agrees with the original on held-out data.

The costing of the layers (each rank's FLOPs and error, sensitivity included) is the expensive
part of a budget and does not depend on its size: the trials share one, and a budget whose plan
was tried already is not tried again. Each trial is refit on the calibration data less a
held-out part, and judged on that part alone (the trials do it), so the figure the search trusts
was never fit to. Agreement need not fall exactly monotonically with the budget; what is
returned is always a trial measured to meet the floors, never an interpolated one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from ..core.records import Search, Trial, measured_words
from ..errors import InvalidOptionError, NothingToSeparateError
from .budget import Attempt, Budget, Needs, Trials
from .budgets import FlopsTarget
from .costing import FLOPS

log = logging.getLogger(__name__)

STEPS = 7  # bisections of the budget range: about 1/128 of it


@dataclass(frozen=True)
class AgreementTarget(Budget):
    """The fewest FLOPs whose separated model still agrees with the original on held-out data.

    Users know the agreement they need, not the FLOP fraction that gives it. A part of the
    calibration data (``held_out``, a quarter by default) is kept aside from the refit; FLOP
    budgets are tried (one costing of the layers serves them all), each separation refit on the
    rest and measured on the held-out part, and the smallest budget meeting every floor given
    wins. ``top1``: the share of held-out samples whose top class is the original's (a model
    returning one (batch, classes) float output); ``sqnr_db``: the signal-to-error ratio of all
    outputs together, in dB (any model). Needs calibration data.

    Example:
        >>> convtool.separate(model, x, rank=convtool.AgreementTarget(0.99), calibration=images)
    """

    top1: float | None = None
    sqnr_db: float | None = None
    sensitivity: bool = False
    held_out: float = 0.25

    def __post_init__(self) -> None:
        if self.top1 is None and self.sqnr_db is None:
            raise InvalidOptionError("an agreement target needs a floor: a top-1 agreement in (0, 1] or an SQNR in dB")
        if self.top1 is not None and (isinstance(self.top1, bool) or not isinstance(self.top1, (int, float))
                                      or not 0 < self.top1 <= 1):
            raise InvalidOptionError(f"a top-1 agreement floor is a share in (0, 1]; got {self.top1!r}")
        if self.sqnr_db is not None and (isinstance(self.sqnr_db, bool) or not isinstance(self.sqnr_db, (int, float))
                                         or not math.isfinite(self.sqnr_db)):
            raise InvalidOptionError(f"an SQNR floor is a finite number of dB; got {self.sqnr_db!r}")
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, (int, float)) or not 0 < self.held_out < 1:
            raise InvalidOptionError(f"the held-out share of the calibration data is in (0, 1); got {self.held_out!r}")

    def floors(self) -> str:
        """The floors in words: ``top-1 agreement >= 0.99 and SQNR >= 20 dB``."""
        parts = ([f"top-1 agreement >= {self.top1:g}"] if self.top1 is not None else []) + (
            [f"SQNR >= {self.sqnr_db:g} dB"] if self.sqnr_db is not None else [])
        return " and ".join(parts)

    def met(self, top1: float | None, sqnr_db: float | None) -> bool:
        """Whether measured values meet every floor (an SQNR of None is infinite: identical outputs)."""
        if self.top1 is not None and (top1 is None or top1 < self.top1):
            return False
        return self.sqnr_db is None or sqnr_db is None or sqnr_db >= self.sqnr_db

    def needs(self) -> Needs:
        return Needs(held_out=self.held_out, top1=self.top1 is not None)

    def check(self, *, inputs: bool, data: bool) -> None:
        if not data:
            raise InvalidOptionError("an agreement target measures the separated model on held-out calibration data: pass calibration")
        FlopsTarget(0.5, self.sensitivity).check(inputs=True, data=data)

    def search(self, trials: Trials) -> tuple[Any, Search]:
        """Bisect the FLOP budget for the smallest one meeting the floors on held-out data.

        Raises:
            NothingToSeparateError: no budget that separates a layer meets the floors.
        """
        bisection = _Bisection(self, trials)
        best = bisection.run()
        if best is None:
            closest = max(bisection.tried, key=_nearness, default=None)
            near = (f"; the closest was {measured_words(closest.top1_agreement, closest.sqnr_db)} at "
                    f"{closest.flops_fraction:.2f} of the FLOPs") if closest else ""
            raise NothingToSeparateError(
                f"no FLOP budget meets {self.floors()} on {trials.samples} held-out calibration samples{near}: "
                "lower the floor, or give more calibration data")
        goal = f"the fewest FLOPs meeting {self.floors()} on {trials.samples} held-out calibration samples"
        return best.result, Search(self, goal, True, "", best.flops_fraction, best.latency, best.top1_agreement, best.sqnr_db,
                                   trials.samples, None, tuple(bisection.tried))


class _Bisection:
    """The trials of one agreement search, and the best meeting the floors so far."""

    def __init__(self, target: AgreementTarget, trials: Trials) -> None:
        self.target, self.trials = target, trials
        self.tried: list[Trial] = []
        self.best: Attempt | None = None
        self.outcomes: dict[tuple, bool | None] = {}  # by the plan's picks: a plan already tried is not tried again

    def run(self) -> Attempt | None:
        first = self.attempt(0.5)  # fills the costing; its floor bounds the search from below
        floor = self.trials.costing.floor(FLOPS) if self.trials.costing.filled else 0.5
        low, high = (0.5, 1.0) if first is False else (min(floor, 0.5), 0.5)
        for _ in range(STEPS):
            middle = (low + high) / 2
            if high - low < 1e-3:
                break
            outcome = self.attempt(middle)
            if outcome:
                high = middle
            else:  # too little agreement, or every layer dense (the budget then buys nothing): search below
                low, high = (middle, high) if outcome is False else (low, middle)
        return self.best

    def attempt(self, fraction: float) -> bool | None:
        """Whether the separation at ``fraction`` meets the floors (None: it separates nothing)."""
        budget = FlopsTarget(fraction, sensitivity=self.target.sensitivity)
        picks = self._picks(budget)
        if picks is not None and picks in self.outcomes:
            return self.outcomes[picks]
        try:
            attempt = self.trials.run(budget)
        except NothingToSeparateError:
            if not self.trials.costing.layers:
                raise  # nothing to separate at any budget: the model's own reason
            outcome = None  # this budget keeps every conv dense
        else:
            outcome = self._judged(fraction, attempt)
        self.outcomes[picks if picks is not None else self._picks(budget)] = outcome
        return outcome

    def _picks(self, budget: FlopsTarget) -> tuple | None:
        costing = self.trials.costing
        return None if not costing.filled else tuple(sorted(budget.plan(costing).picks.items(), key=lambda kv: kv[0]))

    def _judged(self, fraction: float, attempt: Attempt) -> bool:
        met = self.target.met(attempt.top1_agreement, attempt.sqnr_db)
        self.tried.append(Trial(fraction, FLOPS, attempt.flops_fraction, attempt.ratio, attempt.top1_agreement, attempt.sqnr_db, met))
        log.info("FLOP budget %.3f (reached %.3f): top-1 agreement %s, SQNR %s dB%s", fraction, attempt.flops_fraction,
                 attempt.top1_agreement, attempt.sqnr_db, " meets the floor" if met else "")
        if met and (self.best is None or attempt.flops_fraction < self.best.flops_fraction):
            self.best = attempt
        return met


def _nearness(trial: Trial) -> tuple[float, float]:
    """How near the floor a trial came: higher agreement, then higher SQNR."""
    return (trial.top1_agreement if trial.top1_agreement is not None else -1.0,
            math.inf if trial.sqnr_db is None else trial.sqnr_db)
