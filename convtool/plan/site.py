"""What the planner plans: a dense conv weight that may be separated, with every way the model applies it.

A site is one weight tensor. A conv module reached by several names, conv modules tying one
weight (``b.weight = a.weight``) and an ``F.conv2d`` weight called with several settings are
each one site with several uses, so they get one rank, factors shared by all their pairs, one
record, and a cost counted once.

Each front end finds its sites (``pytorch.sites`` in an ``nn.Module``, ``onnx.separate`` in a
graph) and filters them with the same rules (``pattern_reason``, ``shape_reason``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn


@dataclass
class Use:
    """One way the model applies a site's weight: a conv module, or functional calls of one setting."""

    bias: torch.Tensor | None
    options: dict[str, Any]  # stride, padding, dilation, padding_mode (and output_padding, transposed)
    names: tuple[str, ...] = ()  # the conv module's qualified names
    module: nn.Module | None = None
    calls: tuple[Any, ...] = ()  # the PyTorch front end's functional calls (pytorch.fx_pass.FunctionalConv)


@dataclass
class Site:
    """A dense conv weight that may be separated."""

    name: str
    weight: torch.Tensor
    groups: int
    source: str  # "module" or "function"
    uses: list[Use] = field(default_factory=list)
    transposed: bool = False  # the weight is a transposed conv's, (M, N/g, *k)

    @property
    def channels(self) -> tuple[int, int]:
        """(in, out) channels of the conv."""
        a, b = self.weight.shape[:2]
        return (a, b * self.groups) if self.transposed else (b * self.groups, a)

    @property
    def names(self) -> list[str]:
        """Every name the site is known by: its conv modules' names, or its weight's."""
        found = [n for use in self.uses for n in use.names]
        return found or [self.name]

    @property
    def options(self) -> dict[str, Any]:
        """The first use's stride, padding, dilation and padding mode."""
        return self.uses[0].options


def pattern_reason(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> str | None:
    for pattern in exclude:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return f"excluded by pattern {pattern!r}"
    if include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
        return "not matched by any include pattern"
    return None


def shape_reason(weight_shape: Sequence[int], groups: int, transposed: bool = False) -> str | None:
    kernel = tuple(weight_shape[2:])
    in_per_group = weight_shape[0] // groups if transposed else weight_shape[1]
    if all(k == 1 for k in kernel):
        return f"{'x'.join(['1'] * max(len(kernel), 2))} conv: already pointwise"
    if in_per_group == 1 and groups > 1:
        return "already depthwise"
    # One input channel and ungrouped: a filterbank, separable as r filters then a mix of them
    # (planned only under a budget: see plan.ranks.single_channel_reason).
    return None
