"""Static int8 quantization of an ONNX file with onnxruntime's own tools, in the form it runs fastest.

People who ship to onnxruntime quantize next, so a separated model must survive it. This module
does no quantization math of its own: ``onnxruntime.quantization.quantize_static`` computes
every scale from calibration data the caller gives (checked first by
:mod:`~convtool.deploy.int8_data`), and :class:`Int8Form` holds the choices it leaves open. Its
defaults are what ``benchmarks/int8_forms.py`` measured fastest on onnxruntime CPU, not what the
documentation suggests (``docs/int8.md``, ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..core.names import describe_error
from ..errors import ExportError, InvalidOptionError
from ..measure.onnx_file import quiet
from .int8_data import MIN_CALIBRATION_SAMPLES, feeds_of

FORMATS = ("qdq", "qoperator")
TYPES = ("uint8", "int8")
_CONVS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class Int8Form:
    """How a model is quantized: the choices ``quantize_static`` leaves open.

    The defaults are the fastest form measured on onnxruntime CPU (``benchmarks/int8_forms.py``):
    QDQ, per-channel int8 weights, uint8 activations, after onnxruntime's pre-processing.

    Attributes:
        format: ``"qdq"`` writes QuantizeLinear/DequantizeLinear pairs around float ops, which
            onnxruntime fuses into int8 kernels when it loads the file; ``"qoperator"`` writes the
            int8 ops themselves (QLinearConv, QLinearAdd...).
        per_channel: one weight scale per output channel, rather than one per tensor.
        activations, weights: ``"uint8"`` or ``"int8"``.
        reduce_range: 7-bit weights (for CPUs without VNNI, where 8-bit products can saturate).
        float_depthwise: leave depthwise convs in float. ``format="qoperator"`` only: in QDQ
            form onnxruntime quantizes a float conv that sits between quantized tensors anyway.
        preprocess: run onnxruntime's ``quant_pre_process`` first (shape inference and graph
            optimisation: it folds the Identity chains that exporters share constants through,
            which the quantizer cannot read as a conv's bias).
    """

    format: str = "qdq"
    per_channel: bool = True
    activations: str = "uint8"
    weights: str = "int8"
    reduce_range: bool = False
    float_depthwise: bool = False
    preprocess: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InvalidOptionError(f"int8 format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        for field in ("activations", "weights"):
            if getattr(self, field) not in TYPES:
                raise InvalidOptionError(f"int8 {field} must be one of {', '.join(TYPES)}; got {getattr(self, field)!r}")
        if self.activations == "int8" and self.weights == "uint8":
            raise InvalidOptionError("onnxruntime quantizes int8 activations only with int8 weights; use weights='int8'")
        if self.float_depthwise and self.format != "qoperator":
            raise InvalidOptionError("float_depthwise needs format='qoperator': in QDQ form onnxruntime quantizes a float "
                                     "conv between quantized tensors when it loads the file")


DEFAULT_INT8_FORM = Int8Form()


def int8_path(path: str | os.PathLike) -> Path:
    """Where the int8 file of the fp32 file at ``path`` is written: beside it, ``model.onnx`` -> ``model.int8.onnx``."""
    path = Path(path)
    return path.with_suffix(".int8.onnx") if path.suffix.lower() == ".onnx" else path.with_name(path.name + ".int8.onnx")


def as_int8_form(int8: Any) -> Int8Form | None:
    """The ``int8`` keyword as a form: ``False``/``None`` (fp32) -> None, ``True`` -> :data:`DEFAULT_INT8_FORM`, a form as it is."""
    if int8 is None or int8 is False:
        return None
    if int8 is True:
        return DEFAULT_INT8_FORM
    if isinstance(int8, Int8Form):
        return int8
    raise InvalidOptionError(f"int8 is True, False or an Int8Form (how to quantize); got {int8!r}")


@dataclass(frozen=True)
class Int8Export:
    """An int8 file written by :func:`quantize_int8`.

    Attributes:
        path: the int8 file; ``str()`` of the record is this path.
        source: the fp32 file it was quantized from (``"<ModelProto>"`` for a model in memory).
        form: how it was quantized.
        calibration_samples: the samples its activation ranges were taken from.
        preprocessed: onnxruntime's pre-processing ran (it may refuse a graph; then the graph
            is quantized as it is, and this says so).
        int8_convs: convs (Conv nodes) onnxruntime runs in int8.
        float_convs: the convs left in float, by name: depthwise ones when the form asks, and
            transposed convs, for which onnxruntime's CPU provider has no int8 kernel.
    """

    path: str
    source: str
    form: Int8Form
    calibration_samples: int
    preprocessed: bool
    int8_convs: int
    float_convs: tuple[str, ...]

    def __str__(self) -> str:
        return self.path


def quantize_int8(model: Any, calibration: Any, path: str | os.PathLike, *, form: Int8Form | None = None,
                  min_samples: int = MIN_CALIBRATION_SAMPLES) -> Int8Export:
    """Quantize an fp32 ONNX model to int8 with onnxruntime's ``quantize_static``, calibrated on ``calibration``.

    Args:
        model: the fp32 ONNX file (or an ``onnx.ModelProto``): what ``export_onnx`` wrote.
        calibration: samples of the data the model will run on, as the model takes them (held-out
            data excluded): an array or tensor (N first) for a one-input model, a tuple of them or
            a dict by input name, or a list of batches. Activation ranges are their min and max.
        path: where to write the int8 file; written whole or not at all.
        form: how to quantize; :data:`DEFAULT_INT8_FORM`, the fastest measured, when ``None``.
        min_samples: the fewest calibration samples accepted.

    Returns:
        An :class:`Int8Export`; ``str()`` of it is the path.

    Raises:
        InvalidOptionError: calibration data of the wrong form, shape or dtype, non-finite, or
            too few samples; the message says what to give.
        ExportError: onnxruntime's quantizer refused the graph; the message holds its reason.

    Example:
        >>> exported = quantize_int8("model.onnx", images[:16], "model.int8.onnx")
        >>> exported.int8_convs, exported.float_convs
        (20, ())
    """
    import onnx

    form = form or DEFAULT_INT8_FORM
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    source = "<ModelProto>" if isinstance(model, onnx.ModelProto) else str(model)
    feeds, samples = feeds_of(proto, calibration, min_samples=min_samples)
    path = Path(path)
    staged = path.with_name(f".{path.name}.tmp")
    with tempfile.TemporaryDirectory(prefix="convtool-int8-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(_named(proto), str(fp32))
        preprocessed = form.preprocess and _preprocess(fp32, Path(tmp) / "pre.onnx")
        if preprocessed:
            fp32 = Path(tmp) / "pre.onnx"
        excluded = _depthwise(onnx.load(str(fp32))) if form.float_depthwise else []
        try:
            _quantize(fp32, staged, feeds, form, excluded)
        except Exception as error:
            staged.unlink(missing_ok=True)
            other = "preprocess=True" if not form.preprocess else f"format={FORMATS[form.format == 'qdq']!r}"
            raise ExportError(f"onnxruntime cannot quantize {Path(source).name} in {form.format} form "
                              f"({describe_error(error)}); try Int8Form({other})") from None
    os.replace(staged, path)
    int8, floats = _convs(onnx.load(str(path)), form.format)
    return Int8Export(str(path), source, form, samples, preprocessed, int8, floats)


def _quantize(fp32: Path, out: Path, feeds: list[dict], form: Int8Form, excluded: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._batches, None)

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with _silenced():
        quantize_static(
            str(fp32), str(out), Reader(),
            quant_format=QuantFormat.QDQ if form.format == "qdq" else QuantFormat.QOperator,
            per_channel=form.per_channel, reduce_range=form.reduce_range,
            activation_type=types[form.activations], weight_type=types[form.weights],
            nodes_to_exclude=excluded or None,  # MinMax calibration keeps two numbers per tensor and batch: no memory cap needed
        )


def _preprocess(fp32: Path, out: Path) -> bool:
    """onnxruntime's pre-processing of ``fp32`` into ``out``; False where it refuses the graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _silenced():
            quant_pre_process(str(fp32), str(out))
        return True
    except Exception as error:  # symbolic shape inference refuses some graphs; the quantizer may still take them
        logging.getLogger(__name__).info("onnxruntime's quant_pre_process refused the graph (%s); quantizing it as it is",
                                         describe_error(error))
        return False


