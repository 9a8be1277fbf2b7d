"""One separation of an ``nn.Module`` at one budget: the PyTorch front end's single step, and its result.

``separate_at`` reads as its steps, each a function here with its inputs and outputs: copy and
bake (``_prepare``: ``core.working_copy``, ``bake``), find what can be separated (``_sites``:
``sites``), plan (``_plan``: the planner over this model's :class:`~convtool.pytorch.dense.DenseModel`),
put the pairs in place and prove they run (``_install_and_prove``: ``install``, ``proof``),
refit them on data (``_recover``: ``recovery``), and describe each layer (``_describe``:
``measure.layers``). Budgets that try several plans, and the public ``convtool.separate``,
are above (``convtool.search``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..core.decompose import ORDERS
from ..core.inputs import as_inputs, guess_inputs, model_device, on_device, run_checked, running, samples_of, tensors_of
from ..core.names import label
from ..core.records import LayerChange, Search, SkippedLayer
from ..core.working_copy import copy_model, working_copy
from ..deploy.int8 import Int8Form
from ..errors import InvalidOptionError, NothingToSeparateError
from ..measure.conv_calls import ConvRecorder, record
from ..measure.layers import describe
from ..measure.onnxrt import require_provider
from ..plan.budget import Budget, Plan, make_plan
from ..plan.costing import Costing
from ..plan.site import Site
from ..recovery.batches import calibration_batches
from ..recovery.both_halves import refit_both_halves
from ..recovery.calibrate import Layer, give_biases, recalibrate_batchnorm, refit
from ..recovery.distributed import world
from ..recovery.synthesize import Synthesis, synthesis
from .bake import bake, unbake
from .dense import DenseModel, FirstBatch, dense_behaviour, model_flops
from .install import Installed, install
from .proof import Edits, prove
from .sites import find_sites

if TYPE_CHECKING:
    from ..measure.compare import Comparison

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Separation:
    """What :func:`~convtool.separate` did.

    Attributes:
        model: the separated model, on the input's device, dtype and train/eval mode.
        layers: one record per separated weight, in model order; each was proven to run in
            ``model`` when ``verified``.
        skipped: every conv left dense and every part of the model fx could not trace, with why.
        original: the caller's model, untouched (kept for :meth:`report`).
        verified: the separated model was run (on the example inputs, the first calibration
            sample, or a guessed input) and every layer's pairs ran while the dense convs they
            replace did not. False when no input could run the model: then nothing was proven.
        verification: how the claim was checked, or why it could not be.
        budget_met: with a budget that spends FLOPs or milliseconds, whether it was reached
            (None otherwise).
        flops_before, flops_after: with such a budget, the model's multiply-adds on the
            example inputs before and after, as the budget counted them.
        synthetic: with ``calibration="synthetic"``, how the calibration inputs were made
            from the model alone (``.inputs`` holds them, ``.note`` says what they match).
        search: with a target met by measurement (:class:`~convtool.AgreementTarget`,
            :class:`~convtool.LatencyTarget`), how it was found: the goal, what the returned
            model measured, every plan tried (None otherwise).
        inputs: the inputs the separation ran on (what :meth:`report` uses when given none).
    """

    model: nn.Module
    layers: tuple[LayerChange, ...]
    skipped: tuple[SkippedLayer, ...]
    original: nn.Module = field(repr=False, compare=False)
    verified: bool = False
    verification: str = ""
    budget_met: bool | None = None
    flops_before: float | None = None
    flops_after: float | None = None
    synthetic: Synthesis | None = None
    search: Search | None = None
    inputs: tuple = field(default=(), repr=False, compare=False)

    @property
    def params_before(self) -> int:
        """Parameters of the separated layers before separation."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the separated layers after separation."""
        return sum(layer.params_after for layer in self.layers)

    def report(self, example_inputs: Any = None) -> "Comparison":
        """The before/after comparison of the whole model on ``example_inputs`` (or the inputs it ran on)."""
        from ..measure.compare import compare

        inputs = example_inputs if example_inputs is not None else self.inputs
        if not as_inputs(inputs):
            raise InvalidOptionError("no report without inputs: the separation ran on none; pass example inputs")
        return compare(self.original, self.model, inputs, separation=self)


