"""``compare``: what separation bought (parameters, FLOPs) and what it cost (output error)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.inputs import as_inputs, eval_mode, model_device, on_device, run_checked, running
from ..core.modules import SeparableConv
from ..core.names import get_or_none
from ..core.records import Benchmark, LayerChange, LayerLatency, Search, SkippedLayer
from ..errors import InvalidOptionError
from .conv_calls import record
from .counts import FLOPS_UNIT, Analysis, analyze
from .fidelity import Fidelity, output_fidelity
from .layers import describe, pair_groups


@dataclass(frozen=True)
class Comparison:
    """The before/after view of a separation.

    Attributes:
        before, after: :class:`Analysis` of the original and the separated model.
        layers: one :class:`~convtool.LayerChange` per separated weight, its FLOPs and calls
            measured on these inputs.
        fidelity: how far the outputs moved on the example inputs.
        skipped: convs left dense, when the comparison came from a :class:`~convtool.Separation`.
        verified: from a Separation: whether every layer was proven to run in the separated
            model (None for two arbitrary models).
        latency: both models timed on one onnxruntime provider, when measured (the CLI does
            with ``--onnx``; set it with ``dataclasses.replace`` and :func:`~convtool.benchmark`).
        slower_layers: when the separated model is slower, the layers whose separated form is
            not faster than a dense conv, timed alone (:func:`~convtool.layer_latencies`).
        search: from a separation whose target was met by measurement (an agreement floor, a
            latency target), how it was found and what the model measured; None when the
            model compared is not the one measured (fine-tuned after, say).
        not_refit: from an ONNX separation, the layers calibration did not refit, with why.
        counted: from an ONNX separation, which branch of each ``If`` (and how many loop
            iterations) the FLOPs count.
        not_run: from an ONNX separation, the separated layers the check's inputs did not run.
        int8: the separated model's int8 file judged and timed against the fp32 original and
            the dense int8 model, when made (the CLI's ``--int8``; an
            :class:`~convtool.deploy.int8_compare.Int8Comparison`).
    """

    before: Analysis
    after: Analysis
    layers: tuple[LayerChange, ...]
    fidelity: Fidelity
    skipped: tuple[SkippedLayer, ...] = ()
    verified: bool | None = None
    latency: Benchmark | None = None
    slower_layers: tuple[LayerLatency, ...] = ()
    flops_unit: str = FLOPS_UNIT
    search: Search | None = None
    not_refit: tuple[SkippedLayer, ...] = ()
    counted: tuple[str, ...] = ()
    not_run: tuple[str, ...] = ()
    int8: Any = None

    @property
    def params_ratio(self) -> float:
        """Original parameters over separated parameters (higher is smaller)."""
        return self.before.params / self.after.params if self.after.params else math.inf

    @property
    def flops_ratio(self) -> float:
        """Original FLOPs over separated FLOPs (higher is cheaper)."""
        return self.before.flops / self.after.flops if self.after.flops else math.inf


def compare(original: nn.Module, separated: nn.Module, example_inputs: Any, *, separation: Any = None) -> Comparison:
    """Parameters, FLOPs and output agreement of two models on the same inputs.

    Args:
        original: the reference model.
        separated: the model to judge: ``separate(original, ...).model``, or a fine-tuned copy.
        example_inputs: a tensor or tuple of tensors.
        separation: the :class:`~convtool.Separation` ``separated`` came from, if any: its
            layers (by name), skipped convs and verification are reported, each layer's FLOPs
            and calls measured again on these inputs. Without it, the layers are the
            ``SeparableConv`` modules of ``separated``, grouped by the factors they share.

    Returns:
        A :class:`Comparison`.

    Raises:
        AnalysisError: fvcore cannot count one of the models.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(32, 64, 3, bias=False))
        >>> c = compare(net, convtool.separate(net).model, torch.randn(1, 32, 8, 8))
        >>> c.before.params, c.after.params
        (18432, 2336)
    """
    inputs = as_inputs(example_inputs)
    reference = run_checked(original, on_device(inputs, model_device(original)))
    before, after = analyze(original, inputs), analyze(separated, inputs)
    with running(inputs, "the example inputs (the separated model)"):
        run = record(separated, on_device(inputs, model_device(separated)))
    calls, actual = run.by_weight(), run.output
    try:
        fidelity = output_fidelity(actual, reference)
    except ValueError as error:
        raise InvalidOptionError(f"the two models' outputs cannot be compared ({error})") from None
    layers = []
    if separation is not None:
        # A refit's output error belongs to the model it was measured on, not to a fine-tuned copy.
        same_model = separated is separation.model
        for layer in separation.layers:
            pairs = _pairs_at(separated, (layer.name, *layer.aliases))
            if pairs:
                layers.append(describe(
                    layer.name, layer.aliases, layer.source, pairs, calls, dense_weight=_dense_weight(original, layer.name, layer.source),
                    output_error=layer.output_error if same_model else None, params_before=layer.params_before,
                ))
        skipped, verified = tuple(separation.skipped), separation.verified
        search = separation.search if same_model else None  # measured on that model alone
    else:
        for names, pairs in pair_groups(separated):
            layers.append(describe(names[0], names[1:], "module", pairs, calls, dense_weight=_dense_weight(original, names[0], "module"),
                                   params_before=_dense_params(original, names[0])))
        skipped, verified, search = (), None, None
    return Comparison(before, after, tuple(layers), fidelity, skipped, verified, search=search)


def _dense_params(original: nn.Module, name: str) -> int | None:
    """The original conv module's parameters at a layer name (weight and bias), if a conv module is there."""
    found = original if name in ("", "<model>") else get_or_none(original, name)
    if not isinstance(found, nn.Module) or not isinstance(getattr(found, "weight", None), torch.Tensor):
        return None
    return sum(p.numel() for p in found.parameters(recurse=False))


def _dense_weight(original: nn.Module, name: str, source: str) -> torch.Tensor | None:
    """The original's weight for a layer name: its conv module's weight, or the functional weight itself."""
    found = original if name in ("", "<model>") else get_or_none(original, name)
    if source == "function":
        weight = found
    else:  # read in eval mode: a spectral norm in train mode would run a power iteration on the caller's model
        with eval_mode(found) if isinstance(found, nn.Module) else contextlib.nullcontext(), torch.no_grad():
            weight = getattr(found, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 4 else None


def _pairs_at(model: nn.Module, names: tuple[str, ...]) -> list[SeparableConv]:
    found = [get_or_none(model, n) if n != "<model>" else model for n in names]
    return list({id(p): p for p in found if isinstance(p, SeparableConv)}.values())
