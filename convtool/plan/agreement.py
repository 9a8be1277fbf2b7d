"""``AgreementTarget``: the fastest separated model that still does the original's job on held-out data.

The costing of the layers (each rank's FLOPs, milliseconds and error) is the expensive part of a
budget and does not depend on its size: the trials share one, and a budget whose plan was tried
already is not tried again. Each trial is refit on the calibration data less a held-out part,
judged on that part alone and, unless FLOPs are what the user asked to save, timed end to end
against the original (the trials do both), so the figures the search trusts were never fit to
and never modelled. The budget is bisected for the boundary of the floor; agreement need not
fall exactly monotonically with the budget, and what is returned is always a trial measured to
meet the floor (the fastest of them, or the fewest FLOPs), never an interpolated one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from ..core.records import Search, Trial, measured_words
from ..errors import InvalidOptionError, NothingToSeparateError
from .budget import Agreement, Attempt, Budget, Needs, Timing, Trials
from .budgets import FlopsTarget, TimeBudget, fraction_reason
from .costing import FLOPS, MS

log = logging.getLogger(__name__)

STEPS = 7  # bisections of the budget range: about 1/128 of it
MINIMIZE = ("latency", "flops")
LATENCY_TOLERANCE = 0.1  # a share of a latency cap, as a LatencyTarget's: timings of one run vary by that much


@dataclass(frozen=True)
class AgreementTarget(Budget):
    """The fastest separated model that still agrees with the original on held-out data.

    Users know the agreement they need, not the budget that gives it. A part of the calibration
    data (``held_out``, a quarter by default) is kept aside from the refit; budgets are tried (one
    costing of the layers serves them all), each separation refit on the rest, measured on the
    held-out part and timed against the original on the latency provider (onnxruntime CPU unless
    another is named), and of those meeting every floor the one measured fastest is returned
    (``minimize="flops"``: the fewest FLOPs, untimed). ``top1``: the share of held-out samples
    whose answer is the original's: their top class (a model returning one (batch, classes) float
    output), or what ``agreement(reference, outputs)`` says for the task (strings read alike,
    decisions kept; both lists of the float outputs over the held-out samples); ``sqnr_db``: the
    signal-to-error ratio of all outputs together, in dB (any model). ``latency``: also at most
    this fraction of the original's latency (within 10% of it, as timings vary); when no plan
    meets both, one line says what each measured. Needs calibration data.

    Example:
        >>> convtool.separate(model, x, rank=convtool.AgreementTarget(0.99), calibration=images)
    """

    top1: float | None = None
    sqnr_db: float | None = None
    sensitivity: bool | None = None
    held_out: float = 0.25
    minimize: str = "latency"
    latency: float | None = None
    agreement: Agreement | None = None

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
        if self.minimize not in MINIMIZE:
            raise InvalidOptionError(f"an agreement target minimizes {' or '.join(MINIMIZE)}; got {self.minimize!r}")
        if self.latency is not None and (reason := fraction_reason(self.latency, "a latency cap is a fraction of the original's latency")):
            raise InvalidOptionError(reason)
        if self.agreement is not None and (not callable(self.agreement) or self.top1 is None):
            raise InvalidOptionError("an agreement measure is a function (reference outputs, outputs) -> share kept, with a "
                                     "floor for it (top1)")

    @property
    def measure(self) -> str:
        """What the ``top1`` floor measures, in words: the task's measure by its name, or ``top-1 agreement``."""
        return getattr(self.agreement, "__name__", "agreement") if self.agreement is not None else "top-1 agreement"

    def floors(self) -> str:
        """The floors in words: ``top-1 agreement >= 0.99 and SQNR >= 20 dB``."""
        parts = ([f"{self.measure} >= {self.top1:g}"] if self.top1 is not None else []) + (
            [f"SQNR >= {self.sqnr_db:g} dB"] if self.sqnr_db is not None else [])
        return " and ".join(parts)

    def met(self, top1: float | None, sqnr_db: float | None) -> bool:
        """Whether measured values meet every floor (an SQNR of None is infinite: identical outputs)."""
        if self.top1 is not None and (top1 is None or top1 < self.top1):
            return False
        return self.sqnr_db is None or sqnr_db is None or sqnr_db >= self.sqnr_db

    @property
    def timed(self) -> bool:
        return self.minimize == "latency" or self.latency is not None

    def needs(self) -> Needs:
        return Needs(held_out=self.held_out, timing=Timing() if self.timed else None,
                     top1=self.top1 is not None and self.agreement is None, agreement=self.agreement)

    def check(self, *, inputs: bool, data: bool) -> None:
        if not data:
            raise InvalidOptionError("an agreement target measures the separated model on held-out calibration data: pass calibration")
        FlopsTarget(0.5, self.sensitivity).check(inputs=True, data=data)

    def search(self, trials: Trials) -> tuple[Any, Search]:
        """Bisect the budget (milliseconds of the layers, or FLOPs) for the boundary of the floors on held-out data.

        Raises:
            NothingToSeparateError: no budget that separates a layer meets the floors, or none meets
                them within the latency cap (one line saying what each measured).
        """
        bisection = _Bisection(self, trials)
        best = bisection.run()
        if best is None:
            closest = max(bisection.tried, key=_nearness, default=None)
            near = (f"; the closest was {measured_words(closest.top1_agreement, closest.sqnr_db, self.measure)} at "
                    f"{closest.flops_fraction:.2f} of the FLOPs") if closest else ""
            raise NothingToSeparateError(
                f"no budget meets {self.floors()} on {trials.samples} held-out calibration samples{near}: "
                "lower the floor, or give more calibration data")
        if self.latency is not None and best.ratio > self.latency * (1 + LATENCY_TOLERANCE):
            bisection.at_cap(self.latency)  # what the latency asked for keeps, measured, for the message
            raise NothingToSeparateError(self._both_missed(best, bisection.tried, trials.samples))
        cost = "the fastest model" if self.timed and self.minimize == "latency" else "the fewest FLOPs"
        baseline = getattr(trials, "baseline", "the original")
        goal = f"{cost} meeting {self.floors()} on {trials.samples} held-out calibration samples" + (
            f" within {self.latency:g} of {baseline}'s latency" if self.latency is not None else "")
        return best.result, Search(self, goal, True, "", best.flops_fraction, best.latency, best.top1_agreement, best.sqnr_db,
                                   trials.samples, None, tuple(bisection.tried), baseline)

    def _both_missed(self, fastest: Attempt, tried: list[Trial], samples: int) -> str:
        """Why the floor and the latency cap cannot both hold, in one line, naming what each measured."""
        timed = [t for t in tried if t.latency_ratio is not None]
        within = [t for t in timed if t.latency_ratio <= self.latency * (1 + LATENCY_TOLERANCE)]
        best_within = max(within, key=_nearness, default=None)
        fastest_tried = min(timed, key=lambda t: t.latency_ratio)
        at_cap = (f"; the plans within it kept at most {measured_words(best_within.top1_agreement, best_within.sqnr_db, self.measure)}"
                  if best_within else f"; no plan tried ran within it (the fastest measured {fastest_tried.latency_ratio:.3f}, "
                  f"keeping {measured_words(fastest_tried.top1_agreement, fastest_tried.sqnr_db, self.measure)})")
        return (f"no plan meets both {self.floors()} and {self.latency:g} of the original's latency: the fastest meeting the "
                f"floor on {samples} held-out samples measured {fastest.ratio:.3f} of the latency{at_cap}: lower the floor "
                "or raise the latency cap")


