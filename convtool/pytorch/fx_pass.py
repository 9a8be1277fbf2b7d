"""Find convolutions in a model's fx graphs, and replace functional ones by their pairs.

Graphs are used for what only they can tell:

* how each conv module is used: called (safe to replace) or its parameters read directly by
  other code (not safe);
* which ``F.conv2d`` / ``torch.conv2d`` calls take a parameter of the model as weight, so that
  convs written functionally are found too.

Conv modules are replaced in place, at their own qualified names, in the user's own module
tree (``convert.separate`` does that): the model keeps its classes, methods, training-only
branches and state_dict layout. Only a module whose forward calls a functional conv is turned
into a ``GraphModule`` here, because only there the code itself must change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from ..core.modules import CONV_TYPES, SeparableConv
from ..core.names import get_or_none, join, label
from ..core.tracing import Tracer, Tracing
from ..measure.conv_calls import ALL_CONV_FUNCTIONS, CONV_FUNCTIONS, TRANSPOSED_FUNCTIONS, conv_arguments


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
        return join(self.region, self.weight)

    @property
    def bias_name(self) -> str | None:
        """Qualified name of the bias tensor (a parameter or a buffer), if any."""
        return join(self.region, self.bias) if self.bias else None

    @property
    def setting(self) -> tuple:
        """What makes two calls on one weight compute the same function."""
        return (self.bias_name, *_setting(self.stride, self.padding, self.dilation, self.groups))


@dataclass
class ConvUses:
    """What the traced graphs say about convs: direct reads of conv weights, functional convs."""

    read_directly: set[str] = field(default_factory=set)  # conv modules whose tensors are read
    functional: list[FunctionalConv] = field(default_factory=list)
    unusable: list[tuple[str, str]] = field(default_factory=list)  # functional convs left alone


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def find_conv_uses(tracing: Tracing) -> ConvUses:
    """Read every traced graph for conv modules and functional convs."""
    uses = ConvUses()
    for region in tracing.regions:
        other_reads = _read_outside_convs(region.graph)
        for node in region.graph.nodes:
            if node.op == "get_attr":
                owner_path = node.target.rpartition(".")[0]
                if isinstance(get_or_none(region.module, owner_path), CONV_TYPES):
                    uses.read_directly.add(join(region.name, owner_path))
            elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
                _classify_functional(node, region.name, region.module, uses, other_reads)
            elif node.op == "call_function" and node.target in TRANSPOSED_FUNCTIONS:
                weight = conv_arguments(node.args, node.kwargs, node.target)["weight"]
                where = join(region.name, weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" else label(join(region.name, _owner(node)))
                uses.unusable.append((where, "functional transposed conv call: convtool separates transposed convs written as modules only"))
    return uses


def _read_outside_convs(graph: fx.Graph) -> set[str]:
    """Attributes the graph reads for something other than the weight of a conv2d call."""
    found = set()
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        for user in node.users:
            is_conv = user.op == "call_function" and user.target in ALL_CONV_FUNCTIONS
            if not (is_conv and conv_arguments(user.args, user.kwargs, user.target)["weight"] is node):
                found.add(node.target)
    return found


def _classify_functional(node: fx.Node, region: str, root: nn.Module, uses: ConvUses, other_reads: set[str]) -> None:
    args = conv_arguments(node.args, node.kwargs)
    weight, bias = args["weight"], args["bias"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        uses.unusable.append((label(join(region, _owner(node))), "conv call whose weight is computed at run time"))
        return
    name = join(region, weight.target)
    owner_path = weight.target.rpartition(".")[0]
    if isinstance(get_or_none(root, owner_path), CONV_TYPES):
        uses.unusable.append((name, f"conv call on the weight of conv module {owner_path!r}"))
        uses.read_directly.add(join(region, owner_path))
        return
    if weight.target in other_reads:
        uses.unusable.append((name, "the model also reads this weight outside conv calls, so it must stay as it is"))
        return
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        uses.unusable.append((name, "conv call whose bias is computed at run time"))
        return
    options = [args[k] for k in ("stride", "padding", "dilation", "groups")]
    if _has_node(options):
        uses.unusable.append((name, "conv call whose options are computed at run time"))
        return
    uses.functional.append(
        FunctionalConv(
            region=region, owner=_owner(node), weight=weight.target, bias=bias.target if bias is not None else None,
            stride=args["stride"], padding=args["padding"], dilation=args["dilation"], groups=args["groups"],
        )
    )


def _has_node(value: Any) -> bool:
    found = []
    fx.node.map_arg(value, lambda n: found.append(n))
    return bool(found)


def _setting(stride: Any, padding: Any, dilation: Any, groups: int) -> tuple:
    def pair(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(v)
        return (v, v) if isinstance(v, int) else v

    return (pair(stride), pair(padding), pair(dilation), groups)


# The pair to call for a FunctionalConv; the pass names and places it.
PairFor = Callable[[FunctionalConv], SeparableConv]
# Puts a GraphModule at a qualified name, given the calls it replaced (the caller logs the edit).
Place = Callable[[str, nn.Module, list[FunctionalConv]], None]


def rewrite_functional(
    model: nn.Module, tracing: Tracing, convs: list[FunctionalConv], pair_for: PairFor, place: Place
) -> tuple[dict[int, str], list[tuple[FunctionalConv, str]]]:
    """Replace functional convs by ``call_module`` nodes of the pairs ``pair_for`` returns.

    The module whose forward makes the calls is traced again (after module convs were swapped,
    so its graph calls the new pairs) and its ``GraphModule`` handed to ``place``; where it
    cannot be traced on its own, its region is used instead. A GraphModule holds fresh
    containers for the paths it uses, so removing a replaced weight from it never touches the
    module it replaces. A module whose traced code depends on its train/eval mode (dropout
    with ``training=self.training``, a training-only branch) is not rewritten: a GraphModule
    would freeze the mode it was traced in. Returns the qualified name of each pair (by
    ``id``) and the calls left as they were, with why.
    """
    by_owner: dict[tuple[str, str], list[FunctionalConv]] = {}
    for conv in convs:
        by_owner.setdefault((conv.region, conv.owner), []).append(conv)
    pair_names: dict[int, str] = {}
    missed: list[tuple[FunctionalConv, str]] = []
    for (region, owner), calls in by_owner.items():
        qualname, prefix = join(region, owner), owner
        try:
            graph = Tracer(tracing.opaque).trace(model.get_submodule(qualname))
        except Exception:  # traceable inside its region but not alone (e.g. list inputs)
            qualname, prefix = region, ""
            graph = Tracer(tracing.opaque).trace(model.get_submodule(qualname))
        module = model.get_submodule(qualname)
        if _depends_on_mode(module, tracing):
            reason = f"{type(module).__name__}'s code depends on train/eval mode, which rewriting its conv calls would freeze"
            missed += [(c, reason) for c in calls]
            continue
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        gm.train(module.training)
        names = _replace_calls(gm, calls, prefix, pair_for)
        replaced = [c for c in calls if c in names]
        missed += [(c, "conv call could not be found again where it is made") for c in calls if c not in names]
        if replaced:
            for call, local in names.items():
                pair_names[id(pair_for(call))] = join(qualname, local)
            place(qualname, gm, replaced)
            if not qualname:
                model = gm
    return pair_names, missed


def _depends_on_mode(module: nn.Module, tracing: Tracing) -> bool:
    """Whether the module's traced code differs between train and eval mode (its own and its traced children's)."""
    modes = {m: m.training for m in module.modules()}
    try:
        codes = []
        for mode in (True, False):
            module.train(mode)
            codes.append(fx.GraphModule(module, Tracer(tracing.opaque).trace(module)).code)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return codes[0] != codes[1]


def _replace_calls(gm: fx.GraphModule, calls: list[FunctionalConv], prefix: str, pair_for: PairFor) -> dict[FunctionalConv, str]:
    """Swap the conv2d nodes of ``gm`` (traced at ``prefix`` in the region) that match ``calls``.

    Returns, per call replaced, the name of its pair inside ``gm``.
    """

    def local(target: str | None) -> str | None:
        if target is None or not prefix:
            return target
        return target[len(prefix) + 1 :] if target.startswith(prefix + ".") else None

    def key_of(c: FunctionalConv) -> tuple:
        return (local(c.weight), local(c.bias), _setting(c.stride, c.padding, c.dilation, c.groups))

    wanted = {key_of(c): c for c in calls}
    matches: list[tuple[fx.Node, tuple]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
            continue
        args = conv_arguments(node.args, node.kwargs)
        weight, bias = args["weight"], args["bias"]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        key = (
            weight.target,
            bias.target if isinstance(bias, fx.Node) else None,
            _setting(args["stride"], args["padding"], args["dilation"], args["groups"]),
        )
        if key in wanted:
            matches.append((node, key))

    # A tensor read only by the replaced calls disappears, and a pair takes its name: the
    # name the user knows the conv by. A tensor still read elsewhere stays beside its pair.
    replaced = {node for node, _ in matches}
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr" and any(u not in replaced for u in n.users)}
    pairs = {key: pair_for(wanted[key]) for key in dict.fromkeys(key for _, key in matches)}
    doomed = {t for key in pairs for t in key[:2] if t and t not in still_read}
    names: dict[tuple, str] = {}
    for key in pairs:
        weight, i = key[0], 1
        name = weight
        while name in names.values() or (name not in doomed and get_or_none(gm, name) is not None):
            i += 1
            name = f"{weight}_separated" + (str(i) if i > 2 else "")
        names[key] = name
    for tensor in doomed:
        owner_path, _, attr = tensor.rpartition(".")
        delattr(gm.get_submodule(owner_path), attr)
    for key, pair in pairs.items():
        gm.add_submodule(names[key], pair)
    for node, key in matches:
        # Read the input now: an earlier replacement in a chain of convs has rewired it.
        source = conv_arguments(node.args, node.kwargs)["input"]
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(names[key], (source,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return {c: names[key_of(c)] for c in calls if key_of(c) in names}


def tensor_at(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer at qualified ``name`` (a functional conv's bias may be either)."""
    value = get_or_none(model, name)
    return value if isinstance(value, torch.Tensor) else None


__all__ = ["ConvUses", "FunctionalConv", "find_conv_uses", "rewrite_functional", "tensor_at"]
