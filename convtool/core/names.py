"""Qualified names: finding and replacing things in a module tree, and naming errors in one line.

Every layer that reads ``"layer1.0.conv1"``-style names or turns an exception into a message goes
through here, so a name means the same thing in the pass, the proof, the report and the CLI.
"""

from __future__ import annotations

import re
from typing import Any

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
