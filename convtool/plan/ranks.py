"""Turn the rank option into one decision per site: (order, rank), or stay dense, with the reason.

Three strategies, one return path: a fixed rank (or ``"full"``), :class:`~convtool.Energy`,
and :class:`~convtool.FlopsTarget`. The planner measures nothing itself: the caller hands it
each site's call statistics, the model's FLOPs, calibration activations and a latency
function, so it depends only on the core math; what errors those activations give is
``measured``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..core.costs import dense_flops, pair_flops
from ..core.decompose import ORDERS, max_rank, rank_errors
from ..core.records import Energy, FlopsTarget, Rank
from ..errors import InvalidOptionError
from .knapsack import DENSE, Choice, allocate
from .measured import Sensitivity, dense_for, model_errors, output_errors, pair_for
from .site import Site

# Median milliseconds of a module on one runtime at an input shape.
Latency = Callable[[nn.Module, tuple[int, ...]], float]
# Given site names, each one's first (input, output) on calibration data; called only when
# output errors can change a decision, since it runs the model.
Activations = Callable[[list[str]], dict[str, tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class SiteStats:
    """What a site's weight processed on the example inputs, summed over its calls.

    Pixels are batch x H x W, of the input as the layer receives it (before any padding).
    """

    in_pixels: int
    out_pixels: int
    input_shape: tuple[int, ...]  # of the first call


@dataclass(frozen=True)
class Plan:
    """Per site name: (order, rank) or None for 'stay dense', and why each dense one stays so."""

    picks: dict[str, tuple[str, int] | None]
    dense_reasons: dict[str, str]
    budget_met: bool | None = None
    flops_before: float | None = None  # the model's FLOPs on the example inputs, when costed
    flops_after: float | None = None


def _orders(order: str) -> tuple[str, ...]:
    return ORDERS if order == "auto" else (order,)


def _weight_shape(site: Site) -> tuple[int, ...]:
    """The site's weight shape in a conv's layout, (N, M/g, *k), transposed convs included."""
    n = site.channels[1]
    return (n, site.channels[0] // site.groups, *site.weight.shape[2:])


def _unit_pixels(site: Site) -> tuple[float, float]:
    """(input, output) pixels per output pixel: the stride shrinks a conv's output and grows a transposed conv's."""
    stride = site.options["stride"]
    step = math.prod((stride,) * (site.weight.dim() - 2) if isinstance(stride, int) else stride)
    return (1 / step, 1.0) if site.transposed else (float(step), 1.0)


def _unit_cost(site: Site, order: str, rank: int) -> float:
    """Cost per output pixel; a pointwise-first pair's pointwise runs at the input resolution."""
    return pair_flops(order, rank, _weight_shape(site), site.groups, *_unit_pixels(site), site.transposed)


def _best_order(site: Site, rank: int, order: str) -> str:
    """Under a fixed rank, the order with the lower weight error ("auto"), else the one asked."""
    if order != "auto":
        return order
    w, g, t = site.weight, site.groups, site.transposed
    errors = {o: float(rank_errors(w, g, o, t)[min(rank, max_rank(w, g, o, t))]) for o in ORDERS}
    return min(ORDERS, key=lambda o: (errors[o], o != "dw-pw"))


def energy_rank(weight: torch.Tensor, groups: int, order: str, energy: float, transposed: bool = False) -> int:
    """The smallest rank keeping at least ``energy`` of the squared singular values."""
    errors = rank_errors(weight, groups, order, transposed)
    for r in range(1, len(errors)):
        if 1 - float(errors[r]) ** 2 >= energy - 1e-12:
            return r
    return len(errors) - 1


def weight_options(site: Site, orders: tuple[str, ...], stats: SiteStats) -> Choice:
    """Options costed in FLOPs, with the weight-space squared relative error of each."""
    shape, t = _weight_shape(site), site.transposed
    options = {DENSE: (float(dense_flops(shape, stats.out_pixels, stats.in_pixels, t)), 0.0)}
    for order in orders:
        errors = rank_errors(site.weight, site.groups, order, t)
        for r in range(1, max_rank(site.weight, site.groups, order, t) + 1):
            cost = pair_flops(order, r, shape, site.groups, stats.in_pixels, stats.out_pixels, t)
            error = float(errors[r]) ** 2
            options[(order, r)] = (float(cost), error if error > 1e-12 else 0.0)  # float noise is not an error
    return Choice(options)


LATENCY_MARGIN = 0.9  # a pair must take at most this share of the dense conv's time


