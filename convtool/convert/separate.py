"""``separate``: the public entry point of the conversion, and its result.

The steps, each in its own module: copy and bake (``bake``), find what can be separated
(``sites``), decide ranks (``plan``), put the pairs in place (``install``), prove they run
(``proof``), refit them on data (``calibrate``), and describe each layer (``measure.layers``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..core.decompose import ORDERS
from ..core.inputs import as_inputs, guess_inputs, model_device, on_device, run_checked, running, tensors_of
from ..core.modules import SeparableConv, runtime_forms
from ..core.names import join, label
from ..core.records import FlopsTarget, LayerChange, Rank, SkippedLayer, check_rank
from ..errors import AnalysisError, InvalidOptionError, NothingToSeparateError
from ..measure.conv_calls import ConvCall, ConvRecorder, explicit_padding, record
from ..measure.counts import analyze
from ..measure.layers import describe
from ..measure.onnxrt import module_latency, require_provider
from ..measure.sensitivity import OutputError
from .bake import bake, copy_model, unbake, working_copy
from .calibrate import Layer, calibration_batches, give_biases, recalibrate_batchnorm, refit, refit_both_halves
from .distributed import world
from .install import Installed, install
from .plan import Latency, Plan, SiteStats, make_plan
from .proof import NOT_RUN, OUTSIDE, RAN, Edits, prove
from .sites import Site, find_sites
from .synthesize import Synthesis, synthesis

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
    """Replace every standard ``Conv2d`` of ``model`` by a depthwise-separable pair, and prove it.

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
            layers may stay dense where that is cheaper) or :class:`~convtool.Energy` (per
            layer, the smallest rank keeping that share of the squared singular values). An
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
        ProviderUnavailableError: ``latency_provider`` cannot run here.
        NothingToSeparateError: no conv can be separated under these options.
        SeparationError: the separated model fails on the inputs.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        >>> result = separate(net, torch.randn(1, 3, 32, 32), rank="full")
        >>> [layer.name for layer in result.layers], result.verified
        (['0'], True)
    """
    rank = check_rank(rank)
    if refit not in ("last", "both"):
        raise InvalidOptionError(f"refit must be 'last' or 'both'; got {refit!r}")
    if order not in (*ORDERS, "auto"):
        raise InvalidOptionError(f"order must be one of {', '.join((*ORDERS, 'auto'))}; got {order!r}")
    latency = _latency(latency_provider)
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    calibration, synthetic = _synthetic(model, example_inputs, calibration)
    batches = calibration_batches(calibration) if calibration is not None else []
    work = working_copy(model)
    device = model_device(work)
    inputs = on_device(as_inputs(example_inputs), device)
    sample = on_device(tuple(t[:1] for t in batches[0]), device) if batches else ()
    if _is_lazy(work) and (inputs or sample):  # lazy convs get their weights from a first pass, on the copy
        with running(inputs or sample, _what(inputs)):
            record(work, inputs or sample)
    work, baked = bake(work)

    sites, skipped, tracing = find_sites(work, include, exclude)
    if not sites:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "the model has no conv"
        raise NothingToSeparateError(f"nothing to separate ({detail})")

    costed = inputs or sample
    dense_run = None
    if isinstance(rank, FlopsTarget) or latency is not None:
        if not costed:
            raise InvalidOptionError("a FLOP target or a latency provider needs example inputs (or calibration data) to cost each layer")
        with running(costed, _what(inputs)):
            dense_run = record(work, costed)
    if isinstance(rank, FlopsTarget) and rank.sensitivity and not batches:
        raise InvalidOptionError("a FLOP target with sensitivity measures errors at the model's output on calibration data: pass calibration")
    first = _FirstBatch(work, sites, on_device(batches[0], device)) if batches else None
    plan = _plan(work, sites, rank, order, costed, dense_run, first, latency, latency_provider)
    if batches:  # the refit sums every process's equations layer by layer: the layers must be the same
        _same_plan_everywhere(plan)
    skipped += [SkippedLayer(name, reason) for name, reason in plan.dense_reasons.items()]

    proof_inputs, why_not = (inputs, None) if inputs else (sample, None) if sample else guess_inputs(work)
    reference, memo = None, {}
    if batches:  # the dense model the refit matches, as it is before any rewrite
        reference, memo = copy_model(work)

    before: dict[str, str] = {}
    if proof_inputs:
        with running(proof_inputs, _what(inputs)):
            run = dense_run if dense_run is not None and costed is proof_inputs else record(work, proof_inputs)
        before = _dense_behaviour(model, sites, run)
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
    work = unbake(edits.root, baked)  # convs left dense keep their weight_norm / spectral_norm
    if not installed:
        reason = next((s.reason for s in reversed(skipped)), "every conv stays dense")
        raise NothingToSeparateError(f"nothing to separate: every conv stays dense ({reason})")

    output_errors: dict[str, float | None] = {}
    if batches:
        output_errors = _calibrate(reference, memo, work, installed, batches, first, both=refit == "both")
        if recalibrate_bn:
            recalibrate_batchnorm(work, batches)
    budget_met, flops_after = plan.budget_met, plan.flops_after
    if isinstance(rank, FlopsTarget) and len(installed) < sum(p is not None for p in plan.picks.values()):
        # The proof put planned layers back: the figures are those of the model returned.
        flops_after = _model_flops(work, costed, record(work, costed))
        budget_met = flops_after <= rank.fraction * plan.flops_before * (1 + 1e-9)
    layers = tuple(
        describe(i.site.name, [n for n in i.names if label(n) != i.site.name], i.site.source, i.claim.pairs,
                 calls.get(i.site.name) if proof_inputs else None, dense_weight=i.site.weight,
                 output_error=output_errors.get(i.site.name), params_before=_dense_params(i.site))
        for i in installed
    )
    return Separation(
        model=work, layers=layers, skipped=tuple(skipped), original=model, verified=bool(proof_inputs),
        verification=verification, budget_met=budget_met, flops_before=plan.flops_before, flops_after=flops_after,
        synthetic=synthetic,
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


def _plan(work, sites, rank, order, costed, dense_run, first: "_FirstBatch | None", latency, provider) -> Plan:
    """The rank decisions, with what the strategy needs measured: call statistics, model FLOPs, activations."""
    stats = _site_stats(sites, dense_run) if dense_run is not None else {}
    total = _model_flops(work, costed, dense_run) if isinstance(rank, FlopsTarget) else None
    sensitivity = None
    if first is not None and isinstance(rank, FlopsTarget) and rank.sensitivity:
        sensitivity = _output_error(work, first.batch)
    plan = make_plan(sites, rank, order, stats=stats, total_flops=total, activations=first,
                     latency=latency, provider=provider or "", sensitivity=sensitivity)
    if first is not None:
        first.drop_inputs()
    return plan


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


def _dense_behaviour(original: nn.Module, sites: list[Site], run: ConvRecorder) -> dict[str, str]:
    """Per site, what the dense working copy did with its weight: ran it, did not, or ran the caller's own.

    A deep copy does not copy what closures capture, so a conv reached through one runs the
    caller's module even in the copy: its weight is then one of the caller's parameters.
    """
    used = run.by_weight()
    callers = {id(p): name for name, p in original.named_parameters(remove_duplicate=False)}
    outside = {callers[i] for i in used if i in callers}
    behaviour = {}
    for site in sites:
        weight_names = [join(n, "weight") for use in site.uses for n in use.names] or [site.name]
        if id(site.weight) in used:
            behaviour[site.name] = RAN
        elif outside.intersection(weight_names):
            behaviour[site.name] = OUTSIDE
        else:
            behaviour[site.name] = NOT_RUN
    return behaviour


def _site_stats(sites: list[Site], run: ConvRecorder) -> dict[str, SiteStats]:
    """Pixels each site's weight processed, with the input as the layer receives it.

    A conv with a padding mode other than zeros pads its input before calling conv2d, so the
    recorder saw the padded size; the pair's pointwise (``"pw-dw"``) runs on the unpadded one.
    """
    by_weight = run.by_weight()
    stats = {}
    for site in sites:
        calls = by_weight.get(id(site.weight))
        if not calls:
            continue
        o, dims = site.options, site.weight.dim() - 2
        pad = (0,) * (2 * dims)
        if o.get("padding_mode", "zeros") != "zeros":
            pad = explicit_padding(o["padding"], tuple(site.weight.shape[2:]), o["dilation"])
        # F.pad's order is last dimension first: spatial dimension -j loses pad[2j-2] + pad[2j-1].
        shapes = [(*s[:-dims], *(s[-j] - pad[2 * j - 2] - pad[2 * j - 1] for j in range(dims, 0, -1)))
                  for s in (c.input_shape for c in calls)]
        in_pixels = sum((s[0] if len(s) == dims + 2 else 1) * math.prod(s[-dims:]) for s in shapes)
        stats[site.name] = SiteStats(in_pixels, sum(c.out_pixels for c in calls), tuple(shapes[0]))
    return stats


def _model_flops(model: nn.Module, inputs: tuple, run: ConvRecorder) -> float:
    """fvcore's count for the whole model; its convs alone where fvcore cannot trace it."""
    convs = float(sum(c.flops for c in run.calls))
    try:
        return float(max(analyze(model, inputs).flops, convs))
    except AnalysisError:
        return convs


