"""Writing outputs: checked before any work, written atomically, the model saved portable where it can be.

A failed write leaves the old file whole or no file; an output that cannot be written is
refused before the work that would produce it.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
import pickle
from typing import Any, Callable

import torch
from torch import fx, nn

from ..core.inputs import eval_mode
from ..core.modules import SeparableConv
from ..core.names import describe_error
from ..errors import InvalidOptionError, OutputExistsError

log = logging.getLogger(__name__)


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


class Staging:
    """Outputs written to temporary files beside their targets, renamed into place together at the end.

    Leaving the block by an error removes every temporary file: the targets stay as they
    were (the old files whole, or no files), so a command never leaves half of its outputs.
    """

    def __enter__(self) -> "Staging":
        self.files: list[tuple[Path, Path]] = []
        return self

    def write(self, path: str | os.PathLike, write: Callable[[Path], Any]) -> Any:
        """Call ``write(tmp)`` on a temporary file beside ``path``; returns what it returns."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        self.files.append((Path(tmp), path))
        return write(Path(tmp))

    def __exit__(self, error_type: Any, *exc: object) -> None:
        try:
            if error_type is None:
                for tmp, path in self.files:
                    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
                    os.replace(tmp, path)
        finally:
            for tmp, _ in self.files:
                tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure leaves ``path`` as it was: the old file whole, or no file.
    """
    with Staging() as staging:
        staging.write(path, write)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _StandardLeaves(fx.Tracer):
    """Traces through every module but torch's own and convtool's pairs."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SeparableConv) or super().is_leaf_module(m, qualname)


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
    probe = copy.deepcopy(model)
    codes = []
    for mode in (True, False):
        probe.train(mode)
        codes.append(fx.GraphModule(probe, _StandardLeaves().trace(probe)).code)
    return codes[0] != codes[1]


def save_model(model: nn.Module, path: str | os.PathLike, example_inputs: tuple = ()) -> bool:
    """Save ``model`` with ``torch.save``, atomically; see :func:`write_model`."""
    with Staging() as staging:
        return staging.write(path, lambda tmp: write_model(model, tmp, example_inputs))


def write_model(model: nn.Module, file: Path, example_inputs: tuple = ()) -> bool:
    """Write ``model`` to ``file`` with ``torch.save``; returns whether it loads without the model's code.

    Where the model traces into torch and convtool classes only (checked on ``example_inputs``),
    the traced GraphModule is saved, so the file loads with ``torch.load(path,
    weights_only=False)`` wherever convtool is installed.

    Raises:
        InvalidOptionError: the model cannot be pickled (a lambda or a local class in it).
    """
    gm = portable(model, example_inputs) if example_inputs else None
    if gm is not None:
        try:
            torch.save(gm, file)
            return True
        except Exception:  # a GraphModule that fx cannot serialise: save the model as it is
            log.debug("saving the traced GraphModule failed; saving the model itself", exc_info=True)
    try:
        torch.save(model, file)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise InvalidOptionError(
            f"the separated model cannot be saved with torch.save ({describe_error(error)}): it holds something "
            "pickle cannot store, such as a lambda; separate it from Python with convtool.separate and keep "
            "result.model, or save its state_dict"
        ) from None
    return False
