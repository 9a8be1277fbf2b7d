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
from ..core.modules import CONV_TYPES, plain_conv, runs_as_standard
from ..core.names import describe_error
from ..core.references import replace, slots, swap_module, walk
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
    _copy_functions(work, memo)
    return work, memo


def _copy_functions(work: nn.Module, memo: dict[int, object]) -> None:
    """Give the copy its own copies of the functions that reach the model.

    ``deepcopy`` shares functions, so ``self.heads = [lambda x, b=b: b(x) for b in self.blocks]``
    (or a closure, a partial, a function in a plain object) would still run the caller's
    modules from the copy: the copy would not be independent (running it in train mode would
    update the caller's BatchNorm statistics, training it would set the caller's gradients),
    and no rewrite of the copy could reach those convs.
    """
    for slot, key, value in list(slots(work, into_functions=False)):
        copied = _copy_function(value, memo)
        if copied is not value:
            replace(slot, key, copied)


def _copy_function(value: object, memo: dict[int, object]) -> object:
    """A copy of a function whose closure, defaults or keyword defaults reach the model; anything else as it is."""
    if not isinstance(value, types.FunctionType):
        return value
    if id(value) in memo:
        return memo[id(value)]
    if not any(id(item) in memo for _, _, item in walk(None, None, value)):
        return value
    cells = tuple(types.CellType() for _ in value.__closure__ or ())
    copied = types.FunctionType(value.__code__, value.__globals__, value.__name__, None, cells or None)
    copied.__qualname__, copied.__module__ = value.__qualname__, value.__module__
    copied.__dict__.update(value.__dict__)
    memo[id(value)] = copied  # before the contents: a closure may hold the function itself
    for old, new in zip(value.__closure__ or (), cells):
        try:
            new.cell_contents = _copy_value(old.cell_contents, memo)
        except ValueError:  # an empty cell stays empty
            pass
    copied.__defaults__ = _copy_value(value.__defaults__, memo)
    copied.__kwdefaults__ = _copy_value(value.__kwdefaults__, memo)
    return copied


def _copy_value(value: object, memo: dict[int, object]) -> object:
    """A deep copy of what a function holds: the model's objects become their copies, functions in it copies too."""
    try:
        copied = copy.deepcopy(value, memo)
    except Exception:  # cannot be copied: left shared; the proof names a conv reached only this way
        return value
    holder = [copied]
    for slot, key, item in list(walk(holder, 0, copied, into_functions=False)):
        new = _copy_function(item, memo)
        if new is not item:
            replace(slot, key, new)
    return holder[0]


def _norm_hooks(conv: nn.Module) -> list:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return [h for h in conv._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]


def _computed_weight(conv: nn.Module) -> torch.Tensor | None:
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


def bake(work: nn.Module) -> tuple[nn.Module, list[tuple[nn.Module, nn.Module]]]:
    """Replace each conv of ``work`` whose weight is computed by a plain conv holding that weight.

    A new module is put in place rather than calling ``remove_parametrizations``, which edits
    the parametrized class that the caller's model shares with the deep copy. Returns the
    model and each (plain, original) pair, so :func:`unbake` can restore the convs that end
    up dense.
    """
    baked = []
    for conv in [m for m in work.modules() if isinstance(m, CONV_TYPES) and runs_as_standard(m)]:
        weight = _computed_weight(conv)
        if weight is None:
            continue
        plain = plain_conv(conv, weight)
        work = swap_module(work, conv, plain)
        baked.append((plain, conv))
    return work, baked


def unbake(work: nn.Module, baked: list[tuple[nn.Module, nn.Module]]) -> nn.Module:
    """Put back the original (parametrized) conv wherever its plain stand-in was left dense."""
    for plain, original in baked:
        work = swap_module(work, plain, original)
    return work
