"""Unlabeled inputs streamed from disk: a folder of images, or a folder of ``.npy``/``.pt`` shards.

Each is a map-style ``torch.utils.data.Dataset`` whose items are model inputs (a tensor, or a
tuple of tensors for a model with several inputs), read one sample at a time, so a DataLoader
with workers feeds the model while memory holds a few batches, not the data set. ``.npy``
shards are memory-mapped; ``.pt`` shards are read with ``weights_only=True`` (never unpickled
code) and memory-mapped where the file allows it.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import InvalidOptionError
from .data import IMAGE_SUFFIXES, load_calibration, normalise, read_image

SHARD_SUFFIXES = (".npy", ".pt")


class ImageFolderInputs(Dataset):
    """Every image under ``folder`` (recursively, sorted by path), resized, scaled to [0, 1] and normalised.

    The same transform as ``separate --calibration DIR``, one image per item.
    """

    def __init__(self, folder: str | os.PathLike, *, image_size: tuple[int, int], channels: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, option: str = "--data") -> None:
        self.files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise InvalidOptionError(f"{option} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.image_size, self.channels, self.mean, self.std, self.option = image_size, channels, mean, std, option
        normalise(read_image(self.files[0], channels, image_size, option), mean, std)  # bad --mean/--std: now, not in a worker

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return normalise(read_image(self.files[index], self.channels, self.image_size, self.option), self.mean, self.std)


class ShardInputs(Dataset):
    """The samples of every ``.npy`` / ``.pt`` shard under ``folder``, in path order, as one data set.

    A shard holds a batch of inputs: an array or tensor whose first dimension is the sample, or
    (``.pt``) a tuple/list of such tensors, one per model input. Only each shard's length is
    read up front; samples are read from memory-mapped files when asked for. Integer data is
    cast to float32.
    """

    def __init__(self, folder: str | os.PathLike, *, option: str = "--data") -> None:
        self.files = sorted(p for p in Path(folder).rglob("*") if p.suffix in SHARD_SUFFIXES)
        if not self.files:
            raise InvalidOptionError(f"{option} {folder} holds no .npy or .pt shards")
        self.option = option
        self._open: dict[int, tuple] = {}
        lengths = [self._shard(i)[0].shape[0] for i in range(len(self.files))]
        self._open.clear()  # opened again in each worker: memory maps do not cross process boundaries well
        self.starts = [0]
        for n in lengths:
            self.starts.append(self.starts[-1] + n)
        if self.starts[-1] == 0:
            raise InvalidOptionError(f"{option} {folder}: every shard is empty")

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        items = tuple(_sample(part, row) for part in self._shard(shard))
        return items[0] if len(items) == 1 else items

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # workers open their own maps

    def _shard(self, i: int) -> tuple:
        if i not in self._open:
            self._open[i] = _read_shard(self.files[i], self.option)
        return self._open[i]


def _read_shard(file: Path, option: str) -> tuple:
    import numpy as np

    try:
        if file.suffix == ".npy":
            data: Any = np.load(file, mmap_mode="r", allow_pickle=False)
        else:
            try:
                data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # written in the legacy (non-zip) format: no memory map
                data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InvalidOptionError(f"{option}: {file} is not a readable .npy/.pt shard ({type(error).__name__})") from None
    parts = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not parts or not all(getattr(p, "ndim", 0) >= 1 and p.shape[0] == parts[0].shape[0] for p in parts):
        raise InvalidOptionError(f"{option}: {file} should hold an array of samples (or one per model input) "
                                 "sharing the first dimension")
    if file.suffix == ".pt" and not all(isinstance(p, torch.Tensor) for p in parts):
        raise InvalidOptionError(f"{option}: {file} should hold tensors")
    return parts


def _sample(part: Any, row: int) -> torch.Tensor:
    """One row of a shard, copied out of the memory map, as a float tensor."""
    import numpy as np

    value = part[row]
    value = value.clone() if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
    return value if value.is_floating_point() else value.float()


class CastInputs(Dataset):
    """Another data set's samples cast to a model's float dtype (a float64 or float16 model reads float32 files)."""

    def __init__(self, inputs: Dataset, dtype: torch.dtype) -> None:
        self.inputs, self.dtype = inputs, dtype

    def __len__(self) -> int:
        return len(self.inputs)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.inputs[index]
        cast = lambda t: t.to(self.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        return tuple(map(cast, sample)) if isinstance(sample, tuple) else cast(sample)


def open_inputs(path: str | os.PathLike, *, channels: int | None = None, image_size: tuple[int, int] | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                option: str = "--data") -> Dataset | torch.Tensor | tuple[torch.Tensor, ...]:
    """Unlabeled model inputs at ``path``, streamed where that helps.

    A folder of images gives an :class:`ImageFolderInputs` (needs ``image_size``); a folder of
    ``.npy``/``.pt`` shards a :class:`ShardInputs`; a single file is read into memory as
    :func:`load_calibration` reads it (a tensor, or a tuple of tensors).

    Raises:
        InvalidOptionError: a missing path, a folder holding neither (or both) kinds of file,
            an unreadable file, or images without ``image_size``.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidOptionError(f"{option} {path} does not exist")
    if not path.is_dir():
        return load_calibration(path, channels=channels, image_size=image_size, mean=mean, std=std)
    suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
    images, shards = suffixes & set(IMAGE_SUFFIXES), suffixes & set(SHARD_SUFFIXES)
    if images and shards:
        raise InvalidOptionError(f"{option} {path} holds both images and .npy/.pt shards; give a folder of one kind")
    if shards:
        for name, value in (("--image-size", image_size), ("--mean", mean), ("--std", std)):
            if value is not None:
                raise InvalidOptionError(f"{name} applies to a folder of images; {path} holds .npy/.pt shards")
        return ShardInputs(path, option=option)
    if images and image_size is None:
        raise InvalidOptionError(f"a folder of images ({option} {path}) needs --image-size H,W")
    if not images:
        raise InvalidOptionError(f"{option} {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .npy/.pt shards")
    return ImageFolderInputs(path, image_size=image_size, channels=channels, mean=mean, std=std, option=option)