def faster_thandense_for(site: Site, choice: Choice, stats: SiteStats, latency: Latency) -> Choice:
    """Drop the options the runtime does not run clearly faster than the dense conv.

    Clearly: by :data:`LATENCY_MARGIN`, since a small layer's timings vary by more than a few
    percent between runs, and a pair judged faster by noise makes the model slower. Ranks are
    measured from 1 up, per order, and stop at the first that is not faster: higher ranks of
    the same order cost more still.
    """
    dense_ms = latency(dense_for(site).eval(), stats.input_shape)
    kept = {DENSE: choice.options[DENSE]}
    for order in sorted({key[0] for key in choice.options if key != DENSE}):
        for r in sorted(key[1] for key in choice.options if key[0] == order):
            if latency(pair_for(site, order, r).eval(), stats.input_shape) >= LATENCY_MARGIN * dense_ms:
                break
            kept[(order, r)] = choice.options[(order, r)]
    return Choice(kept)


def make_plan(
    sites: list[Site],
    rank: Rank,
    order: str,
    *,
    stats: dict[str, SiteStats],
    total_flops: float | None = None,
    activations: Activations | None = None,
    latency: Latency | None = None,
    provider: str = "",
    sensitivity: Sensitivity | None = None,
    costing: Costing | None = None,
) -> Plan:
    """Decide each site's (order, rank).

    Args:
        sites: what may be separated.
        rank: an int or ``"full"`` (that rank everywhere), :class:`Energy` or :class:`FlopsTarget`.
        order: ``"dw-pw"``, ``"pw-dw"`` or ``"auto"`` (per site, the better).
        stats: per site name, its calls on the example inputs (a site that did not run has none).
        total_flops: the whole model's FLOPs on the example inputs (for a FLOP target).
        activations: gives sites' inputs and outputs on calibration data; errors are then
            measured on outputs instead of weights, for the sites whose decision they can change.
        latency: times a module at an input shape; with it, options not faster than the dense
            conv are dropped, whatever the strategy.
        provider: the runtime ``latency`` times on, for the reasons given.
        sensitivity: with a FLOP target and ``activations``, each layer's options are judged by
            the model's output instead of the layer's: a few ranks are measured with
            ``sensitivity`` and the rest interpolated (:func:`model_errors`).
        costing: with a FLOP target, a :class:`Costing` to fill (when empty) or to reuse
            instead of measuring again: a search over budgets costs the layers once. One made
            with ``in_ms=True`` (a latency target) costs the options in milliseconds timed by
            ``latency`` (:func:`timed_options`), and the target's fraction is then of the
            timed layers' dense milliseconds; the plan's FLOP figures stay in FLOPs.
    """
    picks: dict[str, tuple[str, int] | None] = {}
    reasons: dict[str, str] = {}
    budget: tuple = ()
    if isinstance(rank, FlopsTarget):
        # The latency filter runs inside: it prunes each layer's options before the knapsack.
        budget = _budget(sites, rank.fraction, order, stats, total_flops, activations, latency, picks, reasons, sensitivity,
                         costing)
    else:
        for site in sites:
            reason = None if isinstance(rank, Energy) else single_channel_reason(site)
            if reason:
                picks[site.name] = None
            else:
                picks[site.name], reason = _energy(site, rank, order) if isinstance(rank, Energy) else (_fixed(site, rank, order), None)
            if reason:
                reasons[site.name] = reason
        if latency is not None:
            _drop_slow(sites, picks, reasons, stats, latency, provider)
    return Plan(picks, reasons, *budget)


def single_channel_reason(site: Site) -> str | None:
    """Why a conv with one input channel stays dense under a fixed rank (None for any other conv).

    Such a conv (a learned filterbank: a 512-tap audio front end, a grayscale stem) has one
    N x K slice: its rank-r pair is r filters then a mix, exact at r = min(N, K). Rank 1 keeps
    one filter of the bank, so a rank given for the model's multi-channel layers would wreck
    it; a FLOP target or Energy weighs its ranks by their cost and error instead.
    """
    if site.channels[0] // site.groups != 1 or site.groups != 1:
        return None
    return ("kept dense: a single input channel (a filterbank); a fixed rank would keep that many of its filters, so "
            "it is separated only under a FLOP target or energy, which weigh its ranks")


def _fixed(site: Site, rank: int | str, order: str) -> tuple[str, int]:
    """The rank asked (clamped to the exact rank), in the order asked or the better one."""
    r = 10**9 if rank == "full" else int(rank)
    best = _best_order(site, r, order)
    return best, min(r, max_rank(site.weight, site.groups, best, site.transposed))


