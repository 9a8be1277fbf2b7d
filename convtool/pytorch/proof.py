"""Proving the rewrite took effect: every pair reported ran, and the conv it replaced did not.

Putting a pair at a conv's qualified name changes what ``model.conv`` is, not what the model
runs: a conv also held in a plain list (``self.stages = [self.a, self.b]``), captured in a
closure or called by code fx never saw keeps running as it was. So every edit is logged, plain
lists, tuples, dicts and closure cells are rewired to the new modules, and the model is run on
the example inputs with the conv recorder and a hook on every pair. A site whose pairs did not all run, or
whose dense weight still ran, is put back as it was and reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.inputs import kept_state, model_device, on_device, train_mode
from ..core.modules import watching_weight_reads
from ..core.modules import SeparableConv
from ..core.names import describe_error, get, module_names, set_module
from ..core.references import references, replace
from ..errors import SeparationError
from ..measure.conv_calls import ConvCall, record


class Edits:
    """The changes made to a model, each tagged with the sites it serves, so any site can be undone.

    An edit serving several sites (a module whose forward now calls several pairs) is undone
    with all of them: :meth:`revert` widens the set of sites to what can be undone alone.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.log: list[tuple[frozenset[str], Callable[[nn.Module], nn.Module]]] = []
        self.swaps: list[tuple[nn.Module, nn.Module, frozenset[str]]] = []  # (old, new, sites)

    def set_module(self, qualname: str, module: nn.Module, sites: frozenset[str]) -> None:
        old = get(self.root, qualname) if qualname else self.root
        self.root = set_module(self.root, qualname, module)
        self.log.append((sites, lambda root: set_module(root, qualname, old)))
        self.swaps.append((old, module, sites))

    def swap(self, old: nn.Module, new: nn.Module, sites: frozenset[str]) -> None:
        """Put ``new`` at every qualified name of ``old`` (plain references follow in :meth:`rewire`)."""
        for name in module_names(self.root).get(id(old), []):
            self.set_module(name, new, sites)

    def rewire(self) -> int:
        """Point plain lists, tuples and dicts at the new modules; returns how many references moved."""
        new_for = {}
        for old, new, sites in self.swaps:
            new_for[id(old)] = (new, sites)
        moved = 0
        changed = True
        while changed:  # a replaced module may itself sit in a list held by a replaced module
            changed = False
            for container, key, value in list(references(self.root)):
                if id(value) in new_for:
                    new, sites = new_for[id(value)]
                    replace(container, key, new)
                    self.log.append((sites, _put_back(container, key, value)))
                    moved += 1
                    changed = True
        return moved

    def revert(self, sites: set[str]) -> set[str]:
        """Undo every edit serving ``sites``; returns the sites undone (``sites``, widened)."""
        sites = set(sites)
        widened = True
        while widened:
            widened = False
            for tags, _ in self.log:
                if tags & sites and not tags <= sites:
                    sites |= tags
                    widened = True
        for tags, undo in reversed(self.log):
            if tags & sites:
                self.root = undo(self.root)
        self.log = [(tags, undo) for tags, undo in self.log if not tags & sites]
        self.swaps = [s for s in self.swaps if not s[2] & sites]
        return sites


def _put_back(container: Any, key: Any, value: Any) -> Callable[[nn.Module], nn.Module]:
    def undo(root: nn.Module) -> nn.Module:
        replace(container, key, value)
        return root

    return undo


@dataclass
class Claim:
    """What the rewrite says about one site: these pairs now run in place of this dense weight."""

    name: str
    dense_weight: torch.Tensor
    pairs: list[SeparableConv]


