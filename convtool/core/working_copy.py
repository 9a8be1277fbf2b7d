"""The working copy: the caller's model copied once, closures included, so convtool never changes it."""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from ..errors import InvalidOptionError
from .names import describe_error
from .references import replace, slots, walk


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy convtool may change, or a one-line error saying why the model cannot be used.

    Raises:
        InvalidOptionError: the model is a TorchScript module (no Python code to rewrite), its
            tensors are on the meta device (never loaded), or it cannot be copied.
    """
    if isinstance(model, torch.jit.ScriptModule):  # what the CLI says of a TorchScript archive
        raise InvalidOptionError(
            "the model is a TorchScript module (torch.jit.load / torch.jit.script), whose code convtool cannot rewrite; "
            "give the eager model instead (build it and load its state_dict)"
        )
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
