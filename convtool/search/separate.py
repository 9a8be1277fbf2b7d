"""The public entry points: ``separate`` an ``nn.Module`` or ``separate_onnx`` an ONNX graph, at any budget.

Both turn ``rank`` into a budget (:func:`~convtool.plan.budgets.as_budget`), check it against
what they were given before any work, and let it search over its front end's trials: one trial
for a plain budget, several for a target met by measurement. Neither asks which budget it holds.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..deploy.int8 import as_int8_form
from ..errors import InvalidOptionError
from ..plan.budget import Budget, Needs
from ..plan.budgets import as_budget
from ..onnx.separate import OnnxSeparation
from ..pytorch.separate import Separation
from .fronts import OnnxFront, PyTorchFront
from .trials import FrontEnd, Trials


def separate(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    rank: Any = 1,
    order: str = "dw-pw",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    calibration: Any = None,
    recalibrate_bn: bool = False,
    latency_provider: str | None = None,
    refit: str = "last",
    allow_slower: bool = False,
    int8: Any = False,
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
        rank: separable filters per channel: a positive int, ``"full"`` (exact), or a budget:
            :class:`~convtool.FlopsTarget` (the model's FLOPs after, as a fraction of before;
            layers may stay dense where that is cheaper), :class:`~convtool.Energy` (per
            layer, the smallest rank keeping that share of the squared singular values),
            :class:`~convtool.AgreementTarget` (the fastest model keeping a top-1 agreement,
            task agreement or SQNR floor on held-out calibration data; needs calibration) or
            :class:`~convtool.LatencyTarget` (the latency on an onnxruntime provider, as a
            fraction of the original's, measured end to end); ``result.search`` says how a
            target was met. An explicit rank separates every eligible conv, even where it costs
            more than the dense conv; a budget asks for a faster model, so a layer whose
            separated form is not measurably faster than its dense conv stays dense (``allow_slower``).
        order: ``"dw-pw"`` (depthwise then pointwise), ``"pw-dw"`` (pointwise then
            depthwise), or ``"auto"`` (per layer, the lower error at the rank or budget).
        include: glob patterns on qualified names (``"layer1.*"``); when given, only matching
            convs are separated.
        exclude: glob patterns of convs to leave dense; they win over ``include``.
        calibration: unlabeled model inputs (a tensor, a tuple of tensors for several inputs,
            or an iterable of batches). A budget then weighs each layer by the error its change
            causes at the model's output instead of its weight error (``sensitivity`` of the
            budget), and every separated layer's last conv is refit by least squares to
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
        latency_provider: the onnxruntime provider (``"cpu"``, ``"cuda"``) time is measured on:
            each layer's forms timed alone at its input shape, in the form they ship, and a
            latency target or agreement search timed end to end. A budget times on
            onnxruntime CPU when none is named; an explicit rank is timed (and a layer whose
            pair is not faster than its dense conv kept dense) only where one is named.
        allow_slower: keep a budget's layers whose separated form is not measurably faster
            than their dense conv (they are then costed in FLOPs alone, as before 0.3).
        int8: plan for the int8 file the model will ship as (``True``: the default
            :class:`~convtool.deploy.int8.Int8Form`, or a form): wherever layers are timed, each
            dense conv and pair is quantized and timed with 8-bit edges, so a pair stays only
            where it beats its dense conv in int8; a latency target or agreement search times
            both whole models quantized (a :class:`~convtool.LatencyTarget` fraction is then of
            the dense int8 model's latency), and an agreement floor is judged on the separated
            model's int8 file (calibrated on the data it was refit on) against the fp32
            original. Quantize the result with :func:`~convtool.export_onnx` (``int8=``).

    Returns:
        A :class:`~convtool.pytorch.separate.Separation`: the new model, a record per separated layer, the reason for
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
    budget = as_budget(rank)
    front = PyTorchFront(model, example_inputs, calibration, order=order, include=include, exclude=exclude,
                         recalibrate_bn=recalibrate_bn, latency_provider=latency_provider, refit=refit, int8=as_int8_form(int8))
    return searched(budget, front, allow_slower)


def separate_onnx(
    model: Any,
    example_inputs: Any = None,
    *,
    rank: Any = 1,
    order: str = "dw-pw",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    calibration: Any = None,
    providers: Sequence[str] = ("cpu",),
    layout: str = "branches",
    fold_bn: bool = True,
    latency_provider: str | None = None,
    allow_slower: bool = False,
    int8: Any = False,
) -> OnnxSeparation:
    """Replace every standard ``Conv`` node of an ONNX model by a depthwise-separable pair, and check it.

    Args:
        model: a path to a ``.onnx`` file, or an ``onnx.ModelProto`` (not modified).
        example_inputs: the graph's inputs, in order (a sequence) or by name (a dict): each an
            array, tensor or number, or a tuple of ints, a shape filled with seeded noise (float
            inputs). Float inputs of static shape not given get noise; any other input not
            given (an int64 sample rate, a dynamic dimension) is refused, naming each, when some
            inputs were given, and leaves the result unverified (saying why) when none were
            (:mod:`~convtool.onnx.feeds`).
        rank: what :func:`~convtool.separate` takes, the same way: a positive int, ``"full"``
            (exact), :class:`~convtool.Energy`, :class:`~convtool.FlopsTarget` (the whole
            graph's FLOPs after, as a fraction of before; needs input shapes; with
            ``sensitivity`` and calibration, each layer weighed by its effect on the graph's
            outputs), :class:`~convtool.AgreementTarget` (needs calibration) or
            :class:`~convtool.LatencyTarget` (the two graphs timed end to end in onnxruntime).
        order: ``"dw-pw"``, ``"pw-dw"`` or ``"auto"`` (per node, the lower weight error).
        include, exclude: glob patterns on node names, as in :func:`~convtool.separate`.
        calibration: unlabeled inputs (an array or tensor, a tuple of them for several inputs,
            a dict of them by input name, or an iterable of batches; an array of an input's whole
            declared shape, a state say, goes with every batch; an input the data lacks takes its
            value from ``example_inputs``): each pair's last conv is then refit by least squares to
            reproduce the original node's outputs, layer by layer in execution order
            (:mod:`~convtool.onnx.refit`).
        layout: ``"branches"`` (rank > 1 depthwise-first pairs of 1-d and 2-d convs as
            multiplier-1 branches, the form onnxruntime runs fastest) or ``"multiplier"``.
        fold_bn: fold a BatchNormalization that alone reads a separated pair's output into the
            pair's last conv (the runtime form; onnxruntime does it on loading too).
        providers: onnxruntime providers to run both models on (``"cpu"``, ``"cuda"``); one
            this build lacks, or that falls back to the CPU, is reported as not run.
        latency_provider, allow_slower, int8: as for :func:`~convtool.separate`; here each
            layer's nodes are timed alone as this front end writes them (quantized, with int8).

    Raises:
        OnnxFileError: the file is not a valid ONNX model.
        InvalidOptionError: a bad option, a budget without input shapes, an agreement target
            without calibration, or inputs that do not fit the graph.
        ProviderUnavailableError: a latency provider (or a latency target's) that cannot run here.
        NothingToSeparateError: no ``Conv`` node can be separated.
        SeparationError: the separated model does not run in onnxruntime.
    """
    budget = as_budget(rank)
    front = OnnxFront(model, example_inputs, calibration, order=order, include=include, exclude=exclude, providers=providers,
                      layout=layout, fold_bn=fold_bn, latency_provider=latency_provider, int8=as_int8_form(int8))
    return searched(budget, front, allow_slower)


def searched(budget: Budget, front: FrontEnd, allow_slower: bool = False) -> Any:
    """``budget`` on ``front``: its options checked before any work, then its search over the front end's trials.

    Layers are timed where the budget spends or measures time, and, unless ``allow_slower``,
    wherever it asks for a faster model (never slower: a pair not measurably faster than its
    dense conv stays dense), on the provider the caller named or onnxruntime CPU.
    """
    needs = budget.needs()
    if allow_slower and front.provider is not None and needs.timing is None:
        raise InvalidOptionError("allow_slower keeps the layers a latency provider is named to time: drop one")
    if needs.timing is not None:
        front.time_on(needs.timing.provider)
    elif budget.never_slower() and not allow_slower and front.has_inputs:
        front.time_on(None)
    budget.check(inputs=front.has_inputs, data=front.has_data)
    with front, Trials(front, needs, shared=needs != Needs()) as trials:
        result, search = budget.search(trials)
    return front.finish(result, search)
