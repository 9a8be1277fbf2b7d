"""``separate``: the public entry point of the PyTorch front end, and its result.

``separate`` reads as its steps, each a function here with its inputs and outputs: check the
options, copy and bake (``_prepare``: ``core.working_copy``, ``bake``), find what can be
separated (``_sites``: ``sites``), decide ranks (``_plan_ranks``: ``plan.ranks``, measuring the
dense model with ``dense``), put the pairs in place and prove they run (``_install_and_prove``:
``install``, ``proof``), refit them on data (``_recover``: ``recovery``), and describe each
layer (``_describe``: ``measure.layers``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..core.decompose import ORDERS
from ..core.inputs import as_inputs, guess_inputs, model_device, on_device, run_checked, running, samples_of, tensors_of
from ..core.modules import SeparableConv, runtime_forms
from ..core.names import label
from ..core.records import AgreementTarget, BudgetSearch, FlopsTarget, LatencySearch, LatencyTarget, LayerChange, Rank, SkippedLayer
from ..core.records import check_rank
from ..core.working_copy import copy_model, working_copy
from ..errors import InvalidOptionError, NothingToSeparateError
from ..measure.conv_calls import ConvRecorder, record
from ..measure.layers import describe
from ..measure.onnxrt import module_latency, require_provider
from ..measure.sensitivity import OutputError
from ..plan.ranks import Costing, Latency, Plan, make_plan
from ..plan.site import Site
from ..recovery.batches import calibration_batches
from ..recovery.both_halves import refit_both_halves
from ..recovery.calibrate import Layer, give_biases, recalibrate_batchnorm, refit
from ..recovery.distributed import world
from ..recovery.synthesize import Synthesis, synthesis
from .bake import bake, unbake
from .dense import FirstBatch, dense_behaviour, model_flops, site_stats
from .install import Installed, install
from .latency_search import meet_latency
from .proof import Edits, prove
from .search import search_budget
from .sites import find_sites

if TYPE_CHECKING:
    from ..measure.compare import Comparison

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Separation:
    """What :func:`separate` did.

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
        budget_met: with a FLOP target, whether it was reached (None without one).
        flops_before, flops_after: with a FLOP target, the model's multiply-adds on the
            example inputs before and after, as the budget counted them.
        synthetic: with ``calibration="synthetic"``, how the calibration inputs were made
            from the model alone (``.inputs`` holds them, ``.note`` says what they match).
        search: with an :class:`~convtool.AgreementTarget`, the floors, what the model returned
            measured on how many held-out samples, and every budget tried (None otherwise).
        latency_search: with a :class:`~convtool.LatencyTarget`, the target, the end-to-end
            ratio the returned model measured (runs, threads) and every round tried, or why
            the target was not met, with the floor measured (None otherwise).
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
    search: BudgetSearch | None = None
    latency_search: LatencySearch | None = None

    @property
    def params_before(self) -> int:
        """Parameters of the separated layers before separation."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the separated layers after separation."""
        return sum(layer.params_after for layer in self.layers)

    def report(self, example_inputs: Any) -> "Comparison":
        """The before/after comparison of the whole model on ``example_inputs``."""
        from ..measure.compare import compare

        return compare(self.original, self.model, example_inputs, separation=self)


def _latency(provider: str | None) -> Latency | None:
    """Times a dense conv as it is, and a pair in the fastest of the exact forms it may ship in."""
    if provider is None:
        return None
    name = require_provider(provider)

    def latency(module: nn.Module, shape: tuple[int, ...]) -> float:
        forms = runtime_forms(module, {shape[-1]}) if isinstance(module, SeparableConv) else [module]
        return min(module_latency(form, shape, name) for form in forms)

    return latency


