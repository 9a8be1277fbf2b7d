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


_PAGE = 4096  # onnxruntime maps external weights page-aligned instead of copying them


def write_with_weights_beside(model: Any, path: str | os.PathLike, threshold: int = 1024) -> None:
    """Write ``model`` with the main graph's initializers over ``threshold`` bytes in a data file beside it.

    For files onnxruntime and onnx's checker read back at once: onnxruntime maps page-aligned
    external weights rather than copying them, and nothing here serialises the whole model
    into one string (each weight is written as it is read). ``model`` is not modified.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    path = Path(path)
    data_name = path.name + ".data"
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip="graph")
    copy_fields(model.graph, skeleton.graph, skip="initializer")
    with open(path.with_name(data_name), "wb") as data:
        for init in model.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL or init.data_type == TensorProto.STRING or init.ByteSize() <= threshold:
                skeleton.graph.initializer.add().CopyFrom(init)
                continue
            raw = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
            data.write(b"\0" * (-data.tell() % _PAGE))
            offset = data.tell()
            data.write(raw)
            entry = skeleton.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims,
                                                   data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry.external_data.add(key=key, value=value)
            del raw
    path.write_bytes(skeleton.SerializeToString())


def copy_fields(source: Any, target: Any, skip: str) -> None:
    """Copy every set field of a protobuf message into ``target`` but the one named ``skip`` (a model's weights, say)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
