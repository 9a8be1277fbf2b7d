"""Calibration and held-out data for an int8 file: samples checked against the graph's inputs, as feeds.

Static quantization fixes every activation's int8 scale from the calibration data, so data that
does not look like what the model will run on quietly ruins the file: raw uint8 pixels where the
model takes normalised floats, a NaN that stretches a range to infinity, two samples whose
extremes clip the third. Each is refused here, in one line that says what to give instead,
before onnxruntime's calibrator runs for minutes on it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ..errors import InvalidOptionError

MIN_CALIBRATION_SAMPLES = 8  # MinMax ranges from fewer clip the activations of the next inputs (docs/int8.md)
DEFAULT_BATCH = 8  # samples per run where the graph's batch is dynamic
HELD_OUT_SHARE = 0.25  # of the calibration data, kept from every fit to judge the int8 file on
MAX_HELD_OUT = 512  # held-out samples at most: enough to read a top-1 agreement to 0.2%, in memory at once
MAX_INT8_CALIBRATION = 512  # calibration samples at most for the int8 scales: MinMax ranges settle long before


def split_held_out(data: Any, share: float = HELD_OUT_SHARE, most: int = MAX_HELD_OUT) -> tuple[Any, Any]:
    """Calibration data cut in two: the samples to fit on (refit and int8 scales), and the last ``share`` of
    them (at most ``most``) held out to judge the int8 file on, each in the form given.

    ``data``: an array or tensor (N first), a tuple or dict of them cut alike, or a map-style
    Dataset (a streamed folder: split by index, nothing read). Held-out samples are the last
    ones, so a file of samples in a fixed order splits the same way every run.

    Raises:
        InvalidOptionError: too few samples for both parts, or data of another form.
    """
    count = _samples(data)
    held = min(max(round(count * share), 1), most)
    if count - held < MIN_CALIBRATION_SAMPLES:
        raise InvalidOptionError(
            f"the calibration data holds {count} samples; int8 holds {share:g} of them out to verify on and calibrates on "
            f"the rest, at least {MIN_CALIBRATION_SAMPLES}: give at least {MIN_CALIBRATION_SAMPLES + held} samples")
    return _taken(data, 0, count - held), _taken(data, count - held, count)


def first_samples(data: Any, most: int = MAX_INT8_CALIBRATION) -> Any:
    """The first ``most`` samples of ``data`` (as :func:`split_held_out` takes it), in the form given."""
    return _taken(data, 0, min(_samples(data), most))


def _samples(data: Any) -> int:
    from torch.utils.data import Dataset

    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return len(data)
    first = next(iter(data.values())) if isinstance(data, Mapping) else data[0] if isinstance(data, (tuple, list)) and data else data
    if not isinstance(first, (np.ndarray, torch.Tensor)) or not first.ndim:
        raise InvalidOptionError(f"int8 needs calibration data as samples (N first) or a folder; got {type(data).__name__}")
    return first.shape[0]


def _taken(data: Any, start: int, stop: int) -> Any:
    from torch.utils.data import Dataset, Subset

    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return Subset(data, range(start, stop))
    if isinstance(data, Mapping):
        return {k: v[start:stop] if getattr(v, "ndim", 0) else v for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(v[start:stop] for v in data)
    return data[start:stop]


def graph_inputs(model: Any) -> list[Any]:
    """The graph's inputs that need a value (those an initializer does not back)."""
    constants = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constants]


def _declared(value: Any) -> tuple[np.dtype | None, list[int | None]]:
    """An input's numpy dtype and shape, None for each dynamic dimension."""
    from onnx import helper

    tensor = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)) if tensor.elem_type else None
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
    return dtype, dims


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _by_name(names: list[str], value: Any, what: str) -> dict[str, Any]:
    """One batch (or the stack of all samples) by input name, from an array, a tuple by position or a dict."""
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise InvalidOptionError(f"the {what} names input {', '.join(map(repr, unknown))}; the model's inputs are {', '.join(names)}")
        return dict(value)
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(values) != len(names):
        raise InvalidOptionError(f"the {what} holds {len(values)} arrays per batch; the model takes {len(names)} inputs "
                                 f"({', '.join(names)}): give one array per input, in that order, or a dict by name")
    return dict(zip(names, values))