class _Bisection:
    """The trials of one agreement search, and the best meeting the floors so far."""

    def __init__(self, target: AgreementTarget, trials: Trials) -> None:
        self.target, self.trials = target, trials
        self.unit = MS if target.minimize == "latency" else FLOPS
        self.tried: list[Trial] = []
        self.best: Attempt | None = None
        self.outcomes: dict[tuple, bool | None] = {}  # by the plan's picks: a plan already tried is not tried again

    def at_cap(self, latency: float) -> None:
        """One more trial, at the latency cap as a first guess of the layers' milliseconds, unless one ran within it."""
        if not any(t.latency_ratio is not None and t.latency_ratio <= latency * (1 + LATENCY_TOLERANCE) for t in self.tried):
            self.attempt(latency if self.unit == MS else self.trials.costing.floor(FLOPS))

    def budget(self, fraction: float) -> Budget:
        if self.unit == MS:
            return TimeBudget(fraction, self.target.sensitivity)
        return FlopsTarget(fraction, self.target.sensitivity)

    def run(self) -> Attempt | None:
        first = self.attempt(0.5)  # fills the costing; its floor bounds the search from below
        floor = self.trials.costing.floor(self.unit) if self.trials.costing.filled else 0.5
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
        budget = self.budget(fraction)
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

    def _picks(self, budget: Budget) -> tuple | None:
        costing = self.trials.costing
        return None if not costing.filled else tuple(sorted(budget.plan(costing).picks.items(), key=lambda kv: kv[0]))

    def _judged(self, fraction: float, attempt: Attempt) -> bool:
        met = self.target.met(attempt.top1_agreement, attempt.sqnr_db)
        self.tried.append(Trial(fraction, self.unit, attempt.flops_fraction, attempt.ratio, attempt.top1_agreement,
                                attempt.sqnr_db, met))
        log.info("budget %.3f of the %s (FLOPs %.3f, latency %s): agreement %s, SQNR %s dB%s", fraction, self.unit,
                 attempt.flops_fraction, attempt.ratio, attempt.top1_agreement, attempt.sqnr_db, " meets the floor" if met else "")
        if met and (self.best is None or self._cost(attempt) < self._cost(self.best)):
            self.best = attempt
        return met

    def _cost(self, attempt: Attempt) -> float:
        """What the search minimizes: the measured latency, else the FLOPs."""
        return attempt.ratio if attempt.ratio is not None and self.target.minimize == "latency" else attempt.flops_fraction


def _nearness(trial: Trial) -> tuple[float, float]:
    """How near the floor a trial came: higher agreement, then higher SQNR."""
    return (trial.top1_agreement if trial.top1_agreement is not None else -1.0,
            math.inf if trial.sqnr_db is None else trial.sqnr_db)