def separate(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    rank: Rank = 1,
    order: str = "dw-pw",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    calibration: Any = None,
    recalibrate_bn: bool = False,
    latency_provider: str | None = None,
    refit: str = "last",
) -> Separation:
    """Replace the standard convs of ``model`` by depthwise-separable pairs, and prove it.

    Any standard conv is a candidate: ``Conv1d``/``Conv2d``/``Conv3d``, their transposed
    versions, and weights called through ``F.conv1d``/``F.conv2d``/``F.conv3d`` (found by tracing).

    Each pair is initialised from the trained weights by truncated SVD, so it is the closest
    rank-``rank`` separable conv to the original; ``rank="full"`` reproduces the original to
    float precision. The caller's model is never modified. The separated model is then run:
    a layer is reported as separated only if its pair ran and the conv it replaced did not.

    Args:
        model: any ``nn.Module``, a bare ``nn.Conv2d`` included; parts fx cannot trace are
            kept and reported.
        example_inputs: a tensor, a tuple of tensors, or a dict the forward takes. The proof
            runs on them (without them, on the first calibration sample, or on a
            (1, C, 224, 224) input when the model takes one); FLOP targets and latency are
            costed on them.
        rank: separable filters per channel: a positive int, ``"full"`` (exact),
            :class:`~convtool.FlopsTarget` (the model's FLOPs after, as a fraction of before;
            layers may stay dense where that is cheaper), :class:`~convtool.Energy` (per
            layer, the smallest rank keeping that share of the squared singular values),
            :class:`~convtool.AgreementTarget` (the fewest FLOPs whose model keeps a top-1
            agreement or SQNR floor on held-out calibration data; needs calibration) or
            :class:`~convtool.LatencyTarget` (the latency on an onnxruntime provider, as a
            fraction of the original's, measured end to end; ``result.latency_search``). An
            explicit rank separates every eligible conv, even where it costs more than the dense conv.
        order: ``"dw-pw"`` (depthwise then pointwise), ``"pw-dw"`` (pointwise then
            depthwise), or ``"auto"`` (per layer, the lower error at the rank or budget).
        include: glob patterns on qualified names (``"layer1.*"``); when given, only matching
            convs are separated.
        exclude: glob patterns of convs to leave dense; they win over ``include``.
        calibration: unlabeled model inputs (a tensor, a tuple of tensors for several inputs,
            or an iterable of batches). A FLOP target then weighs output error instead of
            weight error, and every separated layer's last conv is refit by least squares to
            reproduce the original layer's outputs on all its calls (with a bias, given to a
            conv that had none: bias correction). ``"synthetic"``: no data
            at hand, so :func:`~convtool.synthesize` makes 256 inputs from the model itself
            (matching its BatchNorm statistics) and those are used; call ``synthesize`` yourself
            for other settings, or to keep the inputs.
        recalibrate_bn: after calibration, re-estimate BatchNorm statistics on the data. Off
            by default: the refit already matches each layer's original outputs, and
            re-estimating them on a few hundred images lowered accuracy in every setting of
            benchmarks/accuracy.py.
        refit: with calibration, ``"last"`` refits each pair's last conv (one pass per batch);
            ``"both"`` then also refits both convs of each pair (depthwise- or pointwise-first,
            ungrouped, called once) by alternating least squares, layer by layer (better fits, two passes up to each layer per batch;
            benchmarks/RESULTS.md, "Refitting both halves").
        latency_provider: an onnxruntime provider (``"cpu"``, ``"cuda"``) on which each
            layer's separated forms are timed at the layer's input shape (needs example
            inputs); a layer whose separated form is not faster than its dense conv there stays
            dense, whatever the rank option.

    Returns:
        A :class:`Separation`: the new model, a record per separated layer, the reason for
        every conv left dense, and whether the claims were proven.

    Raises:
        InvalidOptionError: bad ``rank``, ``order``, data, or a model on the meta device.
        ProviderUnavailableError: ``latency_provider``, or a latency target's provider, cannot run here.
        NothingToSeparateError: no conv can be separated under these options (or, for an
            agreement target, no budget that separates one meets the floor).
        SeparationError: the separated model fails on the inputs.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        >>> result = separate(net, torch.randn(1, 3, 32, 32), rank="full")
        >>> [layer.name for layer in result.layers], result.verified
        (['0'], True)
    """
    rank, latency = _checked_options(model, rank, order, refit, latency_provider)
    calibration, synthetic = _synthetic(model, example_inputs, calibration)
    options = dict(order=order, include=include, exclude=exclude, recalibrate_bn=recalibrate_bn,
                   latency_provider=latency_provider, refit=refit)
    if isinstance(rank, AgreementTarget):
        if calibration is None:
            raise InvalidOptionError("an agreement target measures the separated model on held-out calibration data: pass calibration")

        def separate_at(target: FlopsTarget, fit: Any, costing: Costing) -> Separation:
            return _separate(model, example_inputs, rank=target, calibration=fit, latency=latency, costing=costing, **options)

        result, search = search_budget(model, rank, calibration, separate_at)
        return dataclasses.replace(result, search=search, synthetic=synthetic)
    if isinstance(rank, LatencyTarget):
        def separate_in_ms(budget: FlopsTarget, costing: Costing, latency: Latency) -> Separation:
            return _separate(model, example_inputs, rank=budget, calibration=calibration, latency=latency, costing=costing,
                             **{**options, "latency_provider": rank.provider})

        result, search = meet_latency(model, example_inputs, rank, latency_provider, separate_in_ms)
        return dataclasses.replace(result, latency_search=search, budget_met=None, synthetic=synthetic)
    return dataclasses.replace(_separate(model, example_inputs, rank=rank, calibration=calibration, latency=latency, **options),
                               synthetic=synthetic)