def check_options(model: nn.Module, order: str, refit: str, latency_provider: str | None) -> str | None:
    """The options checked before any work; onnxruntime's name of the latency provider (None without one)."""
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if refit not in ("last", "both"):
        raise InvalidOptionError(f"refit must be 'last' or 'both'; got {refit!r}")
    if order not in (*ORDERS, "auto"):
        raise InvalidOptionError(f"order must be one of {', '.join((*ORDERS, 'auto'))}; got {order!r}")
    return require_provider(latency_provider) if latency_provider is not None else None


def check_recovery(recalibrate_bn: bool, refit: str, data: bool) -> None:
    """Refuse the recovery options that work on calibration data when there is none."""
    for option, asked in (("recalibrate_bn", recalibrate_bn), ("refit='both'", refit == "both")):
        if asked and not data:
            raise InvalidOptionError(f"{option} works on calibration data: pass calibration")


def synthetic_calibration(model: nn.Module, example_inputs: Any, calibration: Any) -> tuple[Any, Synthesis | None]:
    """The calibration data, synthesised from the model when it is the word ``"synthetic"``."""
    if not isinstance(calibration, str):
        return calibration, None
    if calibration != "synthetic":
        raise InvalidOptionError(f"calibration must be model inputs or 'synthetic'; got the string {calibration!r}")
    if example_inputs is None:
        raise InvalidOptionError("calibration='synthetic' needs example inputs: the inputs are synthesised in their shape")
    made = synthesis(model, example_inputs)
    log.info("%s", made.note)
    return made.inputs, made


def separate_at(model: nn.Module, example_inputs: Any, budget: Budget, *, order: str, include: Sequence[str],
                exclude: Sequence[str], calibration: Any, recalibrate_bn: bool, provider: str | None, refit: str,
                costing: Costing | None = None, shared: bool = False, int8: Int8Form | None = None) -> tuple[Separation, Costing]:
    """``model`` separated at one budget (its options checked by :func:`check_options`), and the costing planned from.

    ``provider``: onnxruntime's name of the provider layers are timed on (None: not timed);
    ``costing``: one a search filled, reused; ``shared``: the costing will serve other budgets;
    ``int8``: the form layers are quantized in before they are timed (None: fp32).
    """
    prepared = _prepare(model, example_inputs, calibration)
    sites, skipped, tracing = _sites(prepared.work, include, exclude)
    plan, costing, view = _plan(prepared, sites, budget, order, provider, costing, shared, int8)
    skipped += [SkippedLayer(name, reason) for name, reason in plan.dense_reasons.items()]
    reference = copy_model(prepared.work) if prepared.batches else None  # the dense model the refit matches
    placed = _install_and_prove(model, prepared, sites, plan, tracing, view.recorded, skipped)
    output_errors = _recover(placed, prepared.batches, reference, view.first, both=refit == "both", recalibrate_bn=recalibrate_bn)
    budget_met, flops_after = _budget_figures(plan, placed, prepared.costed)
    result = Separation(
        model=placed.model, layers=_describe(placed, output_errors), skipped=tuple(skipped), original=model,
        verified=placed.verified, verification=placed.verification, budget_met=budget_met,
        flops_before=plan.flops_before, flops_after=flops_after, inputs=prepared.inputs or prepared.sample,
    )
    return result, costing


@dataclass
class _Prepared:
    """The working copy (convs with computed weights baked plain) and the inputs, on its device."""

    work: nn.Module
    baked: list[tuple[nn.Module, nn.Module]]  # what ``unbake`` puts back
    inputs: tuple  # the example inputs, () without them
    sample: tuple  # the first calibration sample, () without calibration
    batches: Any  # calibration batches: a list, StreamedBatches, or [] without calibration
    device: torch.device

    @property
    def costed(self) -> tuple:
        """What budgets and latency are costed on: the example inputs, else the first calibration sample."""
        return self.inputs or self.sample


