"""Unlabeled model inputs from files: tensors (.pt, .npy, .npz) or a folder of images."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InvalidOptionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def load_calibration(
    path: str | os.PathLike,
    *,
    channels: int | None = None,
    image_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    by_name: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """Model-ready unlabeled inputs from a file or a folder of images.

    ``.pt`` (a tensor, or a tuple/list of tensors for several inputs; read with
    ``weights_only=True``), ``.npy`` and ``.npz`` (arrays in file order; no pickles), or a
    folder of images, resized to ``image_size``, scaled to [0, 1], then normalised by
    ``mean`` and ``std`` per channel. With ``by_name`` (an ONNX graph's named inputs), an
    ``.npz`` whose arrays were saved by name (``np.savez(f, input=..., sr=...)``) gives a dict
    of them, their dtypes kept.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidOptionError(f"--calibration {path} does not exist")
    if path.is_dir():
        return _load_images(path, channels, image_size, mean, std)
    tensors = _read_tensors(path, "--calibration", by_name)
    if isinstance(tensors, dict):
        return tensors
    if not all(t.dim() >= 1 for t in tensors):
        raise InvalidOptionError(f"--calibration {path} should hold a tensor of inputs (or one per model input)")
    tensors = tuple(t.float() if not t.is_floating_point() else t for t in tensors)
    return tensors[0] if len(tensors) == 1 else tensors


def load_tensors(path: str | os.PathLike, *, option: str = "--metric-data") -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The tensors a file holds, dtypes kept (labels stay integers): what a user's metric receives.

    ``.pt`` (a tensor, or a tuple/list of them; read with ``weights_only=True``), ``.npy``, or
    ``.npz`` (arrays in file order; no pickles). One tensor alone, several as a tuple.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidOptionError(f"{option} {path} is not a file")
    tensors = _read_tensors(path, option)
    return tensors[0] if len(tensors) == 1 else tensors


def _read_tensors(path: Path, option: str, by_name: bool = False) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """The tensors of a .pt/.npy/.npz file, as stored, or a one-line error (by name: an .npz saved by name as a dict)."""
    import numpy as np

    try:
        if path.suffix == ".npy":
            data: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays, names = [torch.from_numpy(archive[k]) for k in archive.files], archive.files
            if by_name and not all(re.fullmatch(r"arr_\d+", k) for k in names):  # np.savez's names for unnamed arrays
                return dict(zip(names, arrays))
            data = tuple(arrays)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InvalidOptionError(f"{option} {path} is not a readable .pt/.npy/.npz tensor file ({type(error).__name__})") from None
    tensors = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise InvalidOptionError(f"{option} {path} should hold a tensor (or a tuple of tensors)")
    return tensors


def _load_images(folder, channels, image_size, mean, std) -> torch.Tensor:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidOptionError(f"--calibration {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if image_size is None:
        raise InvalidOptionError("a folder of calibration images needs --image-size H,W")
    batch = torch.stack([read_image(file, channels, image_size, "--calibration") for file in files])
    return normalise(batch, mean, std)


def read_image(file: Path, channels: int | None, image_size: tuple[int, int], option: str) -> torch.Tensor:
    """One image as a (C, H, W) float tensor in [0, 1]: grey for a 1-channel model, else RGB, resized."""
    import numpy as np
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(file) as image:
            image = image.convert(mode).resize((image_size[1], image_size[0]), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except Exception as error:
        raise InvalidOptionError(f"{option}: cannot read image {file} ({type(error).__name__})") from None
    return torch.from_numpy(array).reshape(image_size[0], image_size[1], -1).permute(2, 0, 1)


def normalise(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Images (N, C, H, W) or one image (C, H, W) less ``mean``, over ``std``, per channel (1 or C values each)."""
    c = images.shape[-3]
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, c):
            raise InvalidOptionError(f"{name} needs 1 or {c} values, got {len(values)}")
    if mean is not None:
        images = images - torch.tensor(mean).reshape(-1, 1, 1)
    if std is not None:
        images = images / torch.tensor(std).reshape(-1, 1, 1)
    return images
