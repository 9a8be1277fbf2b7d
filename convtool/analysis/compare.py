"""``compare``: what separation bought (parameters, FLOPs) and what it cost (output error)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..convert.decompose import dense_params
from ..convert.modules import SeparableConv2d
from ..convert.separate import PairShape
from ..inputs import as_inputs, eval_mode, model_device, on_device
from .counts import FLOPS_UNIT, Analysis, analyze
from .fidelity import Fidelity, output_fidelity


@dataclass(frozen=True)
class LayerCost(PairShape):
    """One separated layer, before and after. FLOPs count one multiply-add as one flop."""

    flops_before: int = 0
    flops_after: int = 0

    @property
    def params_ratio(self) -> float:
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def flops_ratio(self) -> float:
        return self.flops_before / self.flops_after if self.flops_after else float("inf")


@dataclass(frozen=True)
class Comparison:
    """The before/after view of a separation.

    Attributes:
        before, after: :class:`Analysis` of the original and the separated model.
        layers: one row per separated layer (every ``SeparableConv2d`` of ``after``).
        fidelity: how far the outputs moved on the example inputs.
        skipped: (name, reason) for convs left dense, when the comparison came from a
            :class:`~convtool.Separation`.
    """

    before: Analysis
    after: Analysis
    layers: tuple[LayerCost, ...]
    fidelity: Fidelity
    skipped: tuple[tuple[str, str], ...] = ()
    flops_unit: str = FLOPS_UNIT

    @property
    def params_ratio(self) -> float:
        """Original parameters over separated parameters (higher is smaller)."""
        return self.before.params / self.after.params if self.after.params else float("inf")

    @property
    def flops_ratio(self) -> float:
        """Original FLOPs over separated FLOPs (higher is cheaper)."""
        return self.before.flops / self.after.flops if self.after.flops else float("inf")


def _run(model: nn.Module, inputs: tuple, pairs: dict[str, SeparableConv2d]) -> tuple[Any, dict[str, int]]:
    """Outputs in eval mode, and the output elements of every pair, summed over its calls."""
    sizes: dict[str, int] = {}
    hooks = [
        pair.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, sizes.get(name, 0) + o.numel()))
        for name, pair in pairs.items()
    ]
    try:
        with eval_mode(model), torch.no_grad():
            return model(*on_device(inputs, model_device(model))), sizes
    finally:
        for hook in hooks:
            hook.remove()


def compare(original: nn.Module, separated: nn.Module, example_inputs: Any) -> Comparison:
    """Parameters, FLOPs and output agreement of two models on the same inputs.

    The separated layers are found as the ``SeparableConv2d`` modules of ``separated``; a
    layer's "before" numbers come from the module at the same name in ``original`` where there
    is one (convtool keeps the names), and from the dense conv's shape otherwise (functional
    convs).

    Args:
        original: the reference model.
        separated: the model to judge, typically ``separate(original, ...).model``.
        example_inputs: a tensor or tuple of tensors.

    Returns:
        A :class:`Comparison`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(32, 64, 3, bias=False))
        >>> c = compare(net, convtool.separate(net).model, torch.randn(1, 32, 8, 8))
        >>> c.before.params, c.after.params
        (18432, 2336)
    """
    inputs = as_inputs(example_inputs)
    before, after = analyze(original, inputs), analyze(separated, inputs)
    pairs = {name: m for name, m in separated.named_modules() if isinstance(m, SeparableConv2d)}
    reference, _ = _run(original, inputs, {})
    actual, sizes = _run(separated, inputs, pairs)
    layers = []
    for name, pair in pairs.items():
        k = pair.kernel_size
        dense_flops = sizes.get(name, 0) * (pair.in_channels // pair.groups) * k[0] * k[1]
        old = before.module(name)
        old_is_conv = old is not None and old.type != "SeparableConv2d" and old.flops > 0
        new = after.module(name)
        layers.append(
            LayerCost(
                name=name,
                in_channels=pair.in_channels,
                out_channels=pair.out_channels,
                kernel_size=tuple(k),
                stride=tuple(pair.stride),
                groups=pair.groups,
                rank=pair.rank,
                order=pair.order,
                params_before=old.params if old_is_conv else dense_params(
                    pair.out_channels, pair.in_channels, k, pair.groups, pair.bias is not None
                ),
                params_after=new.params,
                flops_before=old.flops if old_is_conv else dense_flops,
                flops_after=new.flops,
                relative_error=pair.relative_error,
            )
        )
    return Comparison(before, after, tuple(layers), output_fidelity(actual, reference))
