"""The protocol every budget follows, and the records it plans and searches with.

A budget is a frozen dataclass that carries its own behaviour, as torchao's configs do: it
says what the costing must measure (:meth:`Budget.request`), turns a costing into a plan
(:meth:`Budget.plan`), and, given trials that separate and measure the model at inner budgets,
finds itself (:meth:`Budget.search`: one trial for a plain budget; several, judged on held-out
data or timed end to end, for a target met by measurement). Nothing above ``plan/`` asks which
budget it holds: a new budget is one class here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ..core.records import Benchmark, Search
from .costing import Costing, DenseView, Request, cost
from .ranks import Key
from .site import Site


@dataclass(frozen=True)
class Plan:
    """Per site name: (order, rank) or None for 'stay dense', and why each dense one stays so."""

    picks: dict[str, Key | None]
    dense_reasons: dict[str, str]
    budget_met: bool | None = None
    flops_before: float | None = None  # the model's FLOPs on the costed inputs, when a budget spent them
    flops_after: float | None = None
    flops_limit: float | None = None  # the FLOPs a FLOP budget allows, to judge a model whose proof put layers back


@dataclass(frozen=True)
class Timing:
    """How each trial's model is timed end to end against the original: on ``provider`` (None: where the
    separation measures time, onnxruntime CPU unless the caller named another), ``runs`` interleaved runs each."""

    provider: str | None = None
    runs: int = 30
    threads: int | None = None

# What agreement means for a task: the original's outputs and a separated model's (each a list of the
# float outputs, joined over the held-out samples) -> the share of samples whose answer is kept.
Agreement = Callable[[list[torch.Tensor], list[torch.Tensor]], float]


@dataclass(frozen=True)
class Needs:
    """What each trial of a search measures: agreement on ``held_out`` of the calibration data (``top1``: a top class
    to agree on is required; ``agreement``: the task's own measure instead of top-1), and latency (``timing``)."""

    held_out: float | None = None
    timing: Timing | None = None
    top1: bool = False
    agreement: Agreement | None = None


@dataclass(frozen=True)
class Attempt:
    """One trial: the separation at an inner budget, and what was measured of it."""

    result: Any
    flops_fraction: float
    latency: Benchmark | None = None  # end to end against the original, when the search times
    top1_agreement: float | None = None  # on the held-out calibration data, when the search judges
    sqnr_db: float | None = None  # None: identical outputs (or not judged)

    @property
    def ratio(self) -> float | None:
        """The separated model's latency over the original's, when timed."""
        return None if self.latency is None else self.latency.separated_ms / self.latency.original_ms


class Trials(Protocol):
    """What a search calls (provided above the front ends): separate at an inner budget, and measure."""

    costing: Costing  # empty until the first trial fills it, then reused by every later one
    samples: int  # held-out calibration samples each trial is judged on (0 when it is not judged)
    baseline: str  # what a trial is timed against, in words: "the original", or "the dense int8 model" (int8)

    def run(self, budget: "Budget") -> Attempt:
        """Separate at ``budget`` and measure what the search needs. Raises NothingToSeparateError when
        the plan keeps every layer dense."""


class Budget:
    """How ranks are chosen: what to cost, how to plan from the costing, and how to search (see the module)."""

    def request(self) -> Request:
        """What the costing must measure for this budget."""
        raise NotImplementedError

    def plan(self, costing: Costing) -> Plan:
        """One decision per costed site (and a reason for every site kept dense)."""
        raise NotImplementedError

    def needs(self) -> Needs:
        """What each trial of this budget's search measures (nothing for a plain budget)."""
        return Needs()

    def check(self, *, inputs: bool, data: bool) -> None:
        """Refuse, before any work, what this budget cannot do without example inputs or calibration data."""

    def never_slower(self) -> bool:
        """Whether layers are timed by default, a pair not faster than its dense conv staying dense: a budget asks
        for a faster model. A fixed rank asks for that rank, and is timed only where a provider is named."""
        return True

    def search(self, trials: Trials) -> tuple[Any, Search | None]:
        """The separation this budget asks for, and how it was found (None: a plain budget, one trial)."""
        return trials.run(self).result, None


def make_plan(sites: list[Site], budget: Budget, order: str, view: DenseView, costing: Costing | None = None,
              shared: bool = False) -> tuple[Plan, Costing]:
    """``budget``'s plan for ``sites``, and the costing it planned from.

    ``costing``: one a search filled already, reused as it is, or an empty one to fill (a search's
    first trial: it is filled before any plan, so a plan that separates nothing still leaves it
    filled). ``shared``: this costing will serve other budgets too, so every option cheaper than
    dense is costed, not only those within this budget's reach.
    """
    if costing is None or not costing.filled:
        request = budget.request()
        made = cost(sites, dataclasses.replace(request, limit=None) if shared else request, order, view)
        if costing is None:
            costing = made
        else:
            costing.__dict__.update(made.__dict__)
    return budget.plan(costing), costing
