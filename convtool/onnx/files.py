"""ONNX files in and out: read and check a model, write one (external data beside it when over 2 GB)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import OnnxFileError


def load_onnx(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise OnnxFileError(f"{path} does not exist")
    try:
        proto = onnx.load(str(path))
    except Exception as error:
        raise OnnxFileError(f"{path} is not a valid ONNX model ({type(error).__name__}: {error})") from None
    if not proto.graph.node:  # protobuf parses many byte strings as an empty message
        raise OnnxFileError(f"{path} is not a valid ONNX model (it holds no graph nodes); export it again")
    return proto


def passes_check(model, full: bool) -> bool:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=full)
    except Exception:
        return False
    return True


def write_proto(model: Any, path: str | os.PathLike) -> None:
    """Write an ``onnx.ModelProto``; over 2 GB, its tensors go to a data file beside it (protobuf's limit).

    Saving as external data rewrites the proto it is given, so a copy is saved then.
    """
    import onnx

    path = Path(path)
    large = model.ByteSize() > 2_000_000_000
    if large:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    onnx.save(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)
