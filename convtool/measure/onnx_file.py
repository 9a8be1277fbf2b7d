"""Writing a module as it is to a checked ONNX file, atomically, at the opset asked.

The torch.export-based exporter is tried first: it keeps symbolic shapes and refuses what it
cannot prove. Where it refuses (data-dependent control flow, most often), or cannot write the
opset asked (it writes 18 and above, converting down only to 16 and 17), the TorchScript
exporter traces the path the example inputs take; the result says so, with the tracer's
warnings, because such a file is only right for inputs that take the same path.

This is the plain exporter that timing uses; ``convtool.export_onnx`` (deploy) first puts the
model in the form onnxruntime runs fastest.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_map

from ..core.inputs import (
    as_inputs,
    batch_size,
    batched,
    eval_mode,
    flatten_with_paths,
    has_batch,
    model_device,
    on_device,
    run_checked,
    tensors_of,
)
from ..core.names import describe_error
from ..errors import ExportError, InvalidOptionError

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "torch.export", "torchscript")
MIN_OPSET = 7  # the oldest opset onnxruntime runs and the TorchScript exporter writes
FIXED = "wrote a fixed batch of"  # the start of the reason an exporter's file is refused for fixing the batch
# Above this many bytes of weights an ONNX protobuf cannot hold them inline (2 GiB limit).
_EXTERNAL_DATA_BYTES = 1_500_000_000


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX file and how it was made. Usable as a path: ``str()`` and ``os.fspath`` give it."""

    path: Path
    exporter: str  # "torch.export" or "torchscript"
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    fallback_reason: str | None = None  # why torch.export was not used, when it was not
    warnings: tuple[str, ...] = ()  # tracer warnings: where a TorchScript trace may be wrong
    folded_batchnorms: tuple[str, ...] = ()  # BatchNorms folded into the conv before them
    branched_layers: tuple[str, ...] = ()  # pairs rewritten in a faster exact form (branches, 1 x k kernels)
    fixed_batch_reason: str | None = None  # why a dynamic batch was asked for and not written
    int8: Any = None  # with export_onnx(int8=...): the int8 file quantized from this one (an Int8Export)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def max_opset() -> int:
    """The newest opset the installed onnx package knows."""
    import onnx

    return onnx.defs.onnx_opset_version()


def check_opset(opset: int | None) -> None:
    """Refuse an opset no exporter here can write, before any work is done."""
    if opset is None:
        return
    newest = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise InvalidOptionError(
            f"opset {opset!r} cannot be written: the exporters here write opsets {MIN_OPSET} to {newest}"
        )


def check_export_options(exporter: str, opset: int | None) -> None:
    """Refuse an unknown exporter or an opset no exporter writes, before any work is done."""
    if exporter not in EXPORTERS:
        raise InvalidOptionError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
    check_opset(opset)


def _leaf_name(path: tuple, prefix: str) -> str:
    name = re.sub(r"[^0-9A-Za-z]+", "_", keystr(path)).strip("_")
    return name if name and not name[0].isdigit() else f"{prefix}_{name}" if name else prefix


