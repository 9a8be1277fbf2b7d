"""``LatencyTarget``: a budget in measured milliseconds, repaired until the whole model meets it.

Each layer's options are timed alone, in the form they ship in, at the layer's input shape (one
costing, filled by the first trial and reused by every later one). Layers timed alone do not
add up to the model: the operators between the convs, session overhead and caches are not in
their sum. So the milliseconds the knapsack spends (a :class:`~convtool.plan.budgets.TimeBudget`)
are only a first guess: each trial's model is timed against the original end to end,
interleaved, and while that ratio misses the target the per-layer budget is moved by the miss
(a secant through the trials bracketing the target, anchored at "every layer dense runs at the
original's speed"), a bounded number of rounds. What is returned was measured: its ratio is
that trial's own timing, never an interpolation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..core.records import Search, Trial
from ..errors import InvalidOptionError, NothingToSeparateError
from .budget import Attempt, Budget, Needs, Timing, Trials
from .budgets import TimeBudget, fraction_reason
from .costing import MS, Costing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyTarget(Budget):
    """Choose ranks so the separated model runs in ``fraction`` of the original's time on ``provider``.

    Measured, not modelled: each layer's candidate ranks are timed alone in the form they ship
    in (dense included) at the layer's input shape, the knapsack spends milliseconds instead of
    FLOPs (errors and ``sensitivity`` as for :class:`FlopsTarget`), and the whole separated
    model is then timed against the original, interleaved (``runs`` each, ``threads``
    onnxruntime threads; its default when None). While that end-to-end ratio misses the target
    by more than ``tolerance`` (a share of it), the per-layer budget is corrected by the miss
    and the plan made again, at most ``rounds`` times. A target below what separation can reach
    returns the fastest plan, with the ratio it measured as the floor. Needs example inputs.

    Example:
        >>> convtool.separate(model, x, rank=convtool.LatencyTarget(0.5, provider="cpu"))
    """

    fraction: float
    provider: str = "cpu"
    sensitivity: bool | None = None
    runs: int = 30
    threads: int | None = None
    rounds: int = 5
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        reason = fraction_reason(self.fraction, "a latency target is a fraction of the original's latency")
        if reason:
            raise InvalidOptionError(reason)
        if not isinstance(self.provider, str) or not self.provider:
            raise InvalidOptionError(f"a latency target's provider is an onnxruntime provider name such as 'cpu'; got {self.provider!r}")
        for name in ("runs", "rounds", "threads"):
            value = getattr(self, name)
            if name == "threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"a latency target's {name} is a positive integer; got {value!r}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not 0 < self.tolerance < 1:
            raise InvalidOptionError(f"a latency target's tolerance is a share of the target in (0, 1); got {self.tolerance!r}")

    def needs(self) -> Needs:
        return Needs(timing=Timing(self.provider, self.runs, self.threads))

    def check(self, *, inputs: bool, data: bool) -> None:
        if not inputs:
            raise InvalidOptionError("a latency target times the whole model on its example inputs: pass example inputs")
        TimeBudget(self.fraction, self.sensitivity).check(inputs=inputs, data=data)

    def search(self, trials: Trials) -> tuple[Any, Search]:
        """Plan on measured layer milliseconds, then repair the plan until the end-to-end ratio is within tolerance.

        The one returned is the first trial within tolerance; failing that, the slowest still
        faster than the target (the least error); failing that, the fastest measured, with the
        floor when the fastest plan there is was among them.

        Raises:
            NothingToSeparateError: no conv can be separated at all, or none is faster than dense.
        """
        repair = _Repair(self, trials)
        repair.run()
        index = _chosen(repair.tried, self.fraction)
        chosen, trial = repair.attempts[index], repair.tried[index]
        reason = _why_not(self, trial, repair.floor, len(repair.tried))
        baseline = getattr(trials, "baseline", "the original")
        goal = f"{self.fraction:g} of {baseline}'s latency on {self.provider}"
        search = Search(self, goal, trial.latency_ratio <= self.fraction * (1 + self.tolerance), reason,
                        chosen.flops_fraction, chosen.latency, None, None, 0, repair.floor, tuple(repair.tried), baseline)
        return chosen.result, search


class _Repair:
    """The rounds of one latency search: each a per-layer budget, its model, and its end-to-end ratio."""

    def __init__(self, target: LatencyTarget, trials: Trials) -> None:
        self.target, self.trials = target, trials
        self.tried: list[Trial] = []
        self.attempts: list[Attempt] = []
        self.plans: list[tuple] = []
        self.floor: float | None = None

    def run(self) -> None:
        goal, slack = self.target.fraction, self.target.tolerance * self.target.fraction
        budget: float | None = goal
        for step in range(self.target.rounds):
            costing = self.trials.costing
            if costing.filled and self.plans and _plan_of(costing, budget) in self.plans:
                budget = _untried(costing, budget, self.plans, self.attempts[-1].ratio > goal)
                if budget is None:
                    break
            if not self._try(budget, step):
                break
            ratio = self.attempts[-1].ratio
            at_floor = budget <= self.trials.costing.floor(MS) * (1 + 1e-9)
            if abs(ratio - goal) <= slack:
                break
            if ratio > goal and at_floor:
                self.floor = ratio  # the fastest plan there is misses: the target is below reach
                break
            budget = _next_budget(goal, self.tried, self.trials.costing.floor(MS))
            if step == self.target.rounds - 2 and all(t.latency_ratio > goal + slack for t in self.tried):
                budget = self.trials.costing.floor(MS)  # the last round: measure the fastest plan, so a miss states its floor

    def _try(self, budget: float, step: int) -> bool:
        """One round at ``budget``; False when it keeps every layer dense after earlier rounds (nothing more to learn)."""
        try:
            attempt = self.trials.run(TimeBudget(budget, self.target.sensitivity))
        except NothingToSeparateError:
            costing = self.trials.costing
            if self.tried:  # a budget so wide every layer stays dense: the rounds measured so far are all there is
                return False
            if costing.layers and all(len(c.flops) == 1 for c in costing.layers.values()):
                raise NothingToSeparateError(
                    f"nothing to separate for a latency target: no layer's separated form runs faster than its dense conv on "
                    f"{self.target.provider}") from None
            raise
        ratio = attempt.ratio
        within = abs(ratio - self.target.fraction) <= self.target.tolerance * self.target.fraction
        self.tried.append(Trial(budget, MS, attempt.flops_fraction, ratio, None, None, within))
        self.attempts.append(attempt)
        self.plans.append(_plan_of(self.trials.costing, budget))
        log.info("latency round %d: layer budget %.3f, FLOPs %.3f, %.3g / %.3g ms = %.3f of the original", step + 1, budget,
                 attempt.flops_fraction, attempt.latency.separated_ms, attempt.latency.original_ms, ratio)
        return True


def _plan_of(costing: Costing, budget: float) -> tuple:
    """What the knapsack picks at a per-layer budget: budgets giving the same plan give the same model."""
    return tuple(sorted(TimeBudget(budget).plan(costing).picks.items()))


def _next_budget(goal: float, rounds: list[Trial], floor: float) -> float:
    """The per-layer budget a secant predicts meets the goal, kept inside the bracket the rounds measured.

    The points are the rounds, and (1, 1): at a budget of every layer dense the model runs at
    the original's speed. The secant runs through the nearest measured point on each side of
    the goal; where the rounds are all on one side, through (1, 1) and the nearest one.
    """
    points = sorted({(1.0, 1.0), *((r.budget, r.latency_ratio) for r in rounds)})
    above = [p for p in points if p[1] > goal]  # too slow: the budget must go below these
    below = [p for p in points if p[1] <= goal]
    high = min(above, key=lambda p: p[0]) if above else (1.0, 1.0)
    low = max(below, key=lambda p: p[0]) if below else None
    if low is None:  # all too slow: extrapolate down through the two smallest budgets
        slow = sorted(above)[:2]
        (b0, r0), (b1, r1) = slow if len(slow) == 2 else (slow[0], (1.0, 1.0))
        if b1 - b0 <= 1e-9 or r1 - r0 <= 1e-9:
            return max(floor, b0 * goal / max(r0, 1e-9))
        guess = b0 + (goal - r0) * (b1 - b0) / (r1 - r0)
        return min(max(floor, guess), b0 * (1 - 1e-6))
    (b0, r0), (b1, r1) = low, high
    if r1 - r0 <= 1e-9 or b1 - b0 <= 1e-9:
        return (b0 + b1) / 2
    guess = b0 + (goal - r0) * (b1 - b0) / (r1 - r0)
    inside = b0 + 0.05 * (b1 - b0) <= guess <= b1 - 0.05 * (b1 - b0)
    return max(floor, guess if inside else (b0 + b1) / 2)


def _untried(costing: Costing, budget: float, plans: list[tuple], down: bool) -> float | None:
    """A budget near ``budget`` whose plan was not tried yet, moving the way the last miss asks; None if there is none."""
    edge = costing.floor(MS) if down else 1.0
    candidate = budget
    for _ in range(6):
        candidate = (candidate + edge) / 2
        if _plan_of(costing, candidate) not in plans:
            return candidate
    return edge if _plan_of(costing, edge) not in plans else None


def _chosen(tried: list[Trial], goal: float) -> int:
    """The round to return: the last within tolerance; else the slowest faster than the goal; else the fastest."""
    within = [i for i, t in enumerate(tried) if t.met]
    if within:
        return within[-1]
    faster = [i for i, t in enumerate(tried) if t.latency_ratio <= goal]
    if faster:
        return max(faster, key=lambda i: tried[i].latency_ratio)
    return min(range(len(tried)), key=lambda i: tried[i].latency_ratio)


def _why_not(target: LatencyTarget, trial: Trial, floor: float | None, rounds: int) -> str:
    """Why the returned plan is not within the tolerance of the target, in one sentence ("" when it is)."""
    if trial.met:
        return ""
    if floor is not None:
        return (f"the target {target.fraction:g} is below what separation reaches on {target.provider}: the fastest plan "
                f"(every layer at its fastest option) measured {floor:.3f} of the original's latency")
    if trial.latency_ratio <= target.fraction:
        return (f"no plan within {target.tolerance:.0%} of {target.fraction:g} in {rounds} rounds (the layers' options "
                f"are too coarse, or the timings too noisy); the slowest plan faster than the target measured {trial.latency_ratio:.3f}")
    return (f"no plan within {target.tolerance:.0%} of {target.fraction:g} in {rounds} rounds, and the fastest plan was not "
            f"measured; the fastest tried measured {trial.latency_ratio:.3f}: allow more rounds")