class _FirstBatch:
    """The dense model's conv calls on the first calibration batch, recorded at most once.

    The planner asks for sites' inputs and outputs to cost ranks on; the refit then takes the
    same outputs as that batch's targets instead of running the dense model on it again.
    """

    def __init__(self, model: nn.Module, sites: list[Site], batch: tuple) -> None:
        self.model, self.sites, self.batch = model, sites, batch
        self.calls: dict[int, list[ConvCall]] | None = None

    def __call__(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.calls is None:
            self.calls = record(self.model, self.batch, keep={id(s.weight) for s in self.sites}).by_weight()
        return {s.name: (calls[0].input, calls[0].output) for s in self.sites
                if s.name in names and (calls := self.calls.get(id(s.weight)))}

    def drop_inputs(self) -> None:
        """Free the inputs once planned: only the outputs serve the refit."""
        for calls in (self.calls or {}).values():
            for call in calls:
                call.input = None

    def outputs(self, memo: dict[int, torch.Tensor]) -> dict[int, list[torch.Tensor]] | None:
        """The recorded outputs keyed as the refit's reference knows its weights (``memo``: id -> copy), if recorded.

        Handed over, not kept: the refit lets go of them after the first batch.
        """
        calls, self.calls = self.calls, None
        if calls is None:
            return None
        return {id(memo[key]): [c.output for c in group] for key, group in calls.items() if key in memo}


def _calibrate(reference, memo, work, installed: list[Installed], batches, first: _FirstBatch | None, both: bool) -> dict[str, float | None]:
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
