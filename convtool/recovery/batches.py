"""Calibration data as batches of model inputs: in memory, or streamed from a Dataset or DataLoader."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..core.inputs import batch_dim, samples_of
from ..errors import InvalidOptionError

BATCH = 32


def calibration_batches(calibration: Any, batch_size: int = BATCH, like: tuple = ()) -> "list[tuple] | StreamedBatches":
    """Normalise calibration data to input tuples, refusing empty or non-finite data.

    A tensor is one input, cut into batches along dim 0; a tuple of tensors is a model's
    several inputs, cut alike, each along the dimension that holds its samples (a recurrent
    state ``(layers, N, hidden)`` on dimension 1; ``like``, the example inputs, tells them apart
    where shapes alone do not: :func:`~convtool.core.inputs.batch_dim`); a list or any other
    iterable yields batches (each a tensor, or a tuple/list of tensors), taken whole as given. A ``torch.utils.data.Dataset`` (items are inputs, batched by
    ``batch_size``) or ``DataLoader`` is not read into memory: it gives :class:`StreamedBatches`,
    read again on each pass and checked batch by batch.
    """
    if isinstance(calibration, (Dataset, DataLoader)):
        return StreamedBatches(calibration, batch_size)
    if isinstance(calibration, Tensor):
        calibration = (calibration,)
    if isinstance(calibration, tuple) and all(isinstance(t, Tensor) for t in calibration):
        n = calibration[0].shape[0] if calibration[0].dim() else 0
        if n == 0 or any(batch_dim(t, n, twin) is None for t, twin in zip(calibration, (*like, *[None] * len(calibration)))):
            raise InvalidOptionError(
                f"calibration tensors must each hold the {n or 'same'} samples of the first along one dimension "
                "(dimension 0, or 1 for a recurrent state of shape (layers, batch, hidden)); give each input's samples")
        batches = [samples_of(calibration, i, i + batch_size, like) for i in range(0, n, batch_size)]
    else:
        try:
            batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration]
        except TypeError:
            raise InvalidOptionError(f"calibration must be a tensor or an iterable of batches, got {type(calibration).__name__}") from None
        if not batches:
            raise InvalidOptionError("the calibration data holds no batch; give at least one")
        if not all(isinstance(t, Tensor) for b in batches for t in b):
            raise InvalidOptionError("calibration batches must be tensors or tuples of tensors")
    for batch in batches:
        _check_finite(batch)
    return batches


def _check_finite(batch: tuple) -> tuple:
    for t in batch:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidOptionError("calibration data holds NaN or infinite values; check its normalisation (--mean/--std)")
    return batch


class StreamedBatches:
    """Calibration batches read from a Dataset or DataLoader as a pass needs them, never all in memory.

    Iterable again for each pass (the refit and the BatchNorm re-estimation each make one);
    ``[0]`` is the first batch (kept: the planner and the refit both start from it). Under a
    process group, give each process its own share (a DataLoader with a ``DistributedSampler``):
    the refit sums the normal equations of all processes.
    """

    def __init__(self, source: "Dataset | DataLoader", batch_size: int = BATCH) -> None:
        self.loader = source if isinstance(source, DataLoader) else DataLoader(source, batch_size=batch_size)
        first = next(iter(self), None)
        if first is None:
            raise InvalidOptionError("the calibration data set yielded no batch")
        self.first = first

    def __iter__(self) -> Iterator[tuple]:
        for batch in self.loader:
            batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            if not batch or not all(isinstance(t, Tensor) for t in batch):
                raise InvalidOptionError("calibration batches must be tensors or tuples of tensors")
            yield _check_finite(batch)

    def __getitem__(self, index: int) -> tuple:
        if index != 0:
            raise IndexError("streamed calibration batches are read in order; only the first is kept")
        return self.first

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        """The batches a pass reads (``TypeError`` for a loader of unknown length, as ``len`` of it raises).

        The refit judges a layer at the last batch when it knows which one that is: a data set
        streamed must give the same refit as the same samples given as a tensor.
        """
        return len(self.loader)