def feeds_of(model: Any, data: Any, *, what: str = "calibration data", min_samples: int = 1) -> tuple[list[dict[str, np.ndarray]], int]:
    """``data`` as batches of feeds for ``model`` (an ONNX ModelProto), checked; and how many samples they hold.

    ``data``: an array or tensor of samples (N along the first dimension) for a one-input
    model; a tuple of them (every input, in the graph's order) or a dict by input name, cut
    alike along dimension 0; or a list (any iterable) of batches, each an array, a tuple or a
    dict. Samples are cut into batches of the graph's batch size where it is fixed, of
    :data:`DEFAULT_BATCH` where it is dynamic.

    Raises:
        InvalidOptionError: data of the wrong form, shape or dtype, holding NaN or infinity,
            or fewer than ``min_samples`` samples; the message says what to give.
    """
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    declared = {i.name: _declared(i) for i in inputs}
    if isinstance(data, (np.ndarray, torch.Tensor, Mapping)) or (
            isinstance(data, tuple) and data and all(isinstance(a, (np.ndarray, torch.Tensor)) for a in data)):
        stacked = {name: _array(v) for name, v in _by_name(names, data, what).items()}
        fixed = next(iter(declared[names[0]][1][:1]), None)
        batch = fixed or DEFAULT_BATCH
        count = min((a.shape[0] if a.ndim else 0) for a in stacked.values())
        last = count - batch + 1 if fixed else count  # a fixed batch takes whole batches only
        batches: Iterable[Any] = [{k: a[i:i + batch] for k, a in stacked.items()} for i in range(0, max(last, 0), batch)]
        if count and fixed and count < fixed:
            raise InvalidOptionError(f"the model takes batches of {fixed}; the {what} holds {count} samples: give at least {fixed}")
    elif _is_dataset(data):  # a streamed folder: its samples batched as the graph takes them
        from torch.utils.data import DataLoader

        fixed = next(iter(declared[names[0]][1][:1]), None)
        batches = DataLoader(data, batch_size=fixed or DEFAULT_BATCH, drop_last=bool(fixed))
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise InvalidOptionError(f"the {what} must be an array or tensor of samples (N first), a dict of them by input name, "
                                 f"or a list of batches; got {type(data).__name__}")
    else:
        batches = data
    feeds, samples = [], 0
    for batch in batches:
        feed = {name: _checked(name, _array(v), *declared[name], what) for name, v in _by_name(names, batch, what).items()}
        missing = [n for n in names if n not in feed]
        if missing:
            raise InvalidOptionError(f"the {what} gives nothing for input {', '.join(map(repr, missing))}; give every input")
        first = feed[names[0]]
        samples += first.shape[0] if first.ndim else 1
        feeds.append(feed)
    if samples < min_samples:
        raise InvalidOptionError(
            f"the {what} holds {samples} sample{'s' * (samples != 1)}; int8 scales need at least {min_samples} "
            f"({2 * min_samples} or more is better): give more samples of the data the model will run on")
    return feeds, samples


def _is_dataset(data: Any) -> bool:
    from torch.utils.data import Dataset

    return isinstance(data, Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _checked(name: str, array: np.ndarray, dtype: np.dtype | None, dims: list[int | None], what: str) -> np.ndarray:
    """``array`` as input ``name`` takes it, or the one-line refusal of why it cannot be."""
    shown = "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
    if dtype is not None and dtype.kind == "f":
        if array.dtype.kind != "f":
            raise InvalidOptionError(
                f"the {what} for input {name!r} is {array.dtype}; the model takes {dtype}: give it as the model sees it "
                f"(normalised floats, as in training), not raw values")
        array = array.astype(dtype, copy=False)
        if not np.isfinite(array).all():
            raise InvalidOptionError(f"the {what} for input {name!r} holds NaN or infinite values; int8 ranges taken from "
                                     f"them are meaningless: check its normalisation")
    elif dtype is not None and array.dtype != dtype:
        if array.dtype.kind not in "iub" or (array.dtype.kind == "b") != (dtype.kind == "b"):
            raise InvalidOptionError(f"the {what} for input {name!r} is {array.dtype}; the model takes {dtype}")
        array = array.astype(dtype)
    if dims and (array.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, array.shape))):
        raise InvalidOptionError(f"the {what} for input {name!r} has shape {tuple(array.shape)}; the model takes {shown}: "
                                 f"give samples of that shape, N along the first dimension")
    return array
