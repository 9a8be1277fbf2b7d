"""Tracing a model with torch.fx where it can be traced: the whole model, or its largest traceable parts.

A module whose own forward cannot be traced (data-dependent control flow, list inputs, loops
until convergence) is kept as an opaque leaf of its parent's graph, and its children are traced
on their own. Convs and separated pairs are always leaves: the passes above match them as
``call_module`` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from .modules import CONV_TYPES, BranchedSeparableConv, SamePadded, SeparableConv
from .names import describe_error, join, label

CONV_MODULES = (*CONV_TYPES, SeparableConv, BranchedSeparableConv, SamePadded)


class Tracer(fx.Tracer):
    """Keeps convs, separated pairs and known-untraceable modules (``opaque``, by id) as leaves."""

    def __init__(self, opaque: set[int] | None = None) -> None:
        super().__init__()
        self.opaque = opaque or set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, CONV_MODULES) or id(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)


@dataclass
class Region:
    """A traced part of the model: ``module`` at qualified ``name``, and its graph."""

    name: str
    module: nn.Module
    graph: fx.Graph


@dataclass
class Tracing:
    """What tracing found: the traced regions and the parts left untraced, with reasons."""

    regions: list[Region]
    untraced: dict[str, str]
    opaque: set[int] = field(default_factory=set)


def _may_hold_convs(module: nn.Module) -> bool:
    """Whether tracing this module can find anything to separate or fold."""
    return any(isinstance(m, CONV_MODULES) for m in module.modules()) or any(p.dim() == 4 for p in module.parameters())


def _container(module: nn.Module) -> bool:
    """A module without a forward of its own (``ModuleList``, ``ModuleDict``): it holds parts, it is not one."""
    return type(module).forward is nn.Module.forward


def _traceable_child(child: nn.Module) -> bool:
    return not isinstance(child, CONV_MODULES) and _may_hold_convs(child)


def trace_regions(model: nn.Module) -> Tracing:
    """Trace ``model``, or where that fails, the largest submodules that can be traced."""
    opaque: set[int] = set()
    graphs: dict[int, fx.Graph] = {}
    untraced: dict[str, str] = {}

    def attempt(module: nn.Module) -> BaseException | None:
        try:
            graphs[id(module)] = Tracer(opaque).trace(module)
        except Exception as error:  # fx raises many kinds; any of them means "not traceable"
            return error
        return None

    def find(module: nn.Module, name: str) -> bool:
        if _container(module):  # never called, so never traced: its children are the parts
            opaque.add(id(module))
            return all([find(c, join(name, n)) for n, c in module.named_children() if _traceable_child(c)])
        error = attempt(module)
        if error is None:
            return True
        children = [(n, c) for n, c in module.named_children() if _traceable_child(c)]
        if not all([find(c, join(name, n)) for n, c in children]):
            # Some children are now opaque leaves: the module's own code may trace around them.
            error = attempt(module)
            if error is None:
                return True
        untraced[label(name)] = f"fx cannot trace it ({describe_error(error, 160)})"
        opaque.add(id(module))
        return False

    if isinstance(model, CONV_MODULES):
        return Tracing([], {}, opaque)
    find(model, "")
    regions: list[Region] = []

    def collect(module: nn.Module, name: str) -> None:
        if id(module) not in opaque:
            regions.append(Region(name, module, graphs[id(module)]))
            collect_inside(module, name)
            return
        for n, child in module.named_children():
            if _traceable_child(child):
                collect(child, join(name, n))

    def collect_inside(module: nn.Module, name: str) -> None:
        for n, child in module.named_children():
            if id(child) in opaque:
                collect(child, join(name, n))
            elif not isinstance(child, CONV_MODULES):
                collect_inside(child, join(name, n))

    collect(model, "")
    return Tracing(regions, untraced, opaque)