def _named(proto: Any) -> Any:
    """A copy of ``proto`` whose nodes all have names (the quantizer picks nodes by name)."""
    copy = type(proto)()
    copy.CopyFrom(proto)
    taken = {n.name for n in copy.graph.node}
    for i, node in enumerate(copy.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{i}_{k}" for k in range(len(taken) + 1) if f"{node.op_type}_{i}_{k}" not in taken)
            taken.add(node.name)
    return copy


def _depthwise(proto: Any) -> list[str]:
    """The names of the depthwise Conv nodes: one group per input channel, one filter per group."""
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = shapes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight and group > 1 and weight[1] == 1 and weight[0] == group:
            found.append(node.name)
    return found


def _convs(proto: Any, format: str) -> tuple[int, tuple[str, ...]]:
    """How many convs of the int8 file run in int8, and the names of those left in float.

    In QDQ form onnxruntime fuses a conv read from a DequantizeLinear and written to a
    QuantizeLinear into an int8 conv when it loads the file, weights in float or not.
    """
    made = {o: n for n in proto.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    fused = lambda node: (node.input[0] in made and made[node.input[0]].op_type == "DequantizeLinear"  # noqa: E731
                          and readers.get(node.output[0]) == ["QuantizeLinear"])
    int8, floats = 0, []
    for node in proto.graph.node:
        if node.op_type == "QLinearConv" or (node.op_type == "Conv" and format == "qdq" and fused(node)):
            int8 += 1
        elif node.op_type in _CONVS:
            floats.append(node.name)
    return int8, tuple(floats)


@contextmanager
def _silenced() -> Iterator[None]:
    """onnxruntime's quantizer logs advice on the root logger (and would give it a handler): kept out of the caller's output."""
    placeholder = logging.NullHandler() if not logging.root.handlers else None
    if placeholder:
        logging.root.addHandler(placeholder)  # else logging.warning() installs a stderr handler for good
    try:
        with quiet():
            yield
    finally:
        if placeholder:
            logging.root.removeHandler(placeholder)
