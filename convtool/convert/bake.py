"""The working copy: the caller's model copied once, and convs whose weight is computed made plain.

A weight recomputed at each access (``parametrizations.weight_norm`` / ``spectral_norm``, or
the old hook-based ``nn.utils.weight_norm`` / ``spectral_norm``) has no stable identity to
match in calls; the pair that replaces such a conv holds the computed weight anyway. The
weight is read in eval mode, where spectral norm uses its stored vectors instead of running a
power iteration, so the plain conv computes what the model computes at inference.
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.inputs import eval_mode
from ..core.names import describe_error, module_names, plain_slots, replace_reference, set_module
from ..errors import InvalidOptionError


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy convtool may change, or a one-line error saying why the model cannot be used.

    Raises:
        InvalidOptionError: the model's tensors are on the meta device (never loaded), or the
            model cannot be copied.
    """
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise InvalidOptionError(
            "the model's weights are on the meta device (never loaded); load the trained weights first, "
            "e.g. model.load_state_dict(state, assign=True)"
        )
    return copy_model(model)[0]


def copy_model(model: nn.Module) -> tuple[nn.Module, dict[int, object]]:
    """A deep copy that shares nothing with ``model``, closures included, and the deepcopy memo.

    The memo maps ``id`` of each object of ``model`` to its copy, so a weight of one can be
    found in the other.
    """
    # Old-style weight_norm / spectral_norm keep the computed weight as a plain non-leaf tensor
    # attribute, which deepcopy refuses; the copy gets its current value (recomputed on forward).
    memo = {
        id(value): value.detach().clone()
        for module in model.modules()
        for value in vars(module).values()
        if isinstance(value, torch.Tensor) and not value.is_leaf
    }
    try:
        work = copy.deepcopy(model, memo)
    except Exception as error:
        raise InvalidOptionError(
            f"the model cannot be copied ({describe_error(error)}); convtool works on a copy so the caller's model "
            "stays untouched: make it deep-copyable (copy.deepcopy(model)) and try again"
        ) from error
    _copy_closures(work, memo)
    return work, memo


def _copy_closures(work: nn.Module, memo: dict[int, object]) -> None:
    """Give each function the copy holds, whose closure holds parts of the model, a closure holding their copies.

    ``deepcopy`` keeps functions as they are, so ``self.head = lambda x: conv(x)`` (or such
    lambdas in a list) would still run the caller's ``conv`` from the copy: the copy would not
    be independent (running it in train mode would update the caller's BatchNorm statistics),
    and no rewrite of it could reach that conv.
    """
    for slot, key, value in list(plain_slots(work)):
        if not isinstance(value, types.FunctionType) or not value.__closure__:
            continue
        cells = [_cell_contents(c) for c in value.__closure__]
        if not any(id(c) in memo for c in cells if c is not None):
            continue
        closure = tuple(types.CellType(memo.get(id(c), c)) if c is not None else types.CellType() for c in cells)
        copied = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, closure)
        copied.__kwdefaults__, copied.__qualname__ = value.__kwdefaults__, value.__qualname__
        copied.__dict__.update(value.__dict__)
        replace_reference(slot, key, copied)


def _cell_contents(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _norm_hooks(conv: nn.Conv2d) -> list:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return [h for h in conv._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]


def _computed_weight(conv: nn.Conv2d) -> torch.Tensor | None:
    """The eval-mode weight of a conv whose weight is computed; None for a plain conv."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    if parametrize.is_parametrized(conv, "weight"):
        with eval_mode(conv), torch.no_grad():
            return conv.weight.detach().clone()
    hooks = _norm_hooks(conv)
    if not hooks or len(hooks) != len(conv._forward_pre_hooks):
        return None
    (hook,) = hooks
    with torch.no_grad():
        if isinstance(hook, SpectralNorm):
            return hook.compute_weight(conv, do_power_iteration=False).detach().clone()
        return hook.compute_weight(conv).detach().clone()


def bake(work: nn.Module) -> nn.Module:
    """Replace each conv of ``work`` whose weight is computed by a plain conv holding that weight.

    A new module is put in place rather than calling ``remove_parametrizations``, which edits
    the parametrized class that the caller's model shares with the deep copy.
    """
    names = module_names(work)
    plain_forward = lambda m: type(m).forward is nn.Conv2d.forward and type(m)._conv_forward is nn.Conv2d._conv_forward  # noqa: E731
    for conv in [m for m in work.modules() if isinstance(m, nn.Conv2d) and plain_forward(m)]:
        weight = _computed_weight(conv)
        if weight is None:
            continue
        bias = conv.bias
        plain = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias is not None, conv.padding_mode, device=weight.device, dtype=weight.dtype,
        ).train(conv.training)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if bias is not None:
                plain.bias.copy_(bias)
        trainable = any(p.requires_grad for p in conv.parameters())
        plain.requires_grad_(trainable)
        for name in names[id(conv)]:
            work = set_module(work, name, plain)
    return work
