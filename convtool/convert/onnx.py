"""``export_onnx``: a model to a checked ONNX file, written atomically.

The torch.export-based exporter is tried first: it keeps symbolic shapes and refuses what it
cannot prove. Where it refuses (data-dependent control flow, most often), the TorchScript
exporter traces the path the example inputs take; the result says so, with the tracer's
warnings, because such a file is only right for inputs that take the same path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from ..inputs import as_inputs, eval_mode, model_device, on_device
from ..errors import ExportError, InvalidOptionError

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "torch.export", "torchscript")
# Above this many bytes of weights an ONNX protobuf cannot hold them inline (2 GiB limit).
_EXTERNAL_DATA_BYTES = 1_500_000_000


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX file and how it was made. Usable as a path (``os.fspath``)."""

    path: Path
    exporter: str  # "torch.export" or "torchscript"
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    fallback_reason: str | None = None  # why torch.export was not used, when it was not
    warnings: tuple[str, ...] = ()  # tracer warnings: where a TorchScript trace may be wrong
    folded_batchnorms: tuple[str, ...] = ()  # BatchNorms folded into the conv before them
    branched_layers: tuple[str, ...] = ()  # rank > 1 pairs written as multiplier-1 branches

    def __fspath__(self) -> str:
        return str(self.path)


def io_names(model: nn.Module, inputs: tuple) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names for the flattened inputs and outputs: ``input``/``output`` or one per leaf.

    Dict outputs keep their keys (``{"boxes": [a, b]}`` -> ``boxes_0``, ``boxes_1``), so the
    ONNX outputs can be told apart in any runtime.
    """
    input_names = ("input",) if len(inputs) == 1 else tuple(f"input_{i}" for i in range(len(inputs)))
    with eval_mode(model), torch.no_grad():
        leaves, _ = tree_flatten_with_path(model(*inputs))
    if len(leaves) == 1 and not leaves[0][0]:
        return input_names, ("output",)
    names = []
    for path, _ in leaves:
        name = re.sub(r"[^0-9A-Za-z]+", "_", keystr(path)).strip("_")
        names.append(name if name and not name[0].isdigit() else f"output_{name}")
    return input_names, tuple(names)


def _batch_two(x: Any) -> Any:
    """torch.export specialises a dimension of size 1; give it a batch of two to keep it symbolic."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return torch.cat([x, x])
    return x


def _export_torch_export(model, inputs, path, input_names, output_names, opset, dynamic_batch, external):
    from torch.export import Dim

    args = tuple(_batch_two(x) for x in inputs) if dynamic_batch else inputs
    shapes = None
    if dynamic_batch:
        batch = Dim("batch")
        shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in args)
    torch.onnx.export(
        model, args, str(path), dynamo=True, input_names=list(input_names), output_names=list(output_names),
        opset_version=opset, dynamic_shapes=shapes, external_data=external, verbose=False, report=False,
    )


def _export_torchscript(model, inputs, path, input_names, output_names, opset, dynamic_batch):
    axes = None
    if dynamic_batch:
        axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    torch.onnx.export(
        model, inputs, str(path), dynamo=False, input_names=list(input_names), output_names=list(output_names),
        opset_version=opset, dynamic_axes=axes,
    )


class _quiet:
    """Silence what exporters write: torch.export dumps whole graphs to stderr when it gives up.

    Logging is disabled process-wide and stdout/stderr redirected while the block runs; both
    are restored on exit, errors included.
    """

    def __enter__(self) -> None:
        self.previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        self.redirects = contextlib.ExitStack()
        self.redirects.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self.redirects.enter_context(contextlib.redirect_stderr(io.StringIO()))

    def __exit__(self, *exc: object) -> None:
        self.redirects.close()
        logging.disable(self.previous)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    fold_bn: bool = True,
    layout: str = "branches",
    provider: str = "cpu",
) -> OnnxExport:
    """Export ``model`` to ONNX at ``path``, checked with ``onnx.checker`` (full check).

    Args:
        model: the model to export; it is exported in eval mode and left in its own mode.
        example_inputs: a tensor or tuple of tensors.
        path: where to write; written atomically (a temporary file, then a rename), so an
            existing file is replaced whole or not at all.
        opset: ONNX opset; the exporter's default when ``None``.
        dynamic_batch: make dimension 0 of every input and output symbolic.
        exporter: ``"auto"`` (torch.export, then TorchScript if it refuses), or either one.
        fold_bn: fold each BatchNorm that follows a conv (dense or separated) into that conv.
        layout: ``"branches"`` writes rank > 1 depthwise-then-pointwise pairs as multiplier-1
            depthwise branches, which onnxruntime runs faster than one conv with a channel
            multiplier end to end (benchmarks/RESULTS.md); ``"multiplier"`` keeps the module's
            form; ``"measured"`` times both forms of each pair on ``provider`` and keeps the
            faster. Every rewrite is checked on the example inputs and dropped if outputs
            would change.
        provider: the onnxruntime provider ``layout="measured"`` times on.

    Returns:
        An :class:`OnnxExport` that says which exporter produced the file, and why.

    Raises:
        ExportError: no exporter produced a valid file; the message holds each one's reason.

    Example:
        >>> info = export_onnx(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), "conv.onnx")
        >>> info.exporter, info.input_names
        ('torch.export', ('input',))
    """
    import onnx

    if exporter not in EXPORTERS:
        raise InvalidOptionError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
    path = Path(path)
    if path.is_dir():
        raise InvalidOptionError(f"{path} is a directory; give the path of the .onnx file to write")
    if not path.parent.exists():
        raise InvalidOptionError(f"directory {path.parent} does not exist; create it first")
    inputs = on_device(as_inputs(example_inputs), model_device(model))
    input_names, output_names = io_names(model, inputs)
    folded: tuple[str, ...] = ()
    branched: tuple[str, ...] = ()
    if fold_bn or layout != "multiplier":
        from .runtime_form import for_runtime

        model, folded, branched = for_runtime(model, inputs, fold_bn=fold_bn, layout=layout, provider=provider)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES

    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".convtool-") as tmp, eval_mode(model), _quiet():
        staged = Path(tmp) / "model.onnx"
        used, caught = None, []
        if exporter in ("auto", "torch.export"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _export_torch_export(model, inputs, staged, input_names, output_names, opset, dynamic_batch, external)
                used = "torch.export"
            except Exception as error:
                errors["torch.export"] = _first_line(error)
        if used is None and exporter in ("auto", "torchscript"):
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    _export_torchscript(model, inputs, staged, input_names, output_names, opset, dynamic_batch)
                used = "torchscript"
            except Exception as error:
                errors["torchscript"] = _first_line(error)
        if used is None:
            detail = "; ".join(f"{name}: {reason}" for name, reason in errors.items())
            raise ExportError(f"could not export the model to ONNX ({detail})")
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as error:
            raise ExportError(f"the exported ONNX model fails onnx.checker ({_first_line(error)})") from error
        proto = onnx.load(str(staged), load_external_data=False)
        _finalise(staged, path, external)

    tracer_warnings = tuple(
        dict.fromkeys(str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning))
    )
    if used == "torchscript" and errors:
        log.info("torch.export refused the model (%s); exported with the TorchScript tracer", errors["torch.export"])
    return OnnxExport(
        path=path,
        exporter=used,
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
        input_names=input_names,
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        fallback_reason=errors.get("torch.export"),
        warnings=tracer_warnings,
        folded_batchnorms=folded,
        branched_layers=branched,
    )


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


def _first_line(error: BaseException) -> str:
    """The root cause's first line: exporters wrap the real reason in generic advice."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__
