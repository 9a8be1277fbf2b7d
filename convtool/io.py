"""Load models safely and write files atomically.

Unpickling runs code from the file, so a file is first read with ``weights_only=True``; a
pickled module is loaded only with the caller's explicit ``allow_pickle=True``. Nothing here
ever unpickles a file to find out what it is.
"""

from __future__ import annotations

import importlib
import logging
import importlib.util
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from .core.inputs import eval_mode
from .core.modules import SeparableConv2d
from .errors import InvalidOptionError, ModelLoadError, OutputExistsError, UnsafeModelError

log = logging.getLogger(__name__)

# Keys under which training scripts commonly nest the weights in a checkpoint dict.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema", "model_ema")


@dataclass(frozen=True)
class LoadedModel:
    """A model read from a file, and what the file was."""

    model: nn.Module
    format: str  # "state_dict", "safetensors", "pickled module"
    path: Path


def resolve_arch(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE``.

    The current directory is importable, as users expect of a command they run in their
    project.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidOptionError(f"--arch {spec!r} should look like MODULE:CALLABLE or path/to/file.py:CALLABLE")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise InvalidOptionError(f"--arch file {file} does not exist")
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
        raise InvalidOptionError(f"--arch {spec!r}: cannot import {module_name} ({type(error).__name__}: {error})") from error
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InvalidOptionError(f"--arch {spec!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InvalidOptionError(f"--arch {spec!r} is not callable")
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


def check_output(path: str | os.PathLike, *, force: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse, before any work, an output that is an input, exists (without ``force``) or cannot be written.

    Writability is probed by creating (and removing) a temporary file where the output will
    be renamed into place: that is the one test that holds for read-only directories, special
    file systems (``/proc``) and a file standing where a directory should be.
    """
    path = Path(path)
    for source in map(Path, inputs):
        if source.resolve() == path.resolve() or (path.exists() and source.exists() and os.path.samefile(path, source)):
            raise OutputExistsError(f"{path} is the input file; write the output somewhere else")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; give a file path")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent
    if not parent.exists():
        raise InvalidOptionError(f"directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise InvalidOptionError(f"cannot write {path}: {parent} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise InvalidOptionError(f"cannot write {path}: {error.strerror or error} in {parent}") from None
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure leaves ``path`` as it was: the old file whole, or no file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _StandardLeaves(fx.Tracer):
    """Traces through every module but torch's own and convtool's pairs."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SeparableConv2d) or super().is_leaf_module(m, qualname)


def portable(model: nn.Module, example_inputs: tuple) -> nn.Module | None:
    """The model as a GraphModule built only of torch and convtool classes, or None.

    Such a module unpickles wherever convtool is installed, without the code that defined the
    original model. None when fx cannot trace it, or the traced module does not give the same
    outputs on the example inputs.
    """
    try:
        graph = _StandardLeaves().trace(model)
        for node in graph.nodes:
            # String annotations (PEP 563) would land in the code's globals and break pickling.
            node.type = None
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        if _depends_on_mode(model):
            return None
    except Exception:
        return None
    if any(not type(m).__module__.startswith(("torch.", "convtool.")) for m in gm.modules() if m is not gm):
        return None
    try:
        with eval_mode(model), eval_mode(gm), torch.no_grad():
            expected, actual = model(*example_inputs), gm(*example_inputs)
        leaves_e, spec_e = torch.utils._pytree.tree_flatten(expected)
        leaves_a, spec_a = torch.utils._pytree.tree_flatten(actual)
        if spec_e != spec_a or not all(
            torch.equal(a, e) if isinstance(e, torch.Tensor) else a == e for a, e in zip(leaves_a, leaves_e)
        ):
            return None
    except Exception:
        return None
    return gm.train(model.training)


def _depends_on_mode(model: nn.Module) -> bool:
    """Whether the model's own code reads ``self.training``: tracing would freeze it.

    Traced once per mode (on a copy); different code means a branch or argument depends on
    the mode (``F.dropout(x, training=self.training)``, auxiliary heads).
    """
    import copy

    probe = copy.deepcopy(model)
    codes = []
    for mode in (True, False):
        probe.train(mode)
        codes.append(fx.GraphModule(probe, _StandardLeaves().trace(probe)).code)
    return codes[0] != codes[1]


def save_model(model: nn.Module, path: str | os.PathLike, example_inputs: tuple = ()) -> bool:
    """Save ``model`` with ``torch.save``, atomically.

    Where the model traces into torch and convtool classes only (checked on ``example_inputs``),
    the traced GraphModule is saved, so the file loads with ``torch.load(path,
    weights_only=False)`` wherever convtool is installed. Returns whether it is portable so.
    """
    gm = portable(model, example_inputs) if example_inputs else None
    if gm is not None:
        try:
            write_atomic(path, lambda tmp: torch.save(gm, tmp))
            return True
        except Exception:  # a GraphModule that fx cannot serialise: save the model as it is
            log.debug("saving the traced GraphModule failed; saving the model itself", exc_info=True)
    write_atomic(path, lambda tmp: torch.save(model, tmp))
    return False


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def load_calibration(
    path: str | os.PathLike,
    *,
    channels: int | None = None,
    image_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Model-ready unlabeled inputs from a file or a folder of images.

    ``.pt`` (a tensor, or a tuple/list of tensors for several inputs; read with
    ``weights_only=True``), ``.npy`` and ``.npz`` (arrays in file order; no pickles), or a
    folder of images, resized to ``image_size``, scaled to [0, 1], then normalised by
    ``mean`` and ``std`` per channel.
    """
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise InvalidOptionError(f"--calibration {path} does not exist")
    if path.is_dir():
        return _load_images(path, channels, image_size, mean, std)
    try:
        if path.suffix == ".npy":
            data: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = [torch.from_numpy(archive[k]) for k in archive.files]
            data = arrays[0] if len(arrays) == 1 else tuple(arrays)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InvalidOptionError(f"--calibration {path} is not a readable .pt/.npy/.npz tensor file ({type(error).__name__})") from None
    if isinstance(data, list):
        data = tuple(data)
    tensors = data if isinstance(data, tuple) else (data,)
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
        raise InvalidOptionError(f"--calibration {path} should hold a tensor of inputs (or one per model input)")
    tensors = tuple(t.float() if not t.is_floating_point() else t for t in tensors)
    return tensors[0] if len(tensors) == 1 else tensors


def _load_images(folder, channels, image_size, mean, std) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidOptionError(f"--calibration {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if image_size is None:
        raise InvalidOptionError("a folder of calibration images needs --image-size H,W")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert(mode).resize((image_size[1], image_size[0]), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except Exception as error:
            raise InvalidOptionError(f"--calibration: cannot read image {file} ({type(error).__name__})") from None
        images.append(torch.from_numpy(array).reshape(image_size[0], image_size[1], -1).permute(2, 0, 1))
    batch = torch.stack(images)
    c = batch.shape[1]
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, c):
            raise InvalidOptionError(f"{name} needs 1 or {c} values, got {len(values)}")
    if mean is not None:
        batch = batch - torch.tensor(mean).reshape(1, -1, 1, 1)
    if std is not None:
        batch = batch / torch.tensor(std).reshape(1, -1, 1, 1)
    return batch
