"""The plain budgets: a fixed rank, an energy, a FLOP target, and milliseconds of the layers' time.

Each plans in one trial from a costing (:mod:`~convtool.plan.budget` for the protocol). A fixed
rank and an energy pick one option per layer by a rule; a FLOP target and a time budget spend
their unit over every layer at once with the knapsack, where the error costs least.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidOptionError
from .budget import Budget, Plan
from .costing import FLOPS, MS, Costing, Request
from .knapsack import DENSE
from .ranks import Key, energy_option, fixed_option, single_channel_reason


def fraction_reason(value: object, what: str) -> str | None:
    """Why ``value`` is not a fraction in (0, 1], in words starting with ``what`` (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        return f"{what} in (0, 1]; got {value!r}"
    return None


def slower_reason(costing: Costing, key: Key) -> str:
    return f"kept dense: rank {key[1]} ({key[0]}) is not faster than the dense conv on {costing.timed_on}"


def _per_layer_plan(costing: Costing, wanted: dict[str, Key], reasons: dict[str, str]) -> Plan:
    """Each layer at the option its rule wants, where that option survived the costing (dense otherwise)."""
    picks: dict[str, Key | None] = {}
    for name, layer in costing.layers.items():
        key = wanted.get(name)
        picks[name] = key if key is not None and key in layer.flops else None
        if picks[name] is None and name not in reasons:
            reasons[name] = layer.reason or (slower_reason(costing, key) if key in layer.slower else "kept dense")
    reasons.update(costing.uncosted)
    return Plan(picks, reasons)


@dataclass(frozen=True)
class FixedRank(Budget):
    """The same rank at every layer (``rank=2``), or the exact one (``rank="full"``: ``rank`` None)."""

    rank: int | None

    def request(self) -> Request:
        return Request(lambda site, orders: single_channel_reason(site) or [fixed_option(site, self.rank, orders)])

    def plan(self, costing: Costing) -> Plan:
        wanted = {name: next((k for k in [*layer.keys, *layer.slower] if k != DENSE), None) for name, layer in costing.layers.items()}
        return _per_layer_plan(costing, wanted, {})

    def never_slower(self) -> bool:
        return False  # the rank asked, everywhere: timed only where the caller names a provider


@dataclass(frozen=True)
class Energy(Budget):
    """Per layer, the smallest rank keeping ``share`` of the weight's squared singular values.

    A layer whose pair at that rank would cost more than the dense conv stays dense.

    Example:
        >>> convtool.separate(model, x, rank=convtool.Energy(0.9))
    """

    share: float

    def __post_init__(self) -> None:
        reason = fraction_reason(self.share, "energy is a share of spectral energy")
        if reason:
            raise InvalidOptionError(reason)

    def request(self) -> Request:
        return Request(lambda site, orders: [energy_option(site, self.share, orders)])

    def plan(self, costing: Costing) -> Plan:
        wanted, reasons = {}, {}
        for name, layer in costing.layers.items():
            key = next((k for k in [*layer.keys, *layer.slower] if k != DENSE), None)
            if key is not None and key in layer.flops and layer.flops[key] >= layer.flops[DENSE]:
                reasons[name] = (f"kept dense: rank {key[1]} ({key[0]}), the smallest keeping {self.share:g} of the energy, "
                                 f"costs {layer.flops[key]:g} multiply-adds, the dense conv {layer.flops[DENSE]:g}")
                key = None
            wanted[name] = key
        return _per_layer_plan(costing, wanted, reasons)


def spend(costing: Costing, unit: str, fraction: float, words: str) -> Plan:
    """The knapsack's plan at ``fraction`` of the costing's total in ``unit``, with why each dense layer stays so."""
    picks, met = costing.allocate(unit, fraction)
    reasons = dict(costing.uncosted)
    for name, key in picks.items():
        if key != DENSE:
            continue
        layer = costing.layers[name]
        if len(layer.flops) == 1 and layer.slower:
            reasons[name] = f"kept dense: no separated form is faster than the dense conv on {costing.timed_on}"
        elif len(layer.flops) == 1:
            reasons[name] = "kept dense: no separated form costs less than the dense conv"
        else:
            reasons[name] = f"kept dense: the {words} budget is better spent elsewhere"
    chosen = {name: (None if key == DENSE else key) for name, key in picks.items()}
    if unit == FLOPS:
        return Plan(chosen, reasons, met, costing.flops_total, costing.flops_of(picks), fraction * costing.flops_total)
    # Milliseconds of layers timed alone are a search's inner guess: what is met is the search's to say.
    return Plan(chosen, reasons, None, costing.flops_total, costing.flops_of(picks))


@dataclass(frozen=True)
class FlopsTarget(Budget):
    """Choose ranks so the whole model's FLOPs fall to ``fraction`` of before, with the least error.

    Layers may stay dense where the budget is better spent elsewhere, and, unless the caller
    allows slower layers, wherever their separated form is not measurably faster than the dense
    conv on the latency provider (onnxruntime CPU by default): "at most this many FLOPs, spent only
    where it buys time". Needs example inputs: a conv's FLOPs depend on the resolution it runs at.

    Without data, each option's error is its weight's; with calibration data, the error that
    layer's change causes at the *model's* output (``sensitivity`` None, the default: measured by
    running the model with that layer alone replaced, at a few ranks; mean KL divergence for a
    2-d float output, taken to be logits), so the budget goes where errors matter to the result;
    ``sensitivity=False`` weighs each layer's own output error instead.

    Example:
        >>> convtool.separate(model, x, rank=convtool.FlopsTarget(0.25))
    """

    fraction: float
    sensitivity: bool | None = None

    def __post_init__(self) -> None:
        reason = fraction_reason(self.fraction, "a FLOP target is a fraction of the original FLOPs")
        if reason:
            raise InvalidOptionError(reason)

    def request(self) -> Request:
        return Request(lambda site, orders: None, FLOPS, lambda total, fixed: self.fraction * total - fixed, True, self.sensitivity)

    def plan(self, costing: Costing) -> Plan:
        return spend(costing, FLOPS, self.fraction, "FLOP")

    def check(self, *, inputs: bool, data: bool) -> None:
        if not inputs:
            raise InvalidOptionError("a FLOP target needs example inputs (or calibration data) to cost each layer")
        if self.sensitivity and not data:
            raise InvalidOptionError("a FLOP target with sensitivity measures errors at the model's output on calibration data: "
                                     "pass calibration")


@dataclass(frozen=True)
class TimeBudget(Budget):
    """Choose ranks so the costed layers' measured milliseconds fall to ``fraction`` of their dense time.

    What a latency target spends in each round: layers timed alone do not add up to the model,
    so its search corrects this fraction by what the whole model measures.
    """

    fraction: float
    sensitivity: bool | None = None

    def request(self) -> Request:
        return Request(lambda site, orders: None, MS, None, True, self.sensitivity)

    def plan(self, costing: Costing) -> Plan:
        if costing.provider is None:
            raise InvalidOptionError("a latency budget needs the layers timed: name a provider")
        return spend(costing, MS, self.fraction, "latency")

    def check(self, *, inputs: bool, data: bool) -> None:
        if not inputs:
            raise InvalidOptionError("a latency budget times each layer at its input shape: pass example inputs")
        if self.sensitivity and not data:
            raise InvalidOptionError("sensitivity measures errors at the model's output on calibration data: pass calibration")


def as_budget(rank: object) -> Budget:
    """``rank`` as a budget: an int or ``"full"`` becomes a fixed rank; a budget is itself; anything else is refused."""
    if isinstance(rank, Budget):
        return rank
    if rank == "full":
        return FixedRank(None)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidOptionError(
            f"rank must be a positive integer, 'full', FlopsTarget(fraction), Energy(share), AgreementTarget(top1) or "
            f"LatencyTarget(fraction); got {rank!r}")
    return FixedRank(rank)

