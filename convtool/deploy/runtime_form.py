"""The form a separated model is shipped in: BatchNorm folded, pairs laid out as runtimes like.

These rewrites change how the model computes, never what: each is checked on example inputs.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..core.inputs import as_inputs, eval_mode, model_device, on_device, run_checked
from ..core.modules import SeparableConv, last_conv, runtime_forms
from ..core.names import join
from ..core.references import swap_module
from ..core.tracing import trace_regions
from ..measure.conv_calls import record
from ..measure.onnxrt import module_latency

log = logging.getLogger(__name__)

LAYOUTS = ("multiplier", "branches", "measured")


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Fold each eval-mode BatchNorm (1-, 2- or 3-d) that only follows a conv (dense or separated) into it.

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
            if user.op == "call_module" and isinstance(region.module.get_submodule(user.target), _BatchNorm):
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
        if last.transposed and last.groups != 1:  # its output channels are not one weight dimension
            continue
        # New parameters, not an in-place update: a weight tied to another layer must keep its value there.
        last.weight, last.bias = fuse_conv_bn_weights(
            last.weight, last.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias, transpose=last.transposed
        )
        model = swap_module(model, bn, nn.Identity())
        folded.append(bn_name)
    return model, folded


def branch_layout(model: nn.Module, example_inputs: Any = None) -> tuple[nn.Module, list[str]]:
    """Each pair in convtool's preferred runtime form (:func:`runtime_forms`), on a copy.

    Ungrouped pairs of rank > 1 become multiplier-1 branches; k x 1 depthwise kernels that
    ``example_inputs`` (when given) feed width 1 run as 1 x k.
    """
    model = copy.deepcopy(model)
    widths = _input_widths(model, example_inputs)
    changed = []
    for name, pair in _pairs(model):
        form = runtime_forms(pair, widths.get(id(pair.depthwise.weight)))[-1]
        if form is not pair:
            model = swap_module(model, pair, form)
            changed.append(name)
    return model, changed


def measured_layout(model: nn.Module, example_inputs: Any, provider: str = "cpu") -> tuple[nn.Module, list[str]]:
    """Per pair, the exact form onnxruntime runs fastest at the pair's input shape, on a copy.

    Each pair is timed alone in each of its :func:`runtime_forms` (cached per shape), so the
    choice is measured, not assumed: channel-multiplier kernels beat the branches at some shapes.
    """
    model = copy.deepcopy(model)
    inputs = on_device(as_inputs(example_inputs), model_device(model))
    calls = record(model, inputs).by_weight()
    changed = []
    for name, pair in _pairs(model):
        first = pair.pointwise if pair.order == "pw-dw" else pair.depthwise
        if id(first.weight) not in calls:
            continue
        shape = calls[id(first.weight)][0].input_shape
        forms = runtime_forms(pair, {c.input_shape[-1] for c in calls.get(id(pair.depthwise.weight), [])})
        if len(forms) == 1:
            continue
        times = [module_latency(copy.deepcopy(f).eval(), shape, provider) for f in forms]
        best = forms[times.index(min(times))]
        if best is not pair:
            model = swap_module(model, pair, best)
            changed.append(name)
    return model, changed


def _pairs(model: nn.Module) -> list[tuple[str, SeparableConv]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SeparableConv)]


def _input_widths(model: nn.Module, example_inputs: Any) -> dict[int, set[int]]:
    """Per conv weight (by id), the widths of the inputs it was called on."""
    if example_inputs is None:
        return {}
    widths: dict[int, set[int]] = {}
    for call in record(model, on_device(as_inputs(example_inputs), model_device(model))).calls:
        widths.setdefault(id(call.weight), set()).add(call.input_shape[-1])
    return widths


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
        steps[-1] = ("branch layout", lambda m: branch_layout(m, inputs))
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
