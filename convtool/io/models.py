"""Reading models safely: a state_dict with the code that builds the model, or a pickle the user trusts.

Unpickling runs code from the file, so a file is first read with ``weights_only=True``; a
pickled module is loaded only with the caller's explicit ``allow_pickle=True``. Nothing here
ever unpickles a file to find out what it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InvalidOptionError, ModelLoadError, UnsafeModelError

# Keys under which training scripts commonly nest the weights in a checkpoint dict.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema", "model_ema")


@dataclass(frozen=True)
class LoadedModel:
    """A model read from a file, and what the file was."""

    model: nn.Module
    format: str  # "state_dict", "safetensors", "pickled module"
    path: Path


def resolve_arch(spec: str, option: str = "--arch") -> Callable[..., Any]:
    """The callable named by ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE`` (``option`` names it in errors).

    The current directory is importable, as users expect of a command they run in their
    project.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidOptionError(f"{option} {spec!r} should look like MODULE:CALLABLE or path/to/file.py:CALLABLE")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise InvalidOptionError(f"{option} file {file} does not exist")
            # Classes pickle by their module's name; never shadow a module already imported.
            name = file.stem if file.stem not in sys.modules else f"convtool_arch_{file.stem}"
            spec_ = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[name] = module
            spec_.loader.exec_module(module)
        else:
            _importable_here()
            module = importlib.import_module(module_name)
    except InvalidOptionError:
        raise
    except Exception as error:
        raise InvalidOptionError(f"{option} {spec!r}: cannot import {module_name} ({type(error).__name__}: {error})") from error
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InvalidOptionError(f"{option} {spec!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InvalidOptionError(f"{option} {spec!r} is not callable")
    return target


def _build(arch: str) -> nn.Module:
    try:
        model = resolve_arch(arch)()
    except InvalidOptionError:
        raise
    except Exception as error:
        raise InvalidOptionError(f"--arch {arch!r} failed to build the model ({type(error).__name__}: {error})") from error
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"--arch {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _is_safetensors(path: Path, head: bytes) -> bool:
    if path.suffix == ".safetensors":
        return True
    return len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _zip_kind(path: Path) -> str | None:
    """'torchscript', 'export' (a torch.export .pt2), 'torch' (torch.save) or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return None
    if any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("archive_format") or "/models/" in n for n in names):
        return "export"
    return "torch"


def _weights(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict inside a loaded object: a flat dict of tensors, or a checkpoint holding one."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _CHECKPOINT_KEYS:
            inner = _weights(obj.get(key))
            if inner is not None:
                return inner
    return None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> nn.Module:
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even when strict=False
        detail = " ".join(str(error).split())[:300]
        raise ModelLoadError(f"the weights in {path} do not fit --arch {arch} ({detail})") from None
    if result.missing_keys or result.unexpected_keys:
        def some(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

        parts = []
        if result.missing_keys:
            parts.append(f"missing {some(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {some(result.unexpected_keys)}")
        raise ModelLoadError(f"the weights in {path} do not fit --arch {arch} ({'; '.join(parts)})")
    return model


def load_model(path: str | os.PathLike, *, arch: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Read a model from a state_dict (``.pt``/``.pth``/``.safetensors``) or a pickled module.

    Args:
        path: the file.
        arch: ``MODULE:CALLABLE`` building the model, for files that hold only weights.
        allow_pickle: allow unpickling a whole module (``torch.save(model)``); that runs code
            from the file, so it is refused unless the caller trusts the file.

    Raises:
        ModelLoadError: the file is missing, not a model, a TorchScript archive, or its weights
            do not fit ``arch``.
        UnsafeModelError: the file is a pickled module and ``allow_pickle`` is False.
        InvalidOptionError: ``arch`` cannot be imported or does not build a module.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; give the model file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ModelLoadError(f"{path} is empty")
    if path.suffix == ".onnx":
        raise ModelLoadError(
            f"{path} is an ONNX file: `convtool separate {path.name}` takes it directly; for this command give the "
            "PyTorch model it was exported from (its state_dict with --arch, or torch.save(model))"
        )

    if _is_safetensors(path, head):
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from error
        if arch is None:
            raise ModelLoadError(f"{path} holds only weights ({len(state)} tensors); pass --arch MODULE:CALLABLE that builds the model")
        return LoadedModel(_load_state(_build(arch), state, path, arch), "safetensors", path)

    kind = _zip_kind(path) if head.startswith(b"PK") else None
    if kind == "torchscript":
        raise ModelLoadError(
            f"{path} is a TorchScript archive, whose code convtool cannot rewrite; "
            "give the eager model instead (its state_dict with --arch, or torch.save(model))"
        )
    if kind == "export":
        raise ModelLoadError(
            f"{path} is a torch.export archive, which convtool cannot rewrite yet; "
            "give the eager model instead (its state_dict with --arch, or torch.save(model))"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = str(error)
        if "Weights only load failed" in message or "Unsupported global" in message:
            if not allow_pickle:
                raise UnsafeModelError(
                    f"{path} is a pickled Python object; loading it runs code from the file. "
                    "If you trust the file, pass --allow-pickle; else save model.state_dict() and pass --arch"
                ) from None
            return _load_pickled(path, arch)
        raise ModelLoadError(f"{path} is not a PyTorch model file, or it is truncated or corrupted") from None

    state = _weights(obj)
    if state is not None:
        if arch is None:
            raise ModelLoadError(f"{path} holds a state_dict ({len(state)} tensors); pass --arch MODULE:CALLABLE that builds the model")
        return LoadedModel(_load_state(_build(arch), state, path, arch), "state_dict", path)
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, neither a module nor a state_dict")


def _importable_here() -> None:
    """The current directory on the import path, as a user running a command in their project expects."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _load_pickled(path: Path, arch: str | None) -> LoadedModel:
    _importable_here()  # a pickled module names its classes by module: the user's project must import
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelLoadError(
            f"{path} could not be unpickled ({type(error).__name__}: {error}); "
            "the code that defined the model must be importable (run from its project, or use --arch)"
        ) from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, "pickled module", path)
    state = _weights(obj)  # a training checkpoint: weights beside pickled extras (args, optimizer...)
    if state is not None and arch is not None:
        return LoadedModel(_load_state(_build(arch), state, path, arch), "state_dict", path)
    if state is not None:
        raise ModelLoadError(f"{path} holds a state_dict ({len(state)} tensors); pass --arch MODULE:CALLABLE that builds the model")
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