def _energy(site: Site, energy: Energy, order: str) -> tuple[tuple[str, int] | None, str | None]:
    """The smallest rank keeping the energy, in the cheaper order; dense where that costs more."""
    ranks = {o: energy_rank(site.weight, site.groups, o, energy.share, site.transposed) for o in _orders(order)}
    best = min(ranks, key=lambda o: _unit_cost(site, o, ranks[o]))
    in_pixels, out_pixels = _unit_pixels(site)
    cost = _unit_cost(site, best, ranks[best])
    dense = float(dense_flops(_weight_shape(site), out_pixels, in_pixels, site.transposed))
    if cost >= dense:
        return None, (
            f"kept dense: rank {ranks[best]} ({best}), the smallest keeping {energy.share:g} of the energy, "
            f"costs {cost:g} multiply-adds per output pixel, the dense conv {dense:g}"
        )
    return (best, ranks[best]), None


def _drop_slow(sites, picks, reasons, stats, latency, provider) -> None:
    """Set to dense (None) each pick the runtime does not run faster than the dense conv."""
    for site in sites:
        pick, site_stats = picks.get(site.name), stats.get(site.name)
        if pick is None or site_stats is None:
            continue
        single = Choice({DENSE: (0.0, 0.0), pick: (0.0, 0.0)})
        if pick not in faster_thandense_for(site, single, site_stats, latency).options:
            picks[site.name] = None
            reasons[site.name] = f"kept dense: rank {pick[1]} ({pick[0]}) is not faster than the dense conv on {provider}"


def reachable(choice: Choice, slack: float) -> Choice:
    """The options :func:`~convtool.plan.knapsack.allocate` could pick, given the budget's slack.

    An option costing as much as the dense conv or more is never on the Pareto front (dense has
    no error); one costing more than the layer's cheapest option plus ``slack`` (the budget left
    once every layer takes its cheapest option) never fits, since upgrades only add cost. Ties
    at the cheapest cost are kept: the errors break them. Dropping the rest changes no pick, and
    spares measuring their errors and latencies.
    """
    dense = choice.options[DENSE][0]
    cheapest = min(cost for cost, _ in choice.options.values())
    limit = cheapest + max(slack, 0.0) * (1 + 1e-9)
    return Choice({key: (cost, error) for key, (cost, error) in choice.options.items()
                   if key == DENSE or (cost < dense and cost <= limit)})


@dataclass
class Costing:
    """Each layer's options under a FLOP target, costed once for every budget a search tries.

    The costing (FLOPs, output errors, sensitivity, latency) does not depend on the budget;
    only which options a budget can reach does. Filled by the first plan made with it, with
    every option cheaper than the dense conv (the widest budget's), then reused as it is.
    """

    choices: dict[str, Choice] = field(default_factory=dict)  # by site name
    total: float = 0.0  # the model's FLOPs
    fixed: float = 0.0  # the FLOPs of all but the costed sites
    # A latency target sets ``in_ms`` before the first plan: the options are then costed in
    # milliseconds measured by the latency function (``total``: the timed layers' dense ones,
    # ``fixed`` 0), and ``flops`` keeps each option's FLOPs (by site, then option) for the figures.
    in_ms: bool = False
    flops: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)
    flops_total: float = 0.0
    flops_fixed: float = 0.0

    def picks(self, fraction: float) -> tuple:
        """What the knapsack picks at ``fraction`` of the FLOPs: budgets giving the same plan give the same model."""
        names = list(self.choices)
        chosen, _ = allocate([self.choices[n] for n in names], fraction * self.total - self.fixed)
        return tuple(zip(names, chosen))

    @property
    def floor(self) -> float:
        """The smallest reachable fraction (of FLOPs, or of the timed layers' milliseconds): every layer at its cheapest option."""
        cheapest = sum(min(cost for cost, _ in c.options.values()) for c in self.choices.values())
        return (self.fixed + cheapest) / self.total if self.total else 1.0


