"""Choosing one option per layer under a budget: a multiple-choice knapsack.

Each layer has a few options (dense, or a rank and an order), each with a cost and an error.
Greedy by error saved per unit of cost is near-optimal and fast: it starts every layer at its
cheapest option and buys the best upgrades that fit. Pure: numbers in, picks out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DENSE = ("dense", 0)  # the option of leaving a layer as it is


@dataclass
class Choice:
    """The options of one layer: (order, rank) -> (cost, error); ``DENSE`` keeps it."""

    options: dict[tuple[str, int], tuple[float, float]]


def pareto(options: dict[Any, tuple[float, float]]) -> list[Any]:
    """Options no other option beats on both cost and error, cheapest first."""
    front: list[Any] = []
    for key in sorted(options, key=lambda k: (options[k][0], options[k][1])):
        if not front or options[key][1] < options[front[-1]][1]:
            front.append(key)
    return front


def allocate(choices: list[Choice], budget: float) -> tuple[list[tuple[str, int]], bool]:
    """Pick one option per layer with total cost within ``budget`` and little total error.

    Every layer starts at its cheapest option; each step buys the upgrade (to any better
    option of one layer) with the most error saved per extra cost that still fits. On convex
    fronts this is the classic hull greedy; jumping past options lets a layer take a smaller
    step when the next hull point does not fit.

    Returns the picks and whether the budget was met (when even the cheapest options exceed
    it, every layer gets its cheapest option).
    """
    fronts = [pareto(c.options) for c in choices]
    position = [0] * len(choices)
    total = sum(c.options[f[0]][0] for c, f in zip(choices, fronts))
    if total > budget:
        return [f[0] for f in fronts], False
    while True:
        best, best_gain = None, 0.0
        for i, (choice, front) in enumerate(zip(choices, fronts)):
            now = choice.options[front[position[i]]]
            for j in range(position[i] + 1, len(front)):
                nxt = choice.options[front[j]]
                extra = nxt[0] - now[0]
                if total + extra > budget:
                    break  # the front is sorted by cost: the rest cost more still
                gain = (now[1] - nxt[1]) / max(extra, 1e-9)
                if gain > best_gain:
                    best, best_gain = (i, j), gain
        if best is None:
            break
        i, j = best
        total += choices[i].options[fronts[i][j]][0] - choices[i].options[fronts[i][position[i]]][0]
        position[i] = j
    return [f[p] for f, p in zip(fronts, position)], True
