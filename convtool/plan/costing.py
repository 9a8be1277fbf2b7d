"""The costing: each layer's options measured once, in every unit a budget may spend, with their errors.

A front end says what it can measure of its dense model (:class:`DenseView`): what each conv
processed on the example inputs, the model's FLOPs, a layer's input and output on calibration
data, the model's output with one weight swapped, and how long a layer's forms take on a
provider in the form it ships. The costing turns that into options per layer — FLOPs, error and,
when timed, milliseconds — and a budget (``budgets``) plans from it. Budgets tried by a search
share one costing: nothing here depends on the budget's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..errors import InvalidOptionError

from .knapsack import DENSE, Choice, allocate
from .measured import Sensitivity, model_errors, output_errors
from .ranks import Key, SiteStats, orders_of, reachable, weight_options
from .site import Site

log = logging.getLogger(__name__)

FLOPS, MS = "FLOPs", "ms"  # the units a budget spends
# A pair must take at most this share of the dense conv's time to count as faster, timed side
# by side, round-robin (a pair judged faster by noise makes the model slower): three repeats of
# the VAD's 15 µs encoder conv, idle, gave 0.907, 0.923 and 0.929 that way, and the same layer
# 0.89 and 1.23 timed alone, in two runs. Alone, ratios outside CLOSE_CALL decide on their own;
# those inside it, near the margin by any timing, are re-timed side by side.
LATENCY_MARGIN = 0.95
CLOSE_CALL = (0.6, 1.4)


class DenseView(Protocol):
    """What a front end measures of its dense model, for the costing. Each is measured when first asked."""

    provider: str | None  # where ``latency`` times (onnxruntime's name); None: layers are not timed
    precision: str  # the form ``latency`` times layers in: "fp32", or "int8" (each quantized, as the int8 file runs it)

    def stats(self) -> dict[str, SiteStats]:
        """Per site that ran on the costed inputs, its calls' pixels and first input shape."""

    def uncosted(self) -> dict[str, str]:
        """Per site without stats, why (it did not run on the inputs, say)."""

    def flops(self) -> float:
        """The whole model's multiply-adds on the costed inputs."""

    def activations(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site named, one call's input and output on the first calibration samples ({} without data)."""

    def model_error(self) -> Sensitivity | None:
        """The model's output divergence with one weight swapped, on calibration data (None without data)."""

    def latency(self, site: Site, key: Key, stats: SiteStats) -> float:
        """Median milliseconds of one call of ``key`` (dense, or a pair) at the site's input shape, as it ships."""

    def paired(self, site: Site, keys: list[Key], stats: SiteStats) -> list[float]:
        """:meth:`latency` of each of ``keys`` measured side by side, round-robin: what a close call is decided on."""


@dataclass
class LayerCost:
    """One layer's options: FLOPs over its calls, error, and, when timed, milliseconds over its calls.

    Holds no weight: a costing kept across a search must not keep every dense weight alive.
    """

    flops: dict[Key, float]
    errors: dict[Key, float]
    ms: dict[Key, float] = field(default_factory=dict)
    slower: list[Key] = field(default_factory=list)  # options dropped: not faster than the dense conv
    reason: str | None = None  # why the budget wants no option here (it then has dense alone)

    @property
    def keys(self) -> list[Key]:
        return list(self.flops)

    def choice(self, unit: str) -> Choice:
        """The options as the knapsack sees them: (cost in ``unit``, error)."""
        cost = self.flops if unit == FLOPS else self.ms
        return Choice({key: (cost.get(key, 0.0), self.errors[key]) for key in self.flops})

    def keep(self, keys: list[Key]) -> None:
        for table in (self.flops, self.errors, self.ms):
            for key in [k for k in table if k != DENSE and k not in keys]:
                del table[key]


@dataclass
class Costing:
    """Every layer's options, costed once for every budget that plans from it.

    Attributes:
        layers: per costed site name, its options (dense first).
        uncosted: per site that could not be costed (it did not run), why.
        flops_total: the whole model's FLOPs on the costed inputs; ``flops_fixed``, those of all
            but the costed layers.
        errors: what an option's error measures: ``"weight"``, ``"layer output"`` or ``"model output"``.
        provider: where the milliseconds were timed (None: not timed).
        precision: the form they were timed in: ``"fp32"``, or ``"int8"`` (dense convs and pairs quantized).
    """

    layers: dict[str, LayerCost] = field(default_factory=dict)
    uncosted: dict[str, str] = field(default_factory=dict)
    flops_total: float = 0.0
    flops_fixed: float = 0.0
    errors: str = "weight"
    provider: str | None = None
    precision: str = "fp32"
    filled: bool = False  # False: an empty costing, to be filled by the first plan made with it

    @property
    def timed_on(self) -> str:
        """Where and how layers were timed, in words: the provider, and "in int8" where they were quantized."""
        return f"{self.provider}" + (" in int8" if self.precision == "int8" else "")

    def total(self, unit: str) -> float:
        """What the whole model costs: its FLOPs, or the timed layers' dense milliseconds."""
        return self.flops_total if unit == FLOPS else sum(c.ms.get(DENSE, 0.0) for c in self.layers.values())

    def fixed(self, unit: str) -> float:
        """What no plan changes: the FLOPs of everything but the costed layers (milliseconds count only the timed layers)."""
        return self.flops_fixed if unit == FLOPS else 0.0

    def allocate(self, unit: str, fraction: float) -> tuple[dict[str, Key], bool]:
        """The knapsack's pick per layer at ``fraction`` of the total, and whether it fits."""
        names = list(self.layers)
        picks, met = allocate([self.layers[n].choice(unit) for n in names], fraction * self.total(unit) - self.fixed(unit))
        return dict(zip(names, picks)), met

    def floor(self, unit: str) -> float:
        """The smallest reachable fraction: every layer at its cheapest option."""
        total = self.total(unit)
        cheapest = sum(min(cost for cost, _ in c.choice(unit).options.values()) for c in self.layers.values())
        return (self.fixed(unit) + cheapest) / total if total else 1.0

    def flops_of(self, picks: dict[str, Key]) -> float:
        """The model's FLOPs with each costed layer at its pick (dense where it has none)."""
        return self.flops_fixed + sum(c.flops[picks.get(name, DENSE)] for name, c in self.layers.items())


@dataclass(frozen=True)
class Request:
    """What a budget asks the costing for.

    ``candidates(site, orders)`` lists the options to cost at a site, None for every rank, or a
    reason (a string) the budget keeps the site dense without costing it;
    ``unit`` is what the budget spends (None: a rule per layer, costed per output pixel where no
    stats are known); ``limit(total, fixed)`` the budget in that unit, to drop options past its
    reach (None: keep every option cheaper than dense); ``errors``: whether the plan weighs
    errors (measured on data where given); ``sensitivity``: at the model's output (None: wherever
    calibration data is given, the default; False: at each layer's own output).
    """

    candidates: Callable[[Site, tuple[str, ...]], list[Key] | str | None]
    unit: str | None = None
    limit: Callable[[float, float], float] | None = None
    errors: bool = False
    sensitivity: bool | None = None  # None: at the model's output where calibration data is given


def cost(sites: list[Site], request: Request, order: str, view: DenseView) -> Costing:
    """Measure what ``request`` needs of each site: options, their FLOPs, errors and (with a provider) milliseconds.

    A site whose pairs are not measurably faster than it on ``view.provider`` keeps only the
    options that are (:data:`LATENCY_MARGIN`); ranks are timed from 1 up per order and stop at
    the first that is not, since higher ranks of the same order cost more still.
    """
    from .ranks import every_rank

    timed = view.provider is not None
    stats = view.stats() if request.unit or timed else {}
    costing = Costing(provider=view.provider, precision=getattr(view, "precision", "fp32"), filled=True)
    by_name = {site.name: site for site in sites}
    for site in sites:
        if request.unit and site.name not in stats:
            costing.uncosted[site.name] = view.uncosted().get(site.name, "did not run on the example inputs, so its cost is unknown")
            continue
        keys = request.candidates(site, orders_of(order))
        wanted = every_rank(site, orders_of(order)) if keys is None else [] if isinstance(keys, str) else keys
        choice = weight_options(site, wanted, stats.get(site.name))
        costing.layers[site.name] = LayerCost({k: c for k, (c, _) in choice.options.items()},
                                              {k: e for k, (_, e) in choice.options.items()},
                                              reason=keys if isinstance(keys, str) else None)
    if request.unit:
        mine = sum(c.flops[DENSE] for c in costing.layers.values())
        costing.flops_total = max(view.flops(), mine)  # the target is of the whole model: the rest is a fixed cost
        costing.flops_fixed = costing.flops_total - mine
        _prune(costing, request)
    if timed:
        _time(costing, by_name, view, stats, every=request.unit == MS)
    if request.errors and not _out_of_reach(costing, request):
        _measure_errors(costing, by_name, view, request.sensitivity)
    return costing


def _out_of_reach(costing: Costing, request: Request) -> bool:
    """Whether even every layer's cheapest option misses the FLOP budget: the plan is then those, whatever the errors.

    Measuring errors would change nothing but the time taken: ResNet-50 at 0.25 of its FLOPs, its
    1x1 convs never faster separated, ran the model 17 times for them (40 of its 83 s).
    """
    if request.unit != FLOPS or request.limit is None or not costing.layers:
        return False
    cheapest = sum(min(c.flops.values()) for c in costing.layers.values())
    return cheapest > request.limit(costing.flops_total, costing.flops_fixed)


def _prune(costing: Costing, request: Request) -> None:
    """Drop the options the budget could never pick (as dear as dense, or past its slack): they need no measuring."""
    budget = request.limit(costing.flops_total, costing.flops_fixed) if request.limit else costing.flops_total
    cheapest = sum(min(c.flops.values()) for c in costing.layers.values())
    for layer in costing.layers.values():
        layer.keep(list(reachable(layer.choice(FLOPS), budget - cheapest).options))


def _time(costing: Costing, sites: dict[str, Site], view: DenseView, stats: dict[str, SiteStats], every: bool) -> None:
    """Each open layer timed dense and at its ranks; options not clearly faster than dense are dropped.

    ``every``: each kept option's milliseconds are needed (a budget spending them), so ranks are
    timed from 1 up to the first not faster; otherwise only the boundary matters, and it is
    bisected (higher ranks of one order cost more: a few timings per order, not one per rank).
    """
    for name, layer in costing.layers.items():
        site_stats = stats.get(name)
        if len(layer.flops) == 1 or site_stats is None:
            continue
        calls = site_stats.calls
        layer.ms[DENSE] = dense = view.latency(sites[name], DENSE, site_stats) * calls

        def faster(key: Key) -> bool:
            layer.ms[key] = view.latency(sites[name], key, site_stats) * calls
            if CLOSE_CALL[0] < layer.ms[key] / dense < CLOSE_CALL[1]:  # timed apart: within noise of the margin
                alone, paired = view.paired(sites[name], [DENSE, key], site_stats)
                layer.ms[key] = dense * paired / alone
            return layer.ms[key] < LATENCY_MARGIN * dense

        kept = []
        for order in sorted({key[0] for key in layer.keys if key != DENSE}):
            ranks = sorted((k for k in layer.keys if k[0] == order), key=lambda k: k[1])
            count = _faster_count(ranks, faster, every)
            kept += ranks[:count]
            if count < len(ranks):
                layer.slower.append(ranks[count])
        layer.keep(kept)
        layer.ms = {k: v for k, v in layer.ms.items() if k == DENSE or k in kept}


def _faster_count(ranks: list[Key], faster: Callable[[Key], bool], every: bool) -> int:
    """How many of ``ranks`` (ascending) are faster than dense: timed one by one, or bisected."""
    if every:
        return next((i for i, key in enumerate(ranks) if not faster(key)), len(ranks))
    low, high = 0, len(ranks)  # ranks[:low] are faster; ranks[high:] are not
    while low < high:
        middle = (low + high) // 2
        if faster(ranks[middle]):
            low = middle + 1
        else:
            high = middle
    return low


def _model_error(view: DenseView, sensitivity: bool | None):
    """The model's output divergence to weigh layers by: required (True), where the model allows it (None), or not (False)."""
    if sensitivity is False:
        return None
    try:
        return view.model_error()
    except InvalidOptionError:  # no float output to compare: each layer's own output, then
        if sensitivity:
            raise
        return None


def _measure_errors(costing: Costing, sites: dict[str, Site], view: DenseView, sensitivity: bool | None) -> None:
    """Options' errors measured where data can change a decision: at the layer's output, or the model's."""
    open_layers = [name for name, c in costing.layers.items() if len(c.flops) > 1]
    # A conv with a padding mode other than zeros receives its input already padded.
    measurable = [n for n in open_layers if sites[n].options.get("padding_mode", "zeros") == "zeros"]
    measured = view.activations(measurable) if measurable else {}
    if measured:
        costing.errors = "layer output"
    model_error = _model_error(view, sensitivity) if open_layers else None
    if model_error is not None:
        costing.errors = "model output"
    for name in open_layers:
        layer = costing.layers[name]
        choice = Choice({k: (layer.flops[k], layer.errors[k]) for k in layer.keys})
        if name in measured:
            choice = output_errors(sites[name], *measured[name], choice)
        if model_error is not None:  # every open layer: one unit, the model's output
            choice = model_errors(sites[name], choice, model_error, measured[name][0] if name in measured else None)
        layer.errors = {k: e for k, (_, e) in choice.options.items()}