def _budget(sites, fraction, order, stats, total_flops, activations, latency, picks, reasons, sensitivity,
            costing: Costing | None = None) -> tuple[bool, float, float]:
    """Fill ``picks`` and ``reasons`` under a FLOP budget; returns (met, FLOPs before, FLOPs after)."""
    if not stats:
        raise InvalidOptionError("a FLOP target needs example inputs (or calibration data) to cost each layer")
    picks.update({s.name: None for s in sites})
    ran = [s for s in sites if s.name in stats]
    for site in sites:
        if site.name not in stats:
            reasons[site.name] = "did not run on the example inputs, so its cost is unknown"
    in_ms = costing is not None and costing.in_ms
    if in_ms and latency is None:
        raise InvalidOptionError("a latency budget needs a latency function to time each layer's options")
    if costing is not None and costing.choices and set(costing.choices) == {s.name for s in ran}:
        choices = [costing.choices[s.name] for s in ran]
        total, fixed = costing.total, costing.fixed
        budget = fraction * total - fixed
    else:
        choices = [weight_options(site, _orders(order), stats[site.name]) for site in ran]
        # The target is a fraction of the whole model's FLOPs (what the report shows): everything
        # but the sites that ran is a fixed cost.
        mine = sum(c.options[DENSE][0] for c in choices)
        total = max(float(total_flops or 0.0), mine)
        fixed = total - mine
        budget = fraction * total - fixed
        # A costing kept for other budgets keeps every option a budget could reach: the widest's.
        slack = (total if costing is not None else budget) - sum(min(cost for cost, _ in c.options.values()) for c in choices)
        choices = [reachable(c, slack) for c in choices]
        choices = _measured(ran, choices, stats, activations, None if in_ms else latency, sensitivity)
        if in_ms:
            timed = [timed_options(site, c, stats[site.name], latency) for site, c in zip(ran, choices)]
            costing.flops = {s.name: {k: c.options[k][0] for k in t.options} for s, c, t in zip(ran, choices, timed)}
            costing.flops_total, costing.flops_fixed = total, fixed
            choices, total, fixed = timed, sum(c.options[DENSE][0] for c in timed), 0.0
            budget = fraction * total
        if costing is not None:
            costing.choices, costing.total, costing.fixed = dict(zip((s.name for s in ran), choices)), total, fixed
    picks_list, met = allocate(choices, budget)
    after = fixed
    for site, choice, pick in zip(ran, choices, picks_list):
        after += choice.options[pick][0]
        if pick == DENSE:
            reasons[site.name] = f"kept dense: the {'latency' if in_ms else 'FLOP'} budget is better spent elsewhere"
        else:
            picks[site.name] = pick
    if in_ms:  # the plan's figures stay in FLOPs; the milliseconds are the search's to report
        flops_after = costing.flops_fixed + sum(costing.flops[s.name][p] for s, p in zip(ran, picks_list))
        return met, costing.flops_total, flops_after
    return met, total, after


def _calls(stats: SiteStats) -> int:
    """How many times a layer ran on the example inputs: its pixels over those of its first call."""
    shape = stats.input_shape
    dims = len(shape) - 2
    first = shape[0] * math.prod(shape[-dims:]) if dims > 0 else 1
    return max(1, round(stats.in_pixels / first)) if first else 1


def timed_options(site: Site, choice: Choice, stats: SiteStats, latency: Latency) -> Choice:
    """The options costed in milliseconds measured at the layer's input shape, errors kept.

    The dense conv is timed too: its milliseconds are the cost of keeping the layer. Ranks are
    timed from 1 up, per order, and stop at the first not faster than the dense conv (higher
    ranks of that order cost more still, and dense has no error). A layer with no option but
    dense is not timed: nothing is to be decided there, so it costs nothing in the budget.
    """
    if len(choice.options) == 1:
        return Choice({DENSE: (0.0, 0.0)})
    calls = _calls(stats)
    dense_ms = latency(dense_for(site).eval(), stats.input_shape) * calls
    kept = {DENSE: (dense_ms, 0.0)}
    for order in sorted({key[0] for key in choice.options if key != DENSE}):
        for r in sorted(key[1] for key in choice.options if key[0] == order):
            ms = latency(pair_for(site, order, r).eval(), stats.input_shape) * calls
            if ms >= dense_ms:
                break
            kept[(order, r)] = (ms, choice.options[(order, r)][1])
    return Choice(kept)


def _measured(ran, choices: list[Choice], stats, activations, latency, sensitivity) -> list[Choice]:
    """The options' errors measured where data can change a decision, and the slow ones dropped."""
    # A conv with a padding mode other than zeros receives its input already padded.
    costed = [s.name for s, c in zip(ran, choices) if len(c.options) > 1 and s.options.get("padding_mode", "zeros") == "zeros"]
    measured = activations(costed) if costed and activations is not None else {}
    choices = list(choices)
    for i, site in enumerate(ran):
        if site.name in measured:
            choices[i] = output_errors(site, *measured[site.name], choices[i])
        if sensitivity is not None and len(choices[i].options) > 1:  # every open site: one unit, the model's output
            choices[i] = model_errors(site, choices[i], sensitivity, measured[site.name][0] if site.name in measured else None)
        if latency is not None:
            choices[i] = faster_thandense_for(site, choices[i], stats[site.name], latency)
    return choices
