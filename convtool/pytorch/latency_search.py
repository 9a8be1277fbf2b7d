"""``LatencyTarget``: a budget in measured milliseconds, repaired until the whole model meets it.

Each layer's options are timed alone, in the form they ship in, at the layer's input shape
(one :class:`~convtool.plan.ranks.Costing`, filled by the first plan and reused by every
round). Layers timed alone do not add up to the model: the operators between the convs,
session overhead and caches are not in their sum. So the budget the knapsack spends is only a
first guess: each round's separated model is exported and timed against the original,
interleaved, and while that end-to-end ratio misses the target the per-layer budget is moved
by the miss (a secant through the rounds bracketing the target, anchored at "every layer dense
runs at the original's speed"), a bounded number of rounds. What is returned was measured:
its ratio is that round's benchmark, never an interpolation.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn

from ..core.inputs import as_inputs
from ..core.modules import SeparableConv, runtime_forms
from ..core.records import Benchmark, FlopsTarget, LatencyRound, LatencySearch, LatencyTarget
from ..deploy.verify import AgainstOriginal
from ..errors import InvalidOptionError, NothingToSeparateError
from ..measure.onnxrt import module_latency, provider_name, require_provider
from ..plan.ranks import Costing, Latency

log = logging.getLogger(__name__)

# Separates the model at one per-layer budget, reusing (and first filling) the costing.
SeparateAt = Callable[[FlopsTarget, Costing], Any]
# Times a separated model against the original, interleaved.
Timer = Callable[[nn.Module], Benchmark]


def shipped_latency(provider: str) -> Latency:
    """Times a dense conv as it is, and a pair in the form ``export_onnx`` ships it in (its preferred runtime form)."""
    name = require_provider(provider)

    def latency(module: nn.Module, shape: tuple[int, ...]) -> float:
        form = runtime_forms(module, {shape[-1]})[-1] if isinstance(module, SeparableConv) else module
        return module_latency(form, shape, name)

    return latency


def meet_latency(original: nn.Module, example_inputs: Any, target: LatencyTarget, latency_provider: str | None,
                 separate_in_ms: Callable[[FlopsTarget, Costing, Latency], Any]) -> tuple[Any, LatencySearch]:
    """:func:`search_latency` with layers timed in their shipped form and each round as :func:`~convtool.benchmark` times.

    ``separate_in_ms(budget, costing, latency)`` separates the model at one per-layer budget;
    ``latency_provider``, when the caller also gave one, must name the target's provider.

    Raises:
        ProviderUnavailableError: the target's provider cannot run here (refused before any work).
        InvalidOptionError: no example inputs, or a ``latency_provider`` naming another provider.
    """
    latency = shipped_latency(target.provider)
    if latency_provider is not None and provider_name(latency_provider) != provider_name(target.provider):
        raise InvalidOptionError(
            f"latency_provider {latency_provider!r} differs from the latency target's provider {target.provider!r}: drop one")
    if not as_inputs(example_inputs):
        raise InvalidOptionError("a latency target times the whole model on its example inputs: pass example inputs")

    def separate_at(budget: FlopsTarget, costing: Costing) -> Any:
        return separate_in_ms(budget, costing, latency)

    # TorchScript, as the layers are timed: torch.export would take seconds per round for the same operators.
    with AgainstOriginal(original, example_inputs, provider=target.provider, threads=target.threads, exporter="torchscript") as timing:
        return search_latency(target, separate_at, lambda separated: timing.benchmark(separated, runs=target.runs))


def search_latency(target: LatencyTarget, separate_at: SeparateAt, timer: Timer) -> tuple[Any, LatencySearch]:
    """Plan on measured layer milliseconds, then repair the plan until the end-to-end ratio is within the target's tolerance.

    Returns the separation chosen and the record of every round. The one chosen is the first
    round within tolerance; failing that, the slowest round still faster than the target (the
    least error); failing that, the fastest measured, with the floor when the fastest plan
    there is was among them.

    Raises:
        NothingToSeparateError: no conv can be separated at all, or none is faster than dense.
    """
    costing = Costing(in_ms=True)
    goal, slack = target.fraction, target.tolerance * target.fraction
    tried: list[tuple[LatencyRound, Any, tuple, Benchmark]] = []
    floor_ratio: float | None = None
    budget = goal
    for step in range(target.rounds):
        picks = costing.picks(budget) if costing.choices else None
        if picks is not None and any(t[2] == picks for t in tried):
            budget = _untried(costing, budget, tried, goal)
            if budget is None:
                break
            picks = costing.picks(budget)
        try:
            result = separate_at(FlopsTarget(budget, sensitivity=target.sensitivity), costing)
        except NothingToSeparateError:
            if tried:  # a budget so wide every layer stays dense: the rounds measured so far are all there is
                break
            if costing.choices and _every_layer_dense(costing):
                raise NothingToSeparateError(
                    f"nothing to separate for a latency target: no layer's separated form runs faster than its dense conv on "
                    f"{target.provider}") from None
            raise
        timing = timer(result.model)
        ratio = timing.separated_ms / timing.original_ms
        flops = result.flops_after / result.flops_before if result.flops_before else 1.0
        done = abs(ratio - goal) <= slack
        record = LatencyRound(budget, flops, timing.original_ms, timing.separated_ms, ratio, done)
        tried.append((record, result, picks if picks is not None else costing.picks(budget), timing))
        log.info("latency round %d: layer budget %.3f, FLOPs %.3f, %.3g / %.3g ms = %.3f of the original",
                 step + 1, budget, flops, timing.separated_ms, timing.original_ms, ratio)
        at_floor = budget <= costing.floor * (1 + 1e-9)
        if done:
            break
        if ratio > goal and at_floor:
            floor_ratio = ratio  # the fastest plan there is misses: the target is below reach
            break
        budget = _next_budget(goal, [t[0] for t in tried], costing.floor)
        if step == target.rounds - 2 and all(t[0].ratio > goal + slack for t in tried):
            budget = costing.floor  # the last round: measure the fastest plan, so a miss states its floor
    record, result, _, timing = _chosen(tried, goal)
    met = record.ratio <= goal + slack
    reason = _why_not(target, record, floor_ratio, len(tried))
    search = LatencySearch(target, timing.provider, timing.runs, timing.threads, record.original_ms, record.separated_ms,
                           record.ratio, record.flops_fraction, met, floor_ratio, reason, tuple(t[0] for t in tried))
    return result, search


def _next_budget(goal: float, rounds: list[LatencyRound], floor: float) -> float:
    """The per-layer budget a secant predicts meets the goal, kept inside the bracket the rounds measured.

    The points are the rounds, and (1, 1): at a budget of every layer dense the model runs at
    the original's speed. The secant runs through the nearest measured point on each side of
    the goal; where the rounds are all on one side, through (1, 1) and the nearest one.
    """
    points = sorted({(1.0, 1.0), *((r.layer_budget, r.ratio) for r in rounds)})
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


def _untried(costing: Costing, budget: float, tried: list, goal: float) -> float | None:
    """A budget near ``budget`` whose plan was not tried yet, moving the way the last miss asks; None if there is none."""
    last = tried[-1][0]
    down = last.ratio > goal
    edge = costing.floor if down else 1.0
    seen = {t[2] for t in tried}
    candidate = budget
    for _ in range(6):
        candidate = (candidate + edge) / 2
        if costing.picks(candidate) not in seen:
            return candidate
    return edge if costing.picks(edge) not in seen else None


def _every_layer_dense(costing: Costing) -> bool:
    return all(len(c.options) == 1 for c in costing.choices.values())


def _chosen(tried: list, goal: float) -> tuple:
    """The round to return: within tolerance first; else the slowest faster than the goal; else the fastest."""
    within = [t for t in tried if t[0].within]
    if within:
        return within[-1]
    faster = [t for t in tried if t[0].ratio <= goal]
    if faster:
        return max(faster, key=lambda t: t[0].ratio)
    return min(tried, key=lambda t: t[0].ratio)


def _why_not(target: LatencyTarget, record: LatencyRound, floor: float | None, rounds: int) -> str:
    """Why the returned plan is not within the tolerance of the target, in one sentence ("" when it is)."""
    if record.within:
        return ""
    if floor is not None:
        return (f"the target {target.fraction:g} is below what separation reaches on {target.provider}: the fastest plan "
                f"(every layer at its fastest option) measured {floor:.3f} of the original's latency")
    if record.ratio <= target.fraction:
        return (f"no plan within {target.tolerance:.0%} of {target.fraction:g} in {rounds} rounds (the layers' options "
                f"are too coarse, or the timings too noisy); the slowest plan faster than the target measured {record.ratio:.3f}")
    return (f"no plan within {target.tolerance:.0%} of {target.fraction:g} in {rounds} rounds, and the fastest plan was not "
            f"measured; the fastest tried measured {record.ratio:.3f}: allow more rounds")
