"""Put pairs where the dense convs were: build one pair per use of a site, factors shared, every edit logged.

Conv modules are replaced at each of their qualified names; functional convs through
:func:`~convtool.pytorch.fx_pass.rewrite_functional`. Every change goes through
:class:`~convtool.pytorch.proof.Edits`, so the proof can undo what it cannot confirm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.modules import SeparableConv
from ..core.names import get
from ..core.tracing import Tracing
from ..plan.site import Site
from .fx_pass import FunctionalConv, rewrite_functional
from .proof import Claim, Edits


def build_pairs(site: Site, order: str, rank: int) -> list[SeparableConv]:
    """One pair per use of ``site``; all share the factors (one SVD), and a bias shared in the model stays shared."""
    pairs: list[SeparableConv] = []
    biases: dict[int, nn.Parameter] = {}
    for use in site.uses:
        mode = use.module.training if use.module is not None else None
        if not pairs:
            pair = SeparableConv.from_weight(site.weight, use.bias, groups=site.groups, rank=rank, order=order,
                                             transposed=site.transposed, **use.options)
        else:
            first = pairs[0]
            w = site.weight
            pair = SeparableConv(
                *site.channels, tuple(w.shape[2:]), groups=site.groups, bias=use.bias is not None, rank=first.rank,
                order=order, transposed=site.transposed, device=w.device, dtype=w.dtype, **use.options,
            )
            pair.depthwise.weight, pair.pointwise.weight = first.depthwise.weight, first.pointwise.weight
            pair.weight_error = first.weight_error
            if use.bias is not None:
                with torch.no_grad():
                    pair.last.bias.copy_(use.bias)
                pair.last.bias.requires_grad_(use.bias.requires_grad)
        if use.bias is not None:
            if id(use.bias) in biases:
                pair.last.bias = biases[id(use.bias)]
            else:
                biases[id(use.bias)] = pair.last.bias
        if mode is not None:
            pair.train(mode)
        pairs.append(pair)
    return pairs


@dataclass
class Installed:
    """A site now served by pairs: the claim to prove, and where the pairs sit."""

    site: Site
    claim: Claim
    names: list[str]  # qualified names of the pairs (the site's name first)


def install(
    edits: Edits, sites: list[Site], picks: dict[str, tuple[str, int] | None], tracing: Tracing | None
) -> tuple[list[Installed], list[tuple[str, str]]]:
    """Replace every picked site's dense convs by its pairs; returns what was installed and what could not be."""
    installed: list[Installed] = []
    pairs_of: dict[str, list[SeparableConv]] = {}
    for site in sites:
        pick = picks.get(site.name)
        if pick is None:
            continue
        pairs_of[site.name] = build_pairs(site, *pick)
    # Module convs first: the graphs traced for functional convs then call the new pairs.
    for site in sites:
        if site.name not in pairs_of or site.source != "module":
            continue
        tags = frozenset([site.name])
        for use, pair in zip(site.uses, pairs_of[site.name]):
            for name in use.names:
                edits.set_module(name, pair, tags)
        installed.append(Installed(site, Claim(site.name, site.weight, pairs_of[site.name]), site.names))
    functional = [s for s in sites if s.name in pairs_of and s.source == "function"]
    problems: list[tuple[str, str]] = []
    if functional:
        installed_f, problems = _install_functional(edits, functional, pairs_of, tracing)
        installed += installed_f
    return installed, problems


def _install_functional(edits, sites, pairs_of, tracing) -> tuple[list[Installed], list[tuple[str, str]]]:
    pair_for_call: dict[int, SeparableConv] = {}
    site_of_call: dict[int, str] = {}
    calls: list[FunctionalConv] = []
    for site in sites:
        for use, pair in zip(site.uses, pairs_of[site.name]):
            for call in use.calls:
                pair_for_call[id(call)], site_of_call[id(call)] = pair, site.name
                calls.append(call)

    def place(qualname: str, module: nn.Module, replaced: list[FunctionalConv]) -> None:
        for call in replaced:
            pair_for_call[id(call)].train(module.training)
        old = get(edits.root, qualname) if qualname else edits.root
        edits.swap(old, module, frozenset(site_of_call[id(c)] for c in replaced))  # a shared module: every name

    pair_names, missed = rewrite_functional(edits.root, tracing, calls, lambda call: pair_for_call[id(call)], place)
    installed = []
    why = {site_of_call[id(c)]: reason for c, reason in missed}
    missed_sites = set(why)
    for site in sites:
        if site.name in missed_sites:
            continue
        pairs = pairs_of[site.name]
        names = [pair_names[id(p)] for p in pairs if id(p) in pair_names]
        names = sorted(set(names), key=lambda n: (n != site.name, names.index(n)))
        installed.append(Installed(site, Claim(site.name, site.weight, pairs), names))
    problems = [(name, why[name]) for name in sorted(missed_sites)]
    return installed, problems