@dataclass
class Proof:
    """Per site: the conv calls of the pass that proved it, or why it could not be proven."""

    calls: dict[str, dict[int, list[ConvCall]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)  # failed because nothing of theirs ran at all


@dataclass
class _Run:
    """One pass: forward calls per pair (by id), pairs whose ``.weight`` was read, conv calls by weight."""

    counts: dict[int, int]
    reads: set[int]
    calls: dict[int, list[ConvCall]]


def _run(model: nn.Module, inputs: tuple, claims: list[Claim], own_mode: bool) -> _Run:
    counts: dict[int, int] = {}
    pairs = {id(p): p for claim in claims for p in claim.pairs}

    def hook(module, args) -> None:
        counts[id(module)] = counts.get(id(module), 0) + 1

    handles = [p.register_forward_pre_hook(hook) for p in pairs.values()]
    try:
        with watching_weight_reads() as reads:
            if own_mode:
                with train_mode(model), kept_state(model):
                    calls = record(model, inputs, own_mode=True).by_weight()
            else:
                calls = record(model, inputs).by_weight()
    finally:
        for handle in handles:
            handle.remove()
    return _Run(counts, reads, calls)


# What the dense model did with a site's weight on the same inputs, before the rewrite.
RAN, NOT_RUN, OUTSIDE = "ran", "not run", "ran outside the copy"


def prove(model: nn.Module, inputs: tuple, claims: list[Claim], before: dict[str, str]) -> Proof:
    """Run ``model`` on ``inputs`` and check every claim.

    ``before`` says, per claim, what the dense model did on the same inputs before the rewrite
    (:data:`RAN`, :data:`NOT_RUN`, or :data:`OUTSIDE`: it ran the caller's own conv, reached
    through something a deep copy does not copy, such as a closure). It turns "the pair did
    not run" into the reason a user can act on.

    The pass runs in eval mode, the mode a shipped model runs in. A claim whose conv did not run
    there at all, dense or separated, gets a second pass in train mode (auxiliary heads, as
    inception-v3's ``AuxLogits``, run only then): in the model's own modes when it is training,
    else with every module in train mode. Only which convs ran is read from it; every buffer
    (BatchNorm running statistics, ``num_batches_tracked``), the random stream (dropout) and
    each module's ``training`` flag are restored afterwards, and the pass runs on the working
    copy, never the caller's model. A conv that ran in eval mode some other way (``F.conv2d``
    on ``.weight`` at inference, RepVGG-style) is not retried: at inference its pair would not
    run. Where the train-mode pass fails (a BatchNorm given one value per channel, by a batch
    of one), the reason says so and what to give.

    Raises:
        SeparationError: the model does not run on the inputs (in eval mode).
    """
    inputs = on_device(inputs, model_device(model))
    try:
        run = _run(model, inputs, claims, own_mode=False)
    except Exception as error:
        raise SeparationError(
            f"the separated model fails on the example inputs ({describe_error(error)}); "
            "exclude the layer involved with exclude=[...] / --exclude"
        ) from error
    proof = Proof()
    _judge(claims, run, before, proof)
    retry = [c for c in claims if c.name in proof.absent]
    if retry:
        try:
            run = _run(model, inputs, retry, own_mode=True)
        except Exception as error:  # e.g. BatchNorm refusing a batch of one in train mode: the eval verdict stands
            for claim in retry:
                proof.failed[claim.name] = (
                    "did not run on the example inputs in eval mode, and the pass in train mode that would prove a "
                    f"training-only conv failed ({describe_error(error, 160)}); give example inputs it runs on in "
                    "train mode (a batch of 2 or more for BatchNorm); left dense")
            return proof
        second = Proof()
        _judge(retry, run, before, second)
        for name, site_calls in second.calls.items():
            proof.calls[name] = site_calls
            del proof.failed[name]
        for name in second.absent:
            proof.failed[name] = "did not run on the example inputs, in eval mode or in train mode, so its separation cannot be proven; left dense"
    return proof


def _judge(claims: list[Claim], run: _Run, before: dict[str, str], proof: Proof) -> None:
    for claim in claims:
        was = before.get(claim.name, NOT_RUN)
        ran = [run.counts.get(id(p), 0) for p in claim.pairs]
        weight_read = any(id(p) in run.reads for p in claim.pairs)
        still_dense = id(claim.dense_weight) in run.calls
        if all(ran) and not still_dense:
            proof.calls[claim.name] = run.calls
        elif still_dense and any(ran):
            proof.failed[claim.name] = "the model runs both the separated pair and the original conv; left dense"
        elif still_dense:
            proof.failed[claim.name] = (
                "the model runs this conv without going through the module convtool replaced "
                "(an object convtool cannot rewire, such as an attribute of a plain Python object, holds it); left dense"
            )
        elif weight_read:
            proof.failed[claim.name] = (
                "the model reads this conv's weight and applies it itself (to fuse it with others, say) instead of "
                "calling the conv, so the pair would not run; left dense"
            )
        elif any(ran):
            proof.failed[claim.name] = "one of its uses did not run on the example inputs, so it cannot be proven; left dense"
        elif was == OUTSIDE:
            proof.failed[claim.name] = (
                "the model runs this conv without going through the module convtool replaced: it runs the "
                "caller's own conv, reached through something a copy of the model does not copy (a global, say); left dense"
            )
        elif was == RAN:
            proof.failed[claim.name] = (
                "the model computes this conv without calling the module convtool replaced "
                "(F.conv2d on its .weight, say), so the pair would never run; left dense"
            )
        else:
            proof.failed[claim.name] = "did not run on the example inputs, so its separation cannot be proven; left dense"
            proof.absent.add(claim.name)


__all__ = ["NOT_RUN", "OUTSIDE", "RAN", "Claim", "Edits", "Proof", "prove"]