def _separate(model: nn.Module, example_inputs: Any, *, rank: Rank, order: str, include: Sequence[str], exclude: Sequence[str],
              calibration: Any, recalibrate_bn: bool, latency_provider: str | None, latency: Latency | None, refit: str,
              costing: Costing | None = None) -> Separation:
    """:func:`separate` at one rank option, its options checked; ``costing`` reused across the budgets of a search."""
    prepared = _prepare(model, example_inputs, calibration)
    sites, skipped, tracing = _sites(prepared.work, include, exclude)
    plan, dense_run, first = _plan_ranks(prepared, sites, rank, order, latency, latency_provider, costing)
    skipped += [SkippedLayer(name, reason) for name, reason in plan.dense_reasons.items()]
    reference = copy_model(prepared.work) if prepared.batches else None  # the dense model the refit matches
    placed = _install_and_prove(model, prepared, sites, plan, tracing, dense_run, skipped)
    output_errors = _recover(placed, prepared.batches, reference, first, both=refit == "both", recalibrate_bn=recalibrate_bn)
    budget_met, flops_after = _budget_figures(rank, plan, placed, prepared.costed)
    return Separation(
        model=placed.model, layers=_describe(placed, output_errors), skipped=tuple(skipped), original=model,
        verified=placed.verified, verification=placed.verification, budget_met=budget_met,
        flops_before=plan.flops_before, flops_after=flops_after,
    )


def _checked_options(model: nn.Module, rank: Rank, order: str, refit: str, latency_provider: str | None) -> tuple[Rank, Latency | None]:
    """The options checked before any work: the rank in its typed form, and the latency probe (None without a provider)."""
    rank = check_rank(rank)
    if refit not in ("last", "both"):
        raise InvalidOptionError(f"refit must be 'last' or 'both'; got {refit!r}")
    if order not in (*ORDERS, "auto"):
        raise InvalidOptionError(f"order must be one of {', '.join((*ORDERS, 'auto'))}; got {order!r}")
    latency = _latency(latency_provider)
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return rank, latency


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
        """What FLOP targets and latency are costed on: the example inputs, else the first calibration sample."""
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


def _plan_ranks(
    prepared: _Prepared, sites: list[Site], rank: Rank, order: str, latency: Latency | None, provider: str | None,
    costing: Costing | None = None,
) -> tuple[Plan, ConvRecorder | None, FirstBatch | None]:
    """The rank decisions, with what the strategy needs measured first.

    Returns the plan, the dense model's conv calls on the costed inputs (recorded for a FLOP
    target or a latency provider, else None), and the first calibration batch's recording
    (None without calibration), which the refit reuses.
    """
    work, costed = prepared.work, prepared.costed
    dense_run = None
    if isinstance(rank, FlopsTarget) or latency is not None:
        if not costed:
            raise InvalidOptionError("a FLOP target or a latency provider needs example inputs (or calibration data) to cost each layer")
        with running(costed, _what(prepared.inputs)):
            dense_run = record(work, costed)
    if isinstance(rank, FlopsTarget) and rank.sensitivity and not prepared.batches:
        raise InvalidOptionError("a FLOP target with sensitivity measures errors at the model's output on calibration data: pass calibration")
    first = FirstBatch(work, sites, on_device(prepared.batches[0], prepared.device)) if prepared.batches else None
    stats = site_stats(sites, dense_run) if dense_run is not None else {}
    reused = bool(costing and costing.choices)  # a search's later budgets: the costing holds the model's FLOPs
    total = model_flops(work, costed, dense_run) if isinstance(rank, FlopsTarget) and not reused else None
    sensitivity = None
    if first is not None and isinstance(rank, FlopsTarget) and rank.sensitivity and not reused:
        sensitivity = _output_error(work, first.batch)
    plan = make_plan(sites, rank, order, stats=stats, total_flops=total, activations=first,
                     latency=latency, provider=provider or "", sensitivity=sensitivity, costing=costing)
    if first is not None:
        first.drop_inputs()
    if prepared.batches:  # the refit sums every process's equations layer by layer: the layers must be the same
        _same_plan_everywhere(plan)
    return plan, dense_run, first


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


def _budget_figures(rank: Rank, plan: Plan, placed: _Placed, costed: tuple) -> tuple[bool | None, float | None]:
    """Whether a FLOP target was met, and the FLOPs after, for the model returned."""
    budget_met, flops_after = plan.budget_met, plan.flops_after
    if isinstance(rank, FlopsTarget) and len(placed.installed) < sum(p is not None for p in plan.picks.values()):
        # The proof put planned layers back: the figures are those of the model returned.
        flops_after = model_flops(placed.model, costed, record(placed.model, costed))
        budget_met = flops_after <= rank.fraction * plan.flops_before * (1 + 1e-9)
    return budget_met, flops_after


def _describe(placed: _Placed, output_errors: dict[str, float | None]) -> tuple[LayerChange, ...]:
    """One record per separated weight, in model order."""
    return tuple(
        describe(i.site.name, [n for n in i.names if label(n) != i.site.name], i.site.source, i.claim.pairs,
                 placed.calls.get(i.site.name) if placed.verified else None, dense_weight=i.site.weight,
                 output_error=output_errors.get(i.site.name), params_before=_dense_params(i.site))
        for i in placed.installed
    )


def _synthetic(model: nn.Module, example_inputs: Any, calibration: Any) -> tuple[Any, Synthesis | None]:
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


def _output_error(model: nn.Module, batch: tuple) -> OutputError:
    try:
        return OutputError(model, batch)
    except ValueError:
        raise InvalidOptionError("a FLOP target with sensitivity needs a model with a float output to compare") from None


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