def _prepare(model: nn.Module, example_inputs: Any, calibration: Any) -> _Prepared:
    """Copy the caller's model once, give lazy convs their weights, and bake computed weights plain."""
    batches = calibration_batches(calibration, like=as_inputs(example_inputs)) if calibration is not None else []
    work = working_copy(model)
    device = model_device(work)
    inputs = on_device(as_inputs(example_inputs), device)
    sample = on_device(samples_of(batches[0], 0, 1, as_inputs(example_inputs)), device) if batches else ()  # a state's batch may be on dim 1
    if _is_lazy(work) and (inputs or sample):  # lazy convs get their weights from a first pass, on the copy
        with running(inputs or sample, _what(inputs)):
            record(work, inputs or sample)
    work, baked = bake(work)
    return _Prepared(work, baked, inputs, sample, batches, device)


def _sites(work: nn.Module, include: Sequence[str], exclude: Sequence[str]) -> tuple[list[Site], list[SkippedLayer], Any]:
    """The weights that may be separated, what is left alone with why, and the tracing; refuses a model with none."""
    sites, skipped, tracing = find_sites(work, include, exclude)
    if not sites:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "the model has no conv"
        raise NothingToSeparateError(f"nothing to separate ({detail})")
    return sites, skipped, tracing


def _plan(prepared: _Prepared, sites: list[Site], budget: Budget, order: str, provider: str | None,
          costing: Costing | None, shared: bool, int8: Int8Form | None = None) -> tuple[Plan, Costing, DenseModel]:
    """The budget's plan over this model's dense view, the costing, and the view (its recordings reused below).

    The view's first calibration batch is recorded at most once: the refit takes its outputs
    as that batch's targets.
    """
    batch = on_device(prepared.batches[0], prepared.device) if prepared.batches else None
    view = DenseModel(prepared.work, sites, prepared.costed, _what(prepared.inputs), batch, provider, int8)
    plan, costing = make_plan(sites, budget, order, view, costing, shared)
    if view.first is not None:
        view.first.drop_inputs()
    if prepared.batches:  # the refit sums every process's equations layer by layer: the layers must be the same
        _same_plan_everywhere(plan)
    return plan, costing, view


@dataclass
class _Placed:
    """The separated model and the layers proven in it."""

    model: nn.Module
    installed: list[Installed]  # the sites whose pairs stay, in model order
    calls: dict[str, Any]  # per site, the calls the proof saw
    verified: bool
    verification: str


def _install_and_prove(
    model: nn.Module, prepared: _Prepared, sites: list[Site], plan: Plan, tracing: Any,
    dense_run: ConvRecorder | None, skipped: list[SkippedLayer],
) -> _Placed:
    """Put the planned pairs in the working copy and run it: a pair stays where it ran and the conv it replaces did not.

    Layers put back, and why, are added to ``skipped``.
    """
    work, inputs, sample = prepared.work, prepared.inputs, prepared.sample
    proof_inputs, why_not = (inputs, None) if inputs else (sample, None) if sample else guess_inputs(work)
    before: dict[str, str] = {}
    if proof_inputs:
        with running(proof_inputs, _what(inputs)):
            run = dense_run if dense_run is not None and prepared.costed is proof_inputs else record(work, proof_inputs)
        before = dense_behaviour(model, sites, run)
    if sample and inputs:  # calibration data the model cannot take would fail only in the refit
        run_checked(work, sample, _what(()))
    edits = Edits(work)
    installed, problems = install(edits, sites, plan.picks, tracing)
    skipped += [SkippedLayer(name, reason) for name, reason in problems]
    edits.rewire()
    calls: dict[str, Any] = {}
    if proof_inputs:
        installed, calls = _prove(edits, installed, proof_inputs, before, skipped)
        shapes = ", ".join("x".join(map(str, x.shape)) for x in tensors_of(proof_inputs))
        verification = f"every layer's pairs ran, and no replaced conv did, on inputs {shapes or 'given'}"
    else:
        verification = f"not run: no example inputs, and {why_not}; pass example inputs to prove the separation"
        log.warning("convtool could not run the separated model (%s): the layers are not proven to run", why_not)
    work = unbake(edits.root, prepared.baked)  # convs left dense keep their weight_norm / spectral_norm
    if not installed:
        reason = next((s.reason for s in reversed(skipped)), "every conv stays dense")
        raise NothingToSeparateError(f"nothing to separate: every conv stays dense ({reason})")
    return _Placed(work, installed, calls, bool(proof_inputs), verification)


