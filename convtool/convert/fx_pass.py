"""Find convolutions in a model's fx graphs and replace them.

The pass works on the largest parts of the model that ``torch.fx`` can trace. A module whose
own forward cannot be traced (data-dependent control flow, list inputs, iterative loops) is
kept as an opaque leaf of its parent's graph, and its children are traced on their own.

Graphs are used for what only they can tell:

* how each conv module is used: called (safe to replace) or its parameters read directly by
  other code (not safe);
* which ``F.conv2d`` / ``torch.conv2d`` calls take a parameter of the model as weight, so that
  convs written functionally are found too.

Conv modules are then replaced in place, at their own qualified names, in the user's own module
tree: the model keeps its classes, methods, training-only branches and state_dict layout. Only
a module whose forward calls a functional conv is turned into a ``GraphModule``, because only
there the code itself must change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import SeparableConv2d

CONV_FUNCTIONS = {F.conv2d, torch.conv2d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class _Tracer(fx.Tracer):
    """Keeps convs, separated pairs and known-untraceable modules as leaves."""

    def __init__(self, opaque: set[int]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, (nn.Conv2d, SeparableConv2d))
            or id(m) in self.opaque
            or super().is_leaf_module(m, module_qualified_name)
        )


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"fx cannot trace it ({type(error).__name__}: {first})" if first else f"fx cannot trace it ({type(error).__name__})"


def _may_hold_convs(module: nn.Module) -> bool:
    """Whether tracing this module can find anything to separate."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules()) or any(
        p.dim() == 4 for p in module.parameters()
    )


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


def trace_regions(model: nn.Module) -> Tracing:
    """Trace ``model``, or where that fails, the largest submodules that can be traced."""
    opaque: set[int] = set()
    graphs: dict[int, fx.Graph] = {}
    untraced: dict[str, str] = {}

    def attempt(module: nn.Module) -> BaseException | None:
        try:
            graphs[id(module)] = _Tracer(opaque).trace(module)
        except Exception as error:  # fx raises many kinds; any of them means "not traceable"
            return error
        return None

    def find(module: nn.Module, name: str) -> bool:
        error = attempt(module)
        if error is None:
            return True
        children = [(n, c) for n, c in module.named_children() if _traceable_child(c)]
        if not all([find(c, _join(name, n)) for n, c in children]):
            # Some children are now opaque leaves: the module's own code may trace around them.
            error = attempt(module)
            if error is None:
                return True
        untraced[name or "<model>"] = _reason(error)
        opaque.add(id(module))
        return False

    def _traceable_child(child: nn.Module) -> bool:
        return not isinstance(child, (nn.Conv2d, SeparableConv2d)) and _may_hold_convs(child)

    find(model, "")
    regions: list[Region] = []

    def collect(module: nn.Module, name: str) -> None:
        if id(module) not in opaque:
            regions.append(Region(name, module, graphs[id(module)]))
            collect_inside(module, name)
            return
        for n, child in module.named_children():
            if _traceable_child(child):
                collect(child, _join(name, n))

    def collect_inside(module: nn.Module, name: str) -> None:
        for n, child in module.named_children():
            if id(child) in opaque:
                collect(child, _join(name, n))
            elif not isinstance(child, (nn.Conv2d, SeparableConv2d)):
                collect_inside(child, _join(name, n))

    collect(model, "")
    return Tracing(regions, untraced, opaque)


@dataclass(frozen=True)
class FunctionalConv:
    """A ``conv2d`` call in a graph whose weight is a parameter of the model."""

    region: str
    owner: str  # module whose forward made the call, relative to the region
    weight: str  # get_attr target, relative to the region
    bias: str | None
    stride: Any
    padding: Any
    dilation: Any
    groups: int

    @property
    def name(self) -> str:
        """Qualified name of the weight parameter: how the report names this layer."""
        return _join(self.region, self.weight)

    @property
    def bias_name(self) -> str | None:
        """Qualified name of the bias tensor (a parameter or a buffer), if any."""
        return _join(self.region, self.bias) if self.bias else None