def io_names(model: nn.Module, inputs: tuple) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names for the flattened inputs and outputs: ``input``/``output`` or one per leaf.

    Dict inputs and outputs keep their keys (``{"boxes": [a, b]}`` -> ``boxes_0``,
    ``boxes_1``), so they can be told apart in any runtime. Only tensors are named: a ``None``
    among the outputs is no output of the file. Leaves of a pytree node registered without
    key paths are named by position.
    """
    in_leaves = [(p, x) for p, x in flatten_with_paths(inputs)[0] if isinstance(x, torch.Tensor)]
    if len(in_leaves) == 1:
        input_names: tuple[str, ...] = ("input",)
    elif all(len(p) == 1 for p, _ in in_leaves):
        input_names = tuple(f"input_{i}" for i in range(len(in_leaves)))
    else:
        input_names = tuple(_leaf_name(p[1:] if len(inputs) == 1 else p, "input") for p, _ in in_leaves)
    leaves = [(p, x) for p, x in flatten_with_paths(run_checked(model, inputs))[0] if isinstance(x, torch.Tensor)]
    if len(leaves) == 1 and not leaves[0][0]:
        return input_names, ("output",)
    return input_names, tuple(_leaf_name(path, "output") for path, _ in leaves)


def _call_args(inputs: tuple) -> tuple:
    """torch.onnx reads a trailing dict as keyword arguments: an empty one keeps a dict input positional."""
    return (*inputs, {}) if inputs and isinstance(inputs[-1], dict) else inputs


def _export_torch_export(model, inputs, path, input_names, output_names, opset, dynamic_batch, external):
    from torch.export import Dim

    size = batch_size(inputs)
    args = batched(inputs, 2) if dynamic_batch and size == 1 else inputs
    shapes = None
    if dynamic_batch:
        batch = Dim("batch")
        shapes = tree_map(lambda x: {0: batch} if has_batch(x, batch_size(args)) else None, args)
    torch.onnx.export(
        model, _call_args(args), str(path), dynamo=True, input_names=list(input_names), output_names=list(output_names),
        opset_version=opset, dynamic_shapes=shapes, external_data=external, verbose=False, report=False,
    )


def _export_torchscript(model, inputs, path, input_names, output_names, opset, dynamic_batch):
    axes = None
    if dynamic_batch:
        size = batch_size(inputs)
        per_sample = [has_batch(x, size) for x in tensors_of(inputs)]
        axes = {name: {0: "batch"} for name, varies in zip(input_names, per_sample) if varies}
        axes.update({name: {0: "batch"} for name in output_names})
    torch.onnx.export(
        model, _call_args(inputs), str(path), dynamo=False, input_names=list(input_names), output_names=list(output_names),
        opset_version=opset, dynamic_axes=axes,
    )


class _Muted:
    """A stream that drops what one thread writes and passes everything else to the real stream."""

    def __init__(self, stream: Any, thread: int) -> None:
        self._stream, self._thread = stream, thread

    def write(self, text: str) -> int:
        if threading.get_ident() == self._thread:
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ThisThread(logging.Filter):
    def __init__(self, thread: int) -> None:
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


class quiet:
    """Hides what exporters print and log from this thread while the block runs.

    torch.export prints whole graphs to stderr when it gives up, and torch's loggers write
    warnings on their own handlers. Only this thread's output is dropped: other threads keep
    their logging and their stdout/stderr, and everything is restored on exit, errors included.
    """

    def __enter__(self) -> None:
        thread = threading.get_ident()
        self.filter = _ThisThread(thread)
        self.handlers = set(logging.root.handlers)
        for logger in list(logging.root.manager.loggerDict.values()):
            if isinstance(logger, logging.Logger):
                self.handlers.update(logger.handlers)
        for handler in self.handlers:
            handler.addFilter(self.filter)
        self.streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Muted(sys.stdout, thread), _Muted(sys.stderr, thread)

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self.streams
        for handler in self.handlers:
            handler.removeFilter(self.filter)


def _written_opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def write_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> OnnxExport:
    """Export ``model`` as it is to ONNX at ``path``, checked with ``onnx.checker`` (full check).

    Args: see :func:`convtool.export_onnx`, which puts the model in its runtime form first.

    Raises:
        InvalidOptionError: an unknown exporter, an opset no exporter here writes, a bad path.
        ExportError: no exporter produced a valid file at the opset asked; the message holds
            each one's reason.
    """
    import onnx

    check_export_options(exporter, opset)
    path = Path(path)
    if path.is_dir():
        raise InvalidOptionError(f"{path} is a directory; give the path of the .onnx file to write")
    if not path.parent.is_dir():
        raise InvalidOptionError(f"directory {path.parent} does not exist; create it first")
    inputs = on_device(as_inputs(example_inputs), model_device(model))
    input_names, output_names = io_names(model, inputs)
    fixed_batch = _fixed_batch(model, inputs) if dynamic_batch else None
    if fixed_batch:
        log.info("%s: exporting with a fixed batch", fixed_batch)
        dynamic_batch = False
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES

    errors: dict[str, str] = {}
    per_sample = [has_batch(x, batch_size(inputs)) for x in tensors_of(inputs)]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".convtool-") as tmp, eval_mode(model), quiet():
        staged = Path(tmp) / "model.onnx"
        attempt = lambda dynamic, errors: _attempt(  # noqa: E731
            model, inputs, staged, input_names, output_names, opset, dynamic, external, exporter, per_sample, errors)
        used, caught = attempt(dynamic_batch, errors)
        if used is None and dynamic_batch and any(FIXED in reason for reason in errors.values()):
            # No exporter wrote a dynamic batch (the model's code fixes it): the batch as given, said so.
            fixed_batch = "no exporter wrote a dynamic batch (" + "; ".join(f"{n}: {r}" for n, r in errors.items()) + ")"
            log.info("%s: exporting with a fixed batch", fixed_batch)
            dynamic_batch, errors = False, {}
            used, caught = attempt(False, errors)
        if used is None:
            detail = "; ".join(f"{name}: {reason}" for name, reason in errors.items())
            raise ExportError(f"could not export the model to ONNX ({detail})")
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as error:
            raise ExportError(f"the exported ONNX model fails onnx.checker ({describe_error(error, 300)})") from error
        written = _written_opset(staged)
        _finalise(staged, path, external)

    tracer_warnings = tuple(
        dict.fromkeys(str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning))
    ) if used == "torchscript" else ()
    if used == "torchscript" and "torch.export" in errors:
        log.info("torch.export did not export the model (%s); exported with the TorchScript tracer", errors["torch.export"])
    return OnnxExport(
        path=path,
        exporter=used,
        opset=written,
        input_names=input_names,
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        fallback_reason=errors.get("torch.export"),
        warnings=tracer_warnings,
        fixed_batch_reason=fixed_batch,
    )


def _attempt(model, inputs, staged, input_names, output_names, opset, dynamic, external, exporter, per_sample, errors,
             ) -> tuple[str | None, list]:
    """Each exporter allowed, in turn, until one writes the opset asked (and, with ``dynamic``, a dynamic batch).

    Returns the exporter that did, or None, and its warnings; ``errors`` gets each refusal.
    """
    attempts = {
        "torch.export": lambda: _export_torch_export(model, inputs, staged, input_names, output_names, opset, dynamic, external),
        "torchscript": lambda: _export_torchscript(model, inputs, staged, input_names, output_names, opset, dynamic),
    }
    caught: list = []
    for name, attempt in attempts.items():
        if exporter not in ("auto", name):
            continue
        try:
            with warnings.catch_warnings(record=True) as caught, _no_ir_dumps():  # the tracer's warnings say where a trace may be wrong
                warnings.simplefilter("always")
                attempt()
            written = _written_opset(staged)
        except Exception as error:
            errors[name] = describe_error(error, 300)
            continue
        if opset is not None and written != opset:
            errors[name] = f"it wrote opset {written}, not the {opset} asked"
            continue
        fixed = _fixed_inputs(staged, input_names, per_sample) if dynamic else None
        if fixed:
            # torch.export specialises a batch the model's code compares or caches (``if self.shape != x.shape``):
            # the file would take that batch alone, whatever the caller asked.
            errors[name] = f"it {FIXED} {fixed} (the model's code fixes it: a shape compared or cached, say)"
            continue
        return name, caught
    return None, caught


def _fixed_inputs(path: Path, input_names: tuple[str, ...], per_sample: list[bool]) -> str | None:
    """The batch a written file fixes on an input that should take any batch, as ``"N on input"``; None if none."""
    import onnx

    declared = {i.name: i.type.tensor_type.shape.dim for i in onnx.load(str(path), load_external_data=False).graph.input}
    for name, varies in zip(input_names, per_sample):
        dims = declared.get(name)
        if varies and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return f"{dims[0].dim_value} on {name}"
    return None


class _no_ir_dumps:
    """Keeps the TorchScript exporter from printing its IR graph on stdout when it fails.

    torch's exporter turns its C++ log on for every export and never off again (a bug of
    ``setup_onnx_logging`` in torch 2.x), and on failure logs the whole graph through it, from
    C++, where no Python stream redirection reaches: 32k characters for a small model. The log
    function is replaced for the export's duration, and the log's state put back after.
    """

    def __enter__(self) -> None:
        c = torch._C
        self.saved = getattr(c, "_jit_onnx_log", None)
        self.enabled = c._jit_is_onnx_log_enabled() if hasattr(c, "_jit_is_onnx_log_enabled") else None
        if self.saved is not None:
            c._jit_onnx_log = lambda *args: None

    def __exit__(self, *exc: object) -> None:
        c = torch._C
        if self.saved is not None:
            c._jit_onnx_log = self.saved
        if self.enabled is not None:
            c._jit_set_onnx_log_enabled(self.enabled)


def _fixed_batch(model: nn.Module, inputs: tuple) -> str | None:
    """Why the model cannot take another batch size (so no file may claim a dynamic batch), or None."""
    size = batch_size(inputs) + 1
    try:
        with eval_mode(model), torch.no_grad():
            model(*batched(inputs, size))
    except Exception as error:
        return f"the model does not run at batch {size} ({describe_error(error, 160)})"
    return None


def _finalise(staged: Path, path: Path, external: bool) -> None:
    """Move the staged file into place; external weights are renamed to follow ``path``."""
    import onnx

    if external:
        proto = onnx.load(str(staged))
        data_name = path.name + ".data"
        onnx.save_model(proto, str(staged.with_name("final.onnx")), save_as_external_data=True, location=data_name)
        os.replace(staged.with_name(data_name), path.with_name(data_name))
        staged = staged.with_name("final.onnx")
    os.replace(staged, path)
