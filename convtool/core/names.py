"""Qualified names: finding and replacing things in a module tree, and naming errors in one line.

Every layer that reads ``"layer1.0.conv1"``-style names or turns an exception into a message goes
through here, so a name means the same thing in the pass, the proof, the report and the CLI.
"""

from __future__ import annotations

import re
import types
from typing import Any, Iterator

from torch import nn


def join(prefix: str, name: str) -> str:
    """``"a.b"`` from ``"a"`` and ``"b"``; either may be empty."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def get(root: nn.Module, qualname: str) -> Any:
    """The attribute at ``qualname`` under ``root`` (a submodule, parameter, buffer or plain value).

    Raises:
        AttributeError: nothing is there.
    """
    owner, _, attr = qualname.rpartition(".")
    module = root.get_submodule(owner)
    if not attr:
        return module
    return getattr(module, attr)


def get_or_none(root: nn.Module, qualname: str) -> Any:
    try:
        return get(root, qualname)
    except AttributeError:
        return None


def set_module(root: nn.Module, qualname: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``qualname`` under ``root``; returns the root (``module`` itself for ``""``)."""
    if not qualname:
        return module
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent), name, module)
    return root


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module, keyed by ``id`` (a shared module has several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def label(name: str) -> str:
    """How a qualified name is shown: the model itself is ``<model>``."""
    return name or "<model>"


# What nn.Module keeps in its own __dict__ (registries, hooks): never user references.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


class _Attribute:
    """A module attribute as a slot: set with ``object.__setattr__`` so nothing gets registered."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner


class _TupleAttribute:
    """A tuple attribute as a slot: tuples cannot change in place, so the attribute is rebuilt."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        self.owner, self.attr = owner, attr


def plain_slots(model: nn.Module) -> Iterator[tuple[Any, Any, Any]]:
    """Every place a module holds a value outside its registries: ``(slot, key, value)``.

    The module's own attributes (not children, parameters or buffers: those are registered),
    and the items of its plain list, tuple and dict attributes. :func:`replace_reference`
    changes what a slot holds.
    """
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if attr in _MODULE_INTERNALS:
                continue
            yield _Attribute(module), attr, value
            if isinstance(value, (list, dict)):
                yield from ((value, key, item) for key, item in list(value.items() if isinstance(value, dict) else enumerate(value)))
            elif isinstance(value, tuple):
                yield from ((_TupleAttribute(module, attr), i, item) for i, item in enumerate(value))


def plain_references(model: nn.Module) -> Iterator[tuple[Any, Any, Any]]:
    """Every module or tensor a model reaches outside its registered children and parameters.

    That is, in a plain attribute, a list, tuple or dict attribute, or in the closure of a
    function held there (``self.head = lambda x: conv(x)``). Yields ``(slot, key, value)``;
    closure cells as ``(cell, None, value)``. Such references are invisible to
    ``named_modules``: a conv reached through ``self.stages = [self.a, self.b]`` runs from the
    list, whatever is put at ``self.a``.
    """
    for slot, key, value in plain_slots(model):
        if isinstance(value, types.FunctionType):
            for cell in value.__closure__ or ():
                if _is_reference(_contents(cell)):
                    yield cell, None, cell.cell_contents
        elif _is_reference(value):  # as an attribute: stored with object.__setattr__, unregistered
            yield slot, key, value


def replace_reference(slot: Any, key: Any, new: Any) -> None:
    """Point an entry :func:`plain_slots` or :func:`plain_references` yielded at ``new``."""
    if isinstance(slot, types.CellType):
        slot.cell_contents = new
    elif isinstance(slot, _Attribute):
        object.__setattr__(slot.owner, key, new)
    elif isinstance(slot, _TupleAttribute):
        items = list(getattr(slot.owner, slot.attr))
        items[key] = new
        object.__setattr__(slot.owner, slot.attr, tuple(items))
    else:
        slot[key] = new


def swap_module(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever ``old`` is: at each of its qualified names and in plain references.

    Returns the root (``new`` itself when ``old`` was the root).
    """
    for name in module_names(root).get(id(old), []):
        root = set_module(root, name, new)
    for slot, key, value in list(plain_references(root)):
        if value is old:
            replace_reference(slot, key, new)
    return root


def _contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _is_reference(value: Any) -> bool:
    return isinstance(value, nn.Module) or _is_tensor(value)


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def describe_error(error: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line"`` of an error's root cause, without colour codes, at most ``limit`` chars.

    Libraries wrap the real reason in generic advice (torch.export) or dump whole graphs (fx);
    the root cause's first line is what a user can act on.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
