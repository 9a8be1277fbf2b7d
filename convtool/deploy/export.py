"""``export_onnx``: a model in the form onnxruntime runs fastest, written to a checked ONNX file."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from ..core.inputs import as_inputs, model_device, on_device
from ..errors import InvalidOptionError
from ..measure.onnx_file import OnnxExport, check_export_options, write_onnx
from .int8 import as_int8_form, int8_path, quantize_int8
from .runtime_form import LAYOUTS, for_runtime


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
    int8: Any = False,
    calibration: Any = None,
) -> OnnxExport:
    """Export ``model`` to ONNX at ``path``, checked with ``onnx.checker`` (full check).

    Args:
        model: the model to export; it is exported in eval mode and left in its own mode.
        example_inputs: a tensor, a tuple of tensors, or a dict the forward takes.
        path: where to write; written atomically (a temporary file, then a rename), so an
            existing file is replaced whole or not at all.
        opset: ONNX opset, honoured or refused (never silently changed); the exporter's
            default when ``None``. torch.export writes 16 and up; older opsets (down to 7)
            fall back to the TorchScript exporter.
        dynamic_batch: make dimension 0 of every input and output symbolic.
        exporter: ``"auto"`` (torch.export, then TorchScript if it refuses), or either one.
        fold_bn: fold each BatchNorm that follows a conv (dense or separated) into that conv.
        layout: ``"branches"`` writes ungrouped rank > 1 pairs (either order) as multiplier-1
            depthwise branches, which onnxruntime runs faster than a channel multiplier or
            r-input groups end to end, and runs k x 1 depthwise kernels that the example
            inputs feed width 1 as 1 x k kernels (benchmarks/RESULTS.md); ``"multiplier"``
            keeps the module's form; ``"measured"`` times every exact form of each pair on
            ``provider`` and keeps the fastest. Every rewrite is checked on the example inputs
            and dropped if outputs would change.
        provider: the onnxruntime provider ``layout="measured"`` times on.
        int8: also write the int8 file beside it (``model.onnx`` -> ``model.int8.onnx``):
            ``True`` for the fastest measured :class:`~convtool.deploy.int8.Int8Form`, or a
            form. onnxruntime's static quantizer, calibrated on ``calibration``
            (:func:`~convtool.deploy.int8.quantize_int8`); judge it with
            :func:`~convtool.verify_int8` on data it was not calibrated on.
        calibration: with ``int8``: samples of the data the model will run on, as it takes
            them (held-out data excluded): a tensor or array (N first), a tuple or dict of them,
            or a list of batches; at least 8 samples.

    Returns:
        An :class:`OnnxExport` that says which exporter produced the file, and why; ``str()``
        of it is the path. With ``int8``, its ``int8`` is the int8 file's
        :class:`~convtool.deploy.int8.Int8Export` (which convs run in int8).

    Raises:
        InvalidOptionError: an unknown exporter or layout, an opset no exporter writes, a bad path.
        ExportError: no exporter produced a valid file; the message holds each one's reason.
        ProviderUnavailableError: ``layout="measured"`` on a provider that cannot run here.
        InvalidOptionError (int8): no calibration, or calibration data that does not fit the
            model; the fp32 file is then written, the int8 file not.

    Example:
        >>> info = export_onnx(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), "conv.onnx")
        >>> info.exporter, info.input_names, str(info)
        ('torch.export', ('input',), 'conv.onnx')
    """
    check_export_options(exporter, opset)
    if layout not in LAYOUTS:
        raise InvalidOptionError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    form = as_int8_form(int8)
    if form is not None and calibration is None:
        raise InvalidOptionError("int8 needs calibration: samples of the data the model will run on (held-out data excluded), "
                                 "as the model takes them")
    if form is None and calibration is not None:
        raise InvalidOptionError("calibration is what the int8 file is calibrated on: pass int8=True too, or drop it")
    inputs = on_device(as_inputs(example_inputs), model_device(model))
    folded: tuple[str, ...] = ()
    branched: tuple[str, ...] = ()
    if fold_bn or layout != "multiplier":
        model, folded, branched = for_runtime(model, inputs, fold_bn=fold_bn, layout=layout, provider=provider)
    written = write_onnx(model, inputs, path, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter)
    quantized = quantize_int8(written.path, calibration, int8_path(written.path), form=form) if form is not None else None
    return dataclasses.replace(written, folded_batchnorms=folded, branched_layers=branched, int8=quantized)
