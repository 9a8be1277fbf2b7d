"""What can be separated in an ``nn.Module``: each dense conv weight (a :class:`~convtool.plan.site.Site`) with its uses.

Conv modules, and ``F.conv*`` calls found by tracing (``fx_pass``); the rest is skipped with why.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..core.modules import CONV_TYPES, SamePadded, SeparableConv, runs_as_standard, standard_base
from ..core.names import label, module_names
from ..core.records import SkippedLayer
from ..core.tracing import CONV_MODULES, Tracing, trace_regions
from ..plan.site import Site, Use, pattern_reason, shape_reason
from .fx_pass import ConvUses, FunctionalConv, find_conv_uses, tensor_at


def _module_reason(conv: nn.Module, read_directly: bool) -> str | None:
    if not runs_as_standard(conv):
        base = standard_base(conv).__name__
        return f"{type(conv).__name__} overrides {base}'s forward, so the separated pair may not compute the same thing"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "a lazy conv that never ran, so its weight does not exist yet; pass example inputs"
    if conv._forward_hooks or conv._forward_pre_hooks or getattr(conv, "_forward_hooks_with_kwargs", None):
        return "has forward hooks, which the separated pair would not run"
    if not isinstance(conv.weight, nn.Parameter) or not conv.weight.is_floating_point():
        return "its weight is not a float parameter"
    if read_directly:
        return "the model reads this conv's weight directly, so replacing the module would break it"
    return None


def _module_options(conv: nn.Module) -> dict[str, Any]:
    options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)
    if conv.transposed:
        options["output_padding"] = conv.output_padding
    return options


def find_sites(
    work: nn.Module, include: Sequence[str], exclude: Sequence[str]
) -> tuple[list[Site], list[SkippedLayer], Tracing | None]:
    """Every weight that may be separated, the convs and parts left alone with why, and the tracing."""
    skipped: list[SkippedLayer] = []
    tracing, uses = None, ConvUses()
    if not isinstance(work, CONV_TYPES):
        tracing = trace_regions(work)
        uses = find_conv_uses(tracing)
        skipped += [SkippedLayer(name, reason) for name, reason in uses.unusable]
    modules = _module_sites(work, uses.read_directly, include, exclude, skipped)
    functions = _functional_sites(work, uses.functional, include, exclude, skipped)
    if tracing is not None:
        skipped += _untraced_parts(work, tracing, {id(s.weight) for s in modules + functions})
    # A weight tied between a conv module and a functional call: two rewrites of one tensor.
    tied = {id(s.weight) for s in modules} & {id(s.weight) for s in functions}
    for site in (s for s in modules + functions if id(s.weight) in tied):
        others = [o.name for o in modules + functions if id(o.weight) == id(site.weight) and o is not site]
        skipped.append(SkippedLayer(site.name, f"its weight is tied to {', '.join(others)}, used by conv calls as well as a conv module; left dense"))
    sites = [s for s in modules + functions if id(s.weight) not in tied]
    return sites, list(dict.fromkeys(skipped)), tracing


def _untraced_parts(work: nn.Module, tracing: Tracing, found: set[int]) -> list[SkippedLayer]:
    """The parts fx could not trace that leave a conv dense: those holding a conv-shaped weight (3- to
    5-d, float, not a conv module's, which are found without tracing) that no traced code called as one.

    Such a weight is named under the deepest untraced part holding it, whose code is the one left
    unread. A part whose convs were all found says nothing: tracing it was not needed.
    """
    convs = {id(p) for m in work.modules() if isinstance(m, CONV_MODULES) for p in m.parameters()}
    parts = sorted((name for name in tracing.untraced if name != label("")), key=len, reverse=True)
    unseen: dict[str, list[str]] = {}
    for name, weight in work.named_parameters():
        if weight.dim() not in (3, 4, 5) or not weight.is_floating_point() or id(weight) in convs | found:
            continue
        part = next((p for p in parts if name.startswith(p + ".")), label("") if label("") in tracing.untraced else None)
        if part is not None:
            unseen.setdefault(part, []).append(name)
    return [SkippedLayer(part, f"{tracing.untraced[part]}, so the convs its code may run on {', '.join(names)} are not seen: "
                               f"left dense") for part, names in unseen.items()]


def _module_sites(work, read_directly, include, exclude, skipped) -> list[Site]:
    names = module_names(work)
    # The halves of pairs already separated are depthwise and pointwise by construction.
    halves = {id(m) for pair in work.modules() if isinstance(pair, SeparableConv) for m in pair.children()}
    tied: dict[int, list[nn.Module]] = {}
    for module in work.modules():
        if isinstance(module, CONV_TYPES) and id(module) not in halves:
            tied.setdefault(id(module.weight), []).append(module)
    sites = []
    # A conv subclass's stand-in behind its padding step answers to the subclass's name too.
    padded = {id(m.conv): names[id(m)] for m in work.modules() if isinstance(m, SamePadded)}
    for convs in tied.values():
        all_names = [n for conv in convs for n in names[id(conv)]]
        reason = pattern_reason(all_names + [n for conv in convs for n in padded.get(id(conv), [])], include, exclude)
        for conv in convs:
            reason = reason or _module_reason(conv, any(n in read_directly for n in names[id(conv)]))
        first = convs[0]
        reason = reason or shape_reason(first.weight.shape, first.groups, first.transposed)
        if not reason and len({(c.groups, standard_base(c)) for c in convs}) > 1:
            reason = "its weight is tied across convs of different kinds or groups"
        if reason:
            skipped.append(SkippedLayer(label(all_names[0]), reason))
            continue
        site_uses = [Use(conv.bias, _module_options(conv), tuple(names[id(conv)]), conv) for conv in convs]
        sites.append(Site(label(all_names[0]), first.weight, first.groups, "module", site_uses, first.transposed))
    return sites


def _functional_sites(work, calls: list[FunctionalConv], include, exclude, skipped) -> list[Site]:
    by_weight: dict[str, dict[tuple, list[FunctionalConv]]] = {}
    for call in calls:
        by_weight.setdefault(call.name, {}).setdefault(call.setting, []).append(call)
    sites = []
    for name, settings in by_weight.items():
        weight = tensor_at(work, name)
        groups = {s[-1] for s in settings}
        if not isinstance(weight, nn.Parameter) or weight.dim() not in (3, 4, 5) or not weight.is_floating_point():
            reason = "weight is not a float parameter of a 1-, 2- or 3-d conv"
        else:
            reason = pattern_reason([name], include, exclude) or shape_reason(weight.shape, min(groups))
            if not reason and len(groups) > 1:
                reason = "its weight is called with different groups"
        if reason:
            skipped.append(SkippedLayer(name, reason))
            continue
        site_uses = []
        for same in settings.values():
            c = same[0]
            options = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, padding_mode="zeros")
            site_uses.append(Use(tensor_at(work, c.bias_name) if c.bias_name else None, options, calls=tuple(same)))
        sites.append(Site(name, weight, groups.pop(), "function", site_uses))
    return sites
