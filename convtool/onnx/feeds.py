"""What an ONNX graph is fed: example inputs from what the user gave, and calibration batches.

A graph may take several inputs, of any type: a waveform, a recurrent state, an int64 sample
rate. Each input not backed by an initializer needs a value. Given by position (a sequence, in
the graph's order) or by name (a dict), a value is an array, a tensor or a number; a tuple of
ints is a shape instead, filled with seeded normal noise (float inputs only: noise is no sample
rate). An input not given is made only where that is safe: a float input whose shape the graph
fixes gets noise. Anything else (an integer or boolean input, a dynamic dimension) cannot be
guessed: where the user gave some inputs, the rest are refused in one line naming each;
where the user gave none, the graph is separated unverified and the reason names them. An
input backed by an initializer has a default in the graph (IR 4 and later) and is left to it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import InvalidOptionError
from ..recovery.batches import calibration_batches

_FLOATS = (np.float16, np.float32, np.float64)


def graph_inputs(model) -> list[Any]:
    """The graph's inputs that need a value: those not backed by an initializer."""
    constants = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constants]


def _dtype(value) -> np.dtype | None:
    from onnx import helper

    elem = value.type.tensor_type.elem_type
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None


def _declared(value) -> list[int | None]:
    """The input's declared shape, None for each dynamic dimension: a named one, an unset one, and the
    ``-1`` (or 0) that paddle2onnx writes for a dynamic batch."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim]


def _shown(value) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in _declared(value)) + ")"


def _as_array(given: Any, dtype: np.dtype | None) -> np.ndarray:
    array = given.detach().cpu().numpy() if isinstance(given, torch.Tensor) else np.asarray(given)
    return array.astype(dtype, copy=False) if dtype is not None else array


def _fitted(value, array: np.ndarray) -> np.ndarray:
    """A value given as a number or a flat list, in the input's declared shape where its size fits (16000 for a (1,) rate)."""
    dims = _declared(value)
    if array.ndim <= 1 and all(d is not None for d in dims) and array.size == math.prod(dims):
        return array.reshape(dims)
    return array


def _noise(value, shape: tuple[int, ...], rng) -> np.ndarray:
    dtype = _dtype(value)
    if dtype is None or dtype.type not in _FLOATS:
        raise InvalidOptionError(
            f"input {value.name!r} is {dtype or 'untyped'}: a shape gives it noise, which is no value for it; "
            f"give its value (--input-value {value.name}=...)")
    return rng.standard_normal(shape).astype(dtype)


def _unguessable(value) -> str | None:
    """Why no value can be made for an input nobody gave, or None."""
    dtype, dims = _dtype(value), _declared(value)
    if dtype is None or dtype.type not in _FLOATS:
        return f"{value.name!r} ({dtype or 'untyped'} {_shown(value)}: give its value, --input-value {value.name}=...)"
    if any(d is None for d in dims):
        return f"{value.name!r} (a dynamic dimension in {_shown(value)}: give its shape, --input-shape {value.name}=...)"
    return None


def example_feeds(model, example_inputs: Any) -> tuple[list[np.ndarray] | None, str | None]:
    """The feeds for the graph's inputs, in its order; or None and why none could be made.

    Raises:
        InvalidOptionError: inputs given that do not fit the graph (too many, unknown names),
            or some inputs given and others that cannot be guessed (named, in one line).
    """
    inputs = graph_inputs(model)
    rng = np.random.default_rng(0)
    if example_inputs is not None and not isinstance(example_inputs, Mapping):
        given = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if len(given) != len(inputs):
            raise InvalidOptionError(f"the ONNX model takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}) but "
                                     f"{len(given)} were given; check --input-shape")
        example_inputs = {i.name: g for i, g in zip(inputs, given)}
    named = dict(example_inputs or {})
    # Integer keys (the CLI's unnamed --input-shape beside named ones) are positions among the inputs not named.
    unnamed = [i.name for i in inputs if i.name not in named]
    positions = sorted(k for k in named if isinstance(k, int))
    if positions and positions[-1] >= len(unnamed):
        raise InvalidOptionError(f"{len(positions)} unnamed input shapes given, but only {len(unnamed)} inputs are not named "
                                 f"({', '.join(unnamed) or 'none'})")
    named = {k: v for k, v in named.items() if not isinstance(k, int)} | {unnamed[k]: named[k] for k in positions}
    unknown = [name for name in named if name not in {i.name for i in inputs}]
    if unknown:
        raise InvalidOptionError(f"the ONNX model has no input {', '.join(map(repr, unknown))}; its inputs are "
                                 f"{', '.join(i.name for i in inputs) or 'none'}")
    feeds, missing = [], []
    for value in inputs:
        given = named.get(value.name)
        if isinstance(given, tuple) and all(isinstance(d, int) for d in given):
            feeds.append(_noise(value, given, rng))
        elif given is not None:
            feeds.append(_fitted(value, _as_array(given, _dtype(value))))
        elif (why := _unguessable(value)) is not None:
            missing.append(why)
        else:
            feeds.append(_noise(value, tuple(_declared(value)), rng))
    if missing:
        reason = f"convtool cannot make a value for input{'s' if len(missing) > 1 else ''} {'; '.join(missing)}"
        if named:
            raise InvalidOptionError(reason)
        return None, reason
    return feeds, None


