"""Each site's candidate ranks: what each costs in FLOPs and how far its weights are from the dense conv's.

Pure functions of a site (its weight and uses) and, where costs depend on the resolution, of
what it processed on the example inputs (:class:`SiteStats`). The budgets (``budgets``) say
which candidates they want; the costing (``costing``) measures them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.costs import dense_flops, pair_flops
from ..core.decompose import ORDERS, max_rank, rank_errors
from .knapsack import DENSE, Choice
from .site import Site

Key = tuple[str, int]  # an option: (order, rank), or DENSE


@dataclass(frozen=True)
class SiteStats:
    """What a site's weight processed on the example inputs, summed over its calls.

    Pixels are batch x H x W, of the input as the layer receives it (before any padding).
    """

    in_pixels: int
    out_pixels: int
    input_shape: tuple[int, ...]  # of the first call

    @property
    def calls(self) -> int:
        """How many times the layer ran: its pixels over those of its first call."""
        shape = self.input_shape
        dims = len(shape) - 2
        first = shape[0] * math.prod(shape[-dims:]) if dims > 0 else 1
        return max(1, round(self.in_pixels / first)) if first else 1


def orders_of(order: str) -> tuple[str, ...]:
    """The orders an ``order`` option allows: both for ``"auto"``."""
    return ORDERS if order == "auto" else (order,)


def weight_shape(site: Site) -> tuple[int, ...]:
    """The site's weight shape in a conv's layout, (N, M/g, *k), transposed convs included."""
    return (site.channels[1], site.channels[0] // site.groups, *site.weight.shape[2:])


def top_rank(site: Site, order: str) -> int:
    """The rank at which the site's pair in ``order`` is exact."""
    return max_rank(site.weight, site.groups, order, site.transposed)


def _unit_pixels(site: Site) -> tuple[float, float]:
    """(input, output) pixels per output pixel: the stride shrinks a conv's output and grows a transposed conv's."""
    stride = site.options["stride"]
    step = math.prod((stride,) * (site.weight.dim() - 2) if isinstance(stride, int) else stride)
    return (1 / step, 1.0) if site.transposed else (float(step), 1.0)


def pixels(site: Site, stats: SiteStats | None) -> tuple[float, float]:
    """(input, output) pixels over the site's calls; without stats, those of one output pixel (relative costs)."""
    return (stats.in_pixels, stats.out_pixels) if stats is not None else _unit_pixels(site)


def option_flops(site: Site, key: Key, stats: SiteStats | None) -> float:
    """Multiply-adds of an option (dense, or a rank and an order) over the site's calls, or per output pixel."""
    in_pixels, out_pixels = pixels(site, stats)
    if key == DENSE:
        return float(dense_flops(weight_shape(site), out_pixels, in_pixels, site.transposed))
    order, rank = key
    return float(pair_flops(order, rank, weight_shape(site), site.groups, in_pixels, out_pixels, site.transposed))


def weight_options(site: Site, keys: list[Key], stats: SiteStats | None) -> Choice:
    """``keys`` (and dense) costed in FLOPs, each with the weight-space squared relative error of its pair."""
    errors = {o: rank_errors(site.weight, site.groups, o, site.transposed) for o in {k[0] for k in keys}}
    options = {DENSE: (option_flops(site, DENSE, stats), 0.0)}
    for key in keys:
        error = float(errors[key[0]][key[1]]) ** 2
        options[key] = (option_flops(site, key, stats), error if error > 1e-12 else 0.0)  # float noise is not an error
    return Choice(options)


def every_rank(site: Site, orders: tuple[str, ...]) -> list[Key]:
    """Every rank of every order, from 1 to exact."""
    return [(o, r) for o in orders for r in range(1, top_rank(site, o) + 1)]


def fixed_option(site: Site, rank: int | None, orders: tuple[str, ...]) -> Key:
    """The rank asked (None: exact), clamped to the exact rank, in the order with the lower weight error."""
    r = rank if rank is not None else 10**9
    best = min(orders, key=lambda o: (float(rank_errors(site.weight, site.groups, o, site.transposed)[min(r, top_rank(site, o))]),
                                      o != "dw-pw"))
    return best, min(r, top_rank(site, best))


def energy_rank(weight: torch.Tensor, groups: int, order: str, energy: float, transposed: bool = False) -> int:
    """The smallest rank keeping at least ``energy`` of the squared singular values."""
    errors = rank_errors(weight, groups, order, transposed)
    for r in range(1, len(errors)):
        if 1 - float(errors[r]) ** 2 >= energy - 1e-12:
            return r
    return len(errors) - 1


def energy_option(site: Site, share: float, orders: tuple[str, ...]) -> Key:
    """The smallest rank keeping ``share`` of the energy, in the order whose pair costs less per output pixel."""
    ranks = {o: energy_rank(site.weight, site.groups, o, share, site.transposed) for o in orders}
    best = min(ranks, key=lambda o: option_flops(site, (o, ranks[o]), None))
    return best, ranks[best]


def single_channel_reason(site: Site) -> str | None:
    """Why a conv with one input channel stays dense under a fixed rank (None for any other conv).

    Such a conv (a learned filterbank: a 512-tap audio front end, a grayscale stem) has one
    N x K slice: its rank-r pair is r filters then a mix, exact at r = min(N, K). Rank 1 keeps
    one filter of the bank, so a rank given for the model's multi-channel layers would wreck it;
    a budget (FLOPs, latency, an agreement floor) or an energy weighs its ranks instead.
    """
    if site.channels[0] // site.groups != 1 or site.groups != 1:
        return None
    return ("kept dense: a single input channel (a filterbank); a fixed rank would keep that many of its filters, so it is "
            "separated only under a budget or an energy, which weigh its ranks")


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