@dataclass
class ConvUses:
    """What the traced graphs say about convs: direct reads of conv weights, functional convs."""

    read_directly: set[str] = field(default_factory=set)  # conv modules whose tensors are read
    functional: list[FunctionalConv] = field(default_factory=list)
    unusable: list[tuple[str, str]] = field(default_factory=list)  # functional convs left alone


def _conv_call_args(node: fx.Node) -> dict[str, Any]:
    bound = dict(_CONV_DEFAULTS)
    bound.update(zip(_CONV_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def _owner_of_attr(root: nn.Module, target: str) -> tuple[str, nn.Module | None]:
    owner_path = target.rpartition(".")[0]
    try:
        return owner_path, root.get_submodule(owner_path)
    except AttributeError:
        return owner_path, None


def find_conv_uses(tracing: Tracing, model: nn.Module) -> ConvUses:
    """Read every traced graph for conv modules and functional convs."""
    uses = ConvUses()
    for region in tracing.regions:
        root = region.module
        for node in region.graph.nodes:
            if node.op == "get_attr":
                owner_path, owner = _owner_of_attr(root, node.target)
                if isinstance(owner, nn.Conv2d):
                    uses.read_directly.add(_join(region.name, owner_path))
            elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
                _classify_functional(node, region, uses)
    return uses


def _classify_functional(node: fx.Node, region: Region, uses: ConvUses) -> None:
    args = _conv_call_args(node)
    weight, bias = args["weight"], args["bias"]
    where = _join(region.name, _owner(node)) or "<model>"
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        uses.unusable.append((where, "conv2d call whose weight is computed at run time"))
        return
    owner_path, owner = _owner_of_attr(region.module, weight.target)
    if isinstance(owner, nn.Conv2d):
        uses.unusable.append(
            (_join(region.name, weight.target), f"conv2d call on the weight of conv module {owner_path!r}")
        )
        uses.read_directly.add(_join(region.name, owner_path))
        return
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        uses.unusable.append((_join(region.name, weight.target), "conv2d call whose bias is computed at run time"))
        return
    options = [args[k] for k in ("stride", "padding", "dilation", "groups")]
    if _has_node(options):
        uses.unusable.append((_join(region.name, weight.target), "conv2d call whose options are computed at run time"))
        return
    uses.functional.append(
        FunctionalConv(
            region=region.name,
            owner=_owner(node),
            weight=weight.target,
            bias=bias.target if bias is not None else None,
            stride=args["stride"],
            padding=args["padding"],
            dilation=args["dilation"],
            groups=args["groups"],
        )
    )


def _has_node(value: Any) -> bool:
    found = []
    fx.node.map_arg(value, lambda n: found.append(n))
    return bool(found)


def _attr(root: nn.Module, target: str) -> Any:
    owner_path, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner_path), name)