def given_values(model, example_inputs: Any) -> dict[str, np.ndarray]:
    """The inputs given as values (not as shapes), by name: what calibration batches may take as they are."""
    if not isinstance(example_inputs, Mapping):
        return {}
    types = {i.name: _dtype(i) for i in graph_inputs(model)}
    values = {i.name: i for i in graph_inputs(model)}
    return {name: _fitted(values[name], _as_array(v, types.get(name))) for name, v in example_inputs.items()
            if isinstance(name, str) and name in values and not (isinstance(v, tuple) and all(isinstance(d, int) for d in v))}


def calibration_feeds(calibration: Any, model, fixed: Mapping[str, np.ndarray] = {}, batch: int | None = None) -> list[list[np.ndarray]]:
    """Calibration data as batches of feeds, one array per graph input, in the graph's order.

    ``calibration``: an array or tensor (the one input), a tuple of them (every input, in the
    graph's order), a dict by input name (an ``.npz`` file's), or an iterable of batches (a
    list of them holds arrays or tensors, or tuples of them). The
    first input's array holds the samples, N along its first dimension; every array of N rows
    is cut alike, in batches of the graph's batch size where it is fixed. An array of another
    first dimension, or of the input's whole declared shape (a recurrent state, a 0-d sample
    rate), goes with every batch as it is, and the samples then go in batches of ``batch``
    (the example inputs'), the batch a state is made for. An input the data does not hold
    takes its value from ``fixed`` (the example inputs given as values).

    Raises:
        InvalidOptionError: an input neither the data nor ``fixed`` gives (each named), or a
            graph with a fixed batch and fewer samples than one batch.
    """
    inputs = graph_inputs(model)
    as_torch = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))  # noqa: E731
    if isinstance(calibration, (np.ndarray, torch.Tensor)):
        calibration = (calibration,)
    if isinstance(calibration, Mapping) or (isinstance(calibration, tuple) and all(isinstance(a, (np.ndarray, torch.Tensor)) for a in calibration)):
        by_name = dict(calibration) if isinstance(calibration, Mapping) else None
        if by_name is None:
            if len(calibration) > len(inputs):
                raise InvalidOptionError(f"the calibration data holds {len(calibration)} arrays; the ONNX model takes {len(inputs)} inputs")
            by_name = {i.name: a for i, a in zip(inputs, calibration)}
        unknown = [n for n in by_name if n not in {i.name for i in inputs}]
        missing = [i.name for i in inputs if i.name not in by_name and i.name not in fixed]
        if unknown or missing:
            problems = ([f"no input named {', '.join(map(repr, unknown))}"] if unknown else []) + \
                ([f"nothing for input {', '.join(map(repr, missing))} (give it in the file, or --input-value)"] if missing else [])
            raise InvalidOptionError(f"the calibration data does not fit the ONNX model: {'; '.join(problems)}")
        given = [i for i in inputs if i.name in by_name]
        count = np.shape(by_name[given[0].name])[:1] if given else ()
        whole = {i.name: as_torch(by_name[i.name]) for i in given
                 if _is_whole(i, by_name[i.name]) or tuple(np.shape(by_name[i.name])[:1]) != tuple(count)}
        samples = [i for i in given if i.name not in whole]
        fixed_batch = next((d for d in _declared(samples[0])[:1] if d), None) if samples else None
        if samples and whole and not fixed_batch and batch:  # a state has its batch: samples go in batches of the example's
            fixed_batch = batch
        if samples:
            batches = calibration_batches(tuple(as_torch(by_name[i.name]) for i in samples),
                                          **({"batch_size": fixed_batch} if fixed_batch else {}))
            batches = [b for b in batches if not fixed_batch or b[0].shape[0] == fixed_batch]
            if not batches:
                raise InvalidOptionError(f"the ONNX model takes batches of {fixed_batch}: give at least {fixed_batch} calibration samples")
        else:
            batches = [()]
        rows = []
        for batch in batches:
            cut = dict(zip((i.name for i in samples), batch))
            rows.append([_as_array(cut.get(i.name, whole.get(i.name, fixed.get(i.name))), _dtype(i)) for i in inputs])
        return rows
    if not isinstance(calibration, (Dataset, DataLoader)):  # batches of arrays too, as separate_onnx's docstring promises
        tensors = lambda b: as_torch(b) if isinstance(b, np.ndarray) else b  # noqa: E731
        calibration = (tuple(map(tensors, b)) if isinstance(b, (tuple, list)) else tensors(b) for b in calibration)
    rows = []
    for batch in calibration_batches(calibration):
        if len(batch) != len(inputs):
            raise InvalidOptionError(f"a calibration batch holds {len(batch)} tensors; the ONNX model takes {len(inputs)} inputs")
        rows.append([_as_array(t, _dtype(i)) for t, i in zip(batch, inputs)])
    return rows


def _is_whole(value, array: Any) -> bool:
    """Whether ``array`` is one whole value of the input (its declared shape, every dimension fixed), not samples."""
    dims = _declared(value)
    return all(d is not None for d in dims) and tuple(np.shape(array)) == tuple(dims)