def _recover(placed: _Placed, batches: Any, reference: tuple[nn.Module, dict[int, object]] | None, first: FirstBatch | None,
             both: bool, recalibrate_bn: bool) -> dict[str, float | None]:
    """With calibration data, refit the pairs (and re-estimate BatchNorm if asked); per layer, the output error left."""
    if not batches:
        return {}
    output_errors = _calibrate(*reference, placed.model, placed.installed, batches, first, both=both)
    if recalibrate_bn:
        recalibrate_batchnorm(placed.model, batches)
    return output_errors


def _budget_figures(plan: Plan, placed: _Placed, costed: tuple) -> tuple[bool | None, float | None]:
    """Whether the budget was met, and the FLOPs after, for the model returned."""
    budget_met, flops_after = plan.budget_met, plan.flops_after
    if flops_after is not None and len(placed.installed) < sum(p is not None for p in plan.picks.values()):
        # The proof put planned layers back: the figures are those of the model returned.
        flops_after = model_flops(placed.model, costed, record(placed.model, costed))
        if plan.flops_limit is not None:
            budget_met = flops_after <= plan.flops_limit * (1 + 1e-9)
    return budget_met, flops_after


def _describe(placed: _Placed, output_errors: dict[str, float | None]) -> tuple[LayerChange, ...]:
    """One record per separated weight, in model order."""
    return tuple(
        describe(i.site.name, [n for n in i.names if label(n) != i.site.name], i.site.source, i.claim.pairs,
                 placed.calls.get(i.site.name) if placed.verified else None, dense_weight=i.site.weight,
                 output_error=output_errors.get(i.site.name), params_before=_dense_params(i.site))
        for i in placed.installed
    )


def _dense_params(site: Site) -> int:
    """The layer's parameters as it was: its weight and its own biases (the refit may give its pairs one)."""
    biases = {id(u.bias): u.bias for u in site.uses if u.bias is not None}
    return site.weight.numel() + sum(b.numel() for b in biases.values())


def _is_lazy(model: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def _same_plan_everywhere(plan: Plan) -> None:
    """Under a process group, refuse plans that differ between processes (each planned on its own first batch).

    Their refits would sum the normal equations of different layers, or wait for one another.
    """
    if world().size == 1:
        return
    import torch.distributed as dist

    picks: list = [None] * world().size
    dist.all_gather_object(picks, sorted(plan.picks.items()))
    if any(p != picks[0] for p in picks):
        raise InvalidOptionError("the processes chose different ranks (each planned on its own first calibration batch); "
                                 "give every process the same first batch, or a fixed rank")


def _prove(edits: Edits, installed: list[Installed], inputs: tuple, before: dict[str, str], skipped: list[SkippedLayer]):
    """Keep the installed sites the proof confirms; put the rest back, each with its reason in ``skipped``."""
    proof = prove(edits.root, inputs, [i.claim for i in installed], before)
    if proof.failed:
        undone = edits.revert(set(proof.failed))
        for i in installed:
            if i.site.name in undone:
                reason = proof.failed.get(i.site.name, "left dense with a layer it shares code with, which could not be proven")
                skipped.append(SkippedLayer(i.site.name, reason))
        installed = [i for i in installed if i.site.name not in undone]
    return installed, proof.calls


def _what(inputs: tuple) -> str:
    return "the example inputs" if inputs else "the first calibration sample (calibration data are model inputs, without labels)"


def _calibrate(reference, memo, work, installed: list[Installed], batches, first: FirstBatch | None, both: bool) -> dict[str, float | None]:
    """Refit the pairs, each against its dense twin in ``reference``; with ``both``, then both halves of each."""
    layers = [Layer(i.site.name, memo[id(i.site.weight)], i.claim.pairs) for i in installed]
    give_biases(layers)
    # A streamed loader may shuffle or transform: its next pass need not start with the batch planned on.
    shared = first is not None and isinstance(batches, list)
    errors = refit(reference, work, layers, batches, first_targets=first.outputs(memo) if shared else None)
    if both and refit_both_halves(reference, work, layers, batches):
        # Pairs downstream of a changed one were fit to its old outputs: refit every last conv again.
        errors = refit(reference, work, layers, batches)
    return errors