def set_module(root: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put ``module`` at ``qualname`` under ``root`` (``root`` itself cannot be replaced)."""
    parent_path, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent_path), name, module)


Builder = Callable[[FunctionalConv, torch.Tensor, "torch.Tensor | None"], SeparableConv2d]


def rewrite_functional(
    model: nn.Module, tracing: Tracing, convs: list[FunctionalConv], build: Builder
) -> tuple[nn.Module, list[FunctionalConv]]:
    """Replace functional convs by ``call_module`` nodes of the pairs ``build`` returns.

    The module whose forward makes the call is traced again (after module convs were swapped,
    so its graph calls the new pairs) and replaced by its ``GraphModule``; where it cannot be
    traced on its own, its region is used instead. Returns the model (a new ``GraphModule``
    when the calls are in the model's own forward) and the calls that were replaced.
    """
    by_owner: dict[tuple[str, str], list[FunctionalConv]] = {}
    for conv in convs:
        by_owner.setdefault((conv.region, conv.owner), []).append(conv)
    done: list[FunctionalConv] = []
    for (region, owner), calls in by_owner.items():
        qualname, prefix = _join(region, owner), owner
        try:
            graph = _Tracer(tracing.opaque).trace(model.get_submodule(qualname))
        except Exception:  # traceable inside its region but not alone (e.g. list inputs)
            qualname, prefix = region, ""
            graph = _Tracer(tracing.opaque).trace(model.get_submodule(qualname))
        module = model.get_submodule(qualname)
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        done += _replace_calls(gm, calls, prefix, build)
        if qualname:
            set_module(model, qualname, gm)
        else:
            model = gm
    return model, done


def _replace_calls(gm: fx.GraphModule, calls: list[FunctionalConv], prefix: str, build: Builder) -> list[FunctionalConv]:
    """Swap the conv2d nodes of ``gm`` (traced at ``prefix`` in the region) that match ``calls``."""

    def local(target: str | None) -> str | None:
        if target is None or not prefix:
            return target
        return target[len(prefix) + 1 :] if target.startswith(prefix + ".") else None

    wanted = {
        (local(c.weight), local(c.bias), _key(c.stride, c.padding, c.dilation, c.groups)): c for c in calls
    }
    matches: list[tuple[fx.Node, tuple, fx.Node]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
            continue
        args = _conv_call_args(node)
        weight, bias = args["weight"], args["bias"]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        bias_target = bias.target if isinstance(bias, fx.Node) else None
        key = (weight.target, bias_target, _key(args["stride"], args["padding"], args["dilation"], args["groups"]))
        if key in wanted:
            matches.append((node, key, args["input"]))

    # A weight read only by the replaced calls disappears, and its pair takes its name: the
    # name the user knows the conv by. A weight still read elsewhere stays beside its pair.
    replaced = {node for node, _, _ in matches}
    still_read = {
        n.target for n in gm.graph.nodes if n.op == "get_attr" and any(u not in replaced for u in n.users)
    }
    pairs: dict[tuple, SeparableConv2d] = {}
    for _, key, _ in matches:
        if key not in pairs:
            weight, bias, _ = key
            pairs[key] = build(wanted[key], _attr(gm, weight), _attr(gm, bias) if bias else None)
    doomed = {t for key in pairs for t in key[:2] if t and t not in still_read}
    names: dict[tuple, str] = {}
    for key in pairs:
        weight, i = key[0], 1
        name = weight
        while name in names.values() or (name not in doomed and _attr_or_none(gm, name) is not None):
            i += 1
            name = f"{weight}_separated" + (str(i) if i > 2 else "")
        names[key] = name
    for tensor in doomed:
        owner_path, _, attr = tensor.rpartition(".")
        delattr(gm.get_submodule(owner_path), attr)
    for key, pair in pairs.items():
        gm.add_submodule(names[key], pair)
    for node, key, source in matches:
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(names[key], (source,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return [wanted[key] for key in names]


def _attr_or_none(root: nn.Module, target: str) -> Any:
    try:
        return _attr(root, target)
    except AttributeError:
        return None


def _key(stride: Any, padding: Any, dilation: Any, groups: int) -> tuple:
    def pair(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(v)
        return (v, v) if isinstance(v, int) else v

    return (pair(stride), pair(padding), pair(dilation), groups)


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module (a shared module has several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def iter_convs(model: nn.Module) -> Iterator[tuple[list[str], nn.Conv2d]]:
    """Each distinct Conv2d (subclasses included) with all the names it is reachable by."""
    names = module_names(model)
    # The halves of pairs already separated are depthwise and pointwise by construction.
    seen: set[int] = {id(m) for pair in model.modules() if isinstance(pair, SeparableConv2d) for m in pair.children()}
    for _, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and id(module) not in seen:
            seen.add(id(module))
            yield names[id(module)], module


__all__ = [
    "CONV_FUNCTIONS",
    "ConvUses",
    "FunctionalConv",
    "Region",
    "Tracing",
    "find_conv_uses",
    "iter_convs",
    "rewrite_functional",
    "set_module",
    "trace_regions",
]
