"""Where a model holds things outside its registries, and how to point them elsewhere.

A conv reached through ``self.stages = [self.a, self.b]``, ``self.heads = [lambda x, b=b: b(x)
for b in self.blocks]``, a ``functools.partial``, or a plain object's attribute runs from
there, whatever is put at ``self.a``. ``named_modules`` sees none of these. This module walks
them: plain attributes of every module, nested lists, tuples and dicts, plain objects'
attributes, and the closure cells, defaults and keyword defaults of functions and partials.

Every place is a *slot* with a *key*; :func:`replace` points it at a new value, rebuilding
what cannot change in place (tuples, a function's defaults, a partial's arguments).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Iterator

import torch
from torch import nn

from .names import module_names, set_module

# What nn.Module keeps in its own __dict__ (registries, hooks): never user references.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
# How deep to follow containers and objects: far enough for config dicts of lists of lambdas.
MAX_DEPTH = 6


class Attribute:
    """An attribute of an object; set with ``object.__setattr__``, so a module registers nothing new."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner


class TupleItem:
    """An item of a tuple held in another slot: replacing it rebuilds the tuple there."""

    def __init__(self, slot: Any, key: Any) -> None:
        self.slot, self.key = slot, key


class Defaults:
    """A function's positional defaults (a tuple the function lets us replace)."""

    def __init__(self, function: types.FunctionType) -> None:
        self.function = function


class PartialPart:
    """A ``functools.partial``'s function (key ``None``) or one of its positional arguments."""

    def __init__(self, partial: functools.partial) -> None:
        self.partial = partial


def read(slot: Any, key: Any) -> Any:
    """What ``slot`` holds at ``key``."""
    if isinstance(slot, types.CellType):
        return slot.cell_contents
    if isinstance(slot, Attribute):
        return vars(slot.owner)[key]
    if isinstance(slot, TupleItem):
        return read(slot.slot, slot.key)[key]
    if isinstance(slot, Defaults):
        return slot.function.__defaults__[key]
    if isinstance(slot, PartialPart):
        return slot.partial.func if key is None else slot.partial.args[key]
    return slot[key]


def replace(slot: Any, key: Any, new: Any) -> None:
    """Point ``slot`` at ``key`` to ``new``."""
    if isinstance(slot, types.CellType):
        slot.cell_contents = new
    elif isinstance(slot, Attribute):
        object.__setattr__(slot.owner, key, new)
    elif isinstance(slot, TupleItem):
        old = read(slot.slot, slot.key)
        items = list(old)
        items[key] = new
        replace(slot.slot, slot.key, type(old)._make(items) if hasattr(type(old), "_make") else tuple(items))
    elif isinstance(slot, Defaults):
        defaults = list(slot.function.__defaults__)
        defaults[key] = new
        slot.function.__defaults__ = tuple(defaults)
    elif isinstance(slot, PartialPart):
        p = slot.partial
        func, args = (new, p.args) if key is None else (p.func, p.args[:key] + (new,) + p.args[key + 1 :])
        p.__setstate__((func, args, p.keywords, vars(p) or None))
    else:
        slot[key] = new


def _is_plain_object(value: Any) -> bool:
    """An instance of a user class, whose attributes may hold modules (not a module, tensor, class or package)."""
    return (
        hasattr(value, "__dict__")
        and not isinstance(value, (nn.Module, torch.Tensor, type, types.ModuleType, types.FunctionType, types.MethodType))
        and type(value).__module__ != "builtins"
    )


def walk(slot: Any, key: Any, value: Any, *, into_functions: bool = True, seen: set[int] | None = None, depth: int = 0) -> Iterator[tuple[Any, Any, Any]]:
    """``(slot, key, value)`` and every place reachable inside ``value``, depth first.

    Modules and tensors are leaves (their insides are registered, not plain). With
    ``into_functions=False`` a function's closure and defaults are not entered.
    """
    yield slot, key, value
    seen = set() if seen is None else seen
    if depth >= MAX_DEPTH or id(value) in seen or isinstance(value, (nn.Module, torch.Tensor, str, bytes)):
        return
    seen.add(id(value))
    inner = dict(into_functions=into_functions, seen=seen, depth=depth + 1)
    if isinstance(value, list):
        for i, item in enumerate(list(value)):
            yield from walk(value, i, item, **inner)
    elif isinstance(value, dict):
        for k, item in list(value.items()):
            yield from walk(value, k, item, **inner)
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            yield from walk(TupleItem(slot, key), i, item, **inner)
    elif isinstance(value, types.FunctionType):
        if not into_functions:
            return
        for cell in value.__closure__ or ():
            if _has_contents(cell):
                yield from walk(cell, None, cell.cell_contents, **inner)
        for i, item in enumerate(value.__defaults__ or ()):
            yield from walk(Defaults(value), i, item, **inner)
        for k, item in list((value.__kwdefaults__ or {}).items()):
            yield from walk(value.__kwdefaults__, k, item, **inner)
    elif isinstance(value, functools.partial):
        yield from walk(PartialPart(value), None, value.func, **inner)
        for i, item in enumerate(value.args):
            yield from walk(PartialPart(value), i, item, **inner)
        for k, item in list(value.keywords.items()):
            yield from walk(value.keywords, k, item, **inner)
    elif _is_plain_object(value):
        for k, item in list(vars(value).items()):
            yield from walk(Attribute(value), k, item, **inner)


def slots(model: nn.Module, *, into_functions: bool = True) -> Iterator[tuple[Any, Any, Any]]:
    """Every place the model's modules hold a value outside their registries."""
    seen: set[int] = set()
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if attr not in _MODULE_INTERNALS:
                yield from walk(Attribute(module), attr, value, into_functions=into_functions, seen=seen)


def references(model: nn.Module) -> Iterator[tuple[Any, Any, Any]]:
    """Every module or tensor the model reaches outside its registered children, parameters and buffers."""
    for slot, key, value in slots(model):
        if isinstance(value, (nn.Module, torch.Tensor)):
            yield slot, key, value


def _has_contents(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def swap_module(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever ``old`` is: at each of its qualified names and in every plain reference.

    Returns the root (``new`` itself when ``old`` was the root).
    """
    for name in module_names(root).get(id(old), []):
        root = set_module(root, name, new)
    for slot, key, value in list(references(root)):
        if value is old:
            replace(slot, key, new)
    return root
