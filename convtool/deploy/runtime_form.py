"""The form a separated model is shipped in: BatchNorm folded, pairs laid out as runtimes like.

These rewrites change how the model computes, never what: each is checked on example inputs.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..core.inputs import as_inputs, eval_mode, model_device, on_device, run_checked
from ..core.modules import BranchedSeparableConv2d, SeparableConv2d, last_conv
from ..core.names import join
from ..core.references import swap_module
from ..core.tracing import trace_regions
from ..measure.onnxrt import module_latency

log = logging.getLogger(__name__)

LAYOUTS = ("multiplier", "branches", "measured")


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Fold each eval-mode BatchNorm2d that only follows a conv (dense or separated) into it.

    The BatchNorm becomes ``nn.Identity`` and its scale and shift move into the weights and
    bias of the conv that runs last (the pointwise of a ``"dw-pw"`` pair). Only patterns the
    traced graphs prove are folded: the conv's output feeds the BatchNorm alone, and each is
    called once. Works on a copy, in eval mode; returns it with the names of the folded
    BatchNorms.
    """
    model = copy.deepcopy(model).eval()  # folding is an inference rewrite: BatchNorm in eval
    tracing = trace_regions(model)
    calls: dict[str, int] = {}
    edges: list[tuple[str, str]] = []
    for region in tracing.regions:
        for node in region.graph.nodes:
            if node.op != "call_module":
                continue
            name = join(region.name, node.target)
            calls[name] = calls.get(name, 0) + 1
            if last_conv(region.module.get_submodule(node.target)) is None or len(node.users) != 1:
                continue
            (user,) = node.users
            if user.op == "call_module" and isinstance(region.module.get_submodule(user.target), nn.BatchNorm2d):
                if len(user.args) == 1 and not user.kwargs:
                    edges.append((name, join(region.name, user.target)))
    folded = []
    for conv_name, bn_name in edges:
        if calls.get(conv_name) != 1 or calls.get(bn_name) != 1:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.training or conv.training or not bn.track_running_stats:
            continue
        last = last_conv(conv)
        # New parameters, not an in-place update: a weight tied to another layer must keep its value there.
        last.weight, last.bias = fuse_conv_bn_weights(
            last.weight, last.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        model = swap_module(model, bn, nn.Identity())
        folded.append(bn_name)
    return model, folded


def branch_layout(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Rewrite every ``"dw-pw"`` pair of rank > 1 (ungrouped) as multiplier-1 branches, on a copy."""
    model = copy.deepcopy(model)
    changed = []
    for name, module in list(model.named_modules()):
        if _branchable(module):
            model = swap_module(model, module, BranchedSeparableConv2d(module))
            changed.append(name)
    return model, changed


def _branchable(module: nn.Module) -> bool:
    return isinstance(module, SeparableConv2d) and module.order == "dw-pw" and module.rank > 1 and module.groups == 1


def measured_layout(model: nn.Module, example_inputs: Any, provider: str = "cpu") -> tuple[nn.Module, list[str]]:
    """Per rank > 1 pair, the layout onnxruntime runs faster at the pair's input shape, on a copy.

    Each pair is timed alone in both layouts (cached per shape), so the choice is measured,
    not assumed: channel-multiplier kernels beat the branches at some shapes.
    """
    eligible = {name: m for name, m in model.named_modules() if _branchable(m)}
    shapes: dict[str, tuple[int, ...]] = {}
    def record(name: str):
        def hook(_module, args) -> None:  # a pre-hook's return value would replace the inputs
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in eligible.items()]
    inputs = on_device(as_inputs(example_inputs), model_device(model))
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    model = copy.deepcopy(model)
    changed = []
    for name, shape in shapes.items():
        pair = model.get_submodule(name)
        branched = BranchedSeparableConv2d(pair)
        timed = [copy.deepcopy(m).eval() for m in (branched, pair)]
        if module_latency(timed[0], shape, provider) < module_latency(timed[1], shape, provider):
            model = swap_module(model, pair, branched)
            changed.append(name)
    return model, changed


def for_runtime(
    model: nn.Module, example_inputs: Any, *, fold_bn: bool = True, layout: str = "branches", provider: str = "cpu"
) -> tuple[nn.Module, tuple[str, ...], tuple[str, ...]]:
    """The model as convtool ships it: BatchNorm folded and pairs in ``layout``, checked equal.

    Each rewrite is kept only if the outputs on ``example_inputs`` stay within float tolerance
    of the model's (eval mode); otherwise it is dropped and logged. Returns the model (the
    caller's when nothing changed), the folded BatchNorms and the branched pairs.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    inputs = on_device(as_inputs(example_inputs), model_device(model))
    reference = run_checked(model, inputs)
    result, done = model, {}
    steps = []
    if fold_bn:
        steps.append(("fold BatchNorm", fold_batchnorm))
    if layout == "branches":
        steps.append(("branch layout", branch_layout))
    elif layout == "measured":
        steps.append(("branch layout", lambda m: measured_layout(m, inputs, provider)))
    for label, rewrite in steps:
        candidate, names = rewrite(result)
        if not names:
            continue
        with eval_mode(candidate), torch.no_grad():
            output = candidate(*inputs)
        if _close(output, reference):
            result, done[label] = candidate, tuple(names)
        else:
            log.warning("%s changed the outputs; shipping without it", label)
    return result, done.get("fold BatchNorm", ()), done.get("branch layout", ())


def _close(actual: Any, expected: Any) -> bool:
    a, spec_a = torch.utils._pytree.tree_flatten(actual)
    e, spec_e = torch.utils._pytree.tree_flatten(expected)
    if spec_a != spec_e:
        return False
    for x, y in zip(a, e):
        if not isinstance(y, torch.Tensor):
            continue
        scale = float(y.abs().max()) if y.numel() else 0.0
        if not torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-4 * max(scale, 1.0)):
            return False
    return True
