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
        proto = _read_in_pieces(path) if _is_binary(path) else onnx.load(str(path))
    except Exception as error:
        raise OnnxFileError(f"{path} is not a valid ONNX model ({type(error).__name__}: {error})") from None
    if not proto.graph.node:  # protobuf parses many byte strings as an empty message
        raise OnnxFileError(f"{path} is not a valid ONNX model (it holds no graph nodes); export it again")
    return proto


def _is_binary(path: Path) -> bool:
    """Whether onnx reads ``path`` as protobuf's binary format (not one of its text formats, by the suffix)."""
    from onnx import serialization

    return serialization.registry.get_format_from_file_extension(path.suffix) in (None, "protobuf")


def _read_in_pieces(path: Path):
    """The model in the file at ``path``, as ``onnx.load`` reads it, parsed a node and a weight at a time.

    ``onnx.load`` holds the file's bytes and the proto at once, twice the model; here the bytes
    of one node or weight at a time. The main graph's nodes and initializers are parsed one by
    one into the model; every other field, as it is written, in one parse at the end (the
    order of each repeated field is kept, so the proto is the same). External data is read as
    ``onnx.load`` reads it.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.ModelProto()
    with open(path, "rb") as stream:
        size = stream.seek(0, os.SEEK_END)
        stream.seek(0)
        rest, buffer = bytearray(), bytearray()
        for number, head, length in _fields(stream, size, rest):
            if number == _GRAPH:
                graph_rest = bytearray()
                by_number = {1: model.graph.node, 5: model.graph.initializer}  # onnx.proto's GraphProto field numbers
                for part, part_head, part_length in _fields(stream, stream.tell() + length, graph_rest):
                    streamed = by_number.get(part)
                    if streamed is not None:
                        if len(buffer) < part_length:  # one buffer, the largest piece's size: glibc keeps no freed copies
                            buffer = bytearray(part_length)
                        with memoryview(buffer)[:part_length] as body:
                            if stream.readinto(body) != part_length:
                                raise ValueError("the file ends inside a weight (truncated)")
                            streamed.add().ParseFromString(body)
                    else:
                        graph_rest += part_head + _read(stream, part_length)
                model.graph.MergeFromString(bytes(graph_rest))
            else:
                rest += head + _read(stream, length)
        model.MergeFromString(bytes(rest))
    load_external_data_for_model(model, str(path.parent))
    return model


def _fields(stream, end: int, rest: bytearray):
    """Each length-delimited field of the message in ``stream`` up to ``end``: (number, tag and length bytes, length),
    the stream at its body for the caller to read; other fields are appended to ``rest`` as written."""
    while stream.tell() < end:
        tag = _read_varint(stream)
        number, wire = tag[0] >> 3, tag[0] & 7
        if wire == 2:
            length = _read_varint(stream)
            yield number, tag[1] + length[1], length[0]
        elif wire == 0:
            rest += tag[1] + _read_varint(stream)[1]
        elif wire in (1, 5):
            rest += tag[1] + _read(stream, 8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} at byte {stream.tell()}: not an ONNX model's")
    if stream.tell() != end:
        raise ValueError(f"a field runs past its message's end (byte {end})")


def _read_varint(stream) -> tuple[int, bytes]:
    """A varint from ``stream``: its value and its bytes."""
    raw = bytearray()
    while True:
        byte = stream.read(1)
        if not byte or len(raw) == 10:
            raise ValueError("the file ends inside a number (truncated)" if not byte else "a number over 10 bytes")
        raw += byte
        if not byte[0] & 0x80:
            return sum((b & 0x7F) << (7 * i) for i, b in enumerate(raw)), bytes(raw)


def _read(stream, length: int) -> bytes:
    data = stream.read(length)
    if len(data) != length:
        raise ValueError(f"the file ends {length - len(data)} bytes early (truncated)")
    return data


def passes_check(model, full: bool) -> bool:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=full)
    except Exception:
        return False
    return True


def write_proto(model: Any, path: str | os.PathLike) -> None:
    """Write an ``onnx.ModelProto``; over 2 GB, its tensors go to a data file beside it (protobuf's limit).

    The bytes are those of ``model.SerializeToString()``, written a node and a weight at a time
    (:func:`_pieces`): protobuf serialises a whole model into a buffer grown by doubling, then
    copies it, about 2.4 times the model on top of it. Saving as external data rewrites the
    proto it is given, so a copy is saved then.
    """
    import onnx

    path = Path(path)
    size, pieces = _pieces(model)
    if pieces is not None and size <= 2_000_000_000:
        with open(path, "wb") as out:
            for piece in pieces:
                out.write(piece)
        return
    large = size > 2_000_000_000
    if large:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    onnx.save(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)


_GRAPH = 7  # onnx.proto's field number of ModelProto.graph
_STREAMED = ("node", "initializer")  # the graph's fields written an element at a time


def _pieces(model) -> tuple[int, Any]:
    """The size of ``model``'s serialisation and its bytes in pieces, each at most one node or one weight.

    Protobuf writes fields in field-number order, a repeated message field as one tag, length and
    body per element, so the pieces join into ``model.SerializeToString()``. The pieces are None
    (and the size protobuf's own) when the model or its graph holds fields this onnx does not know:
    protobuf writes those last, so the model is written whole then.
    """
    try:
        from google.protobuf import unknown_fields
    except ImportError:  # protobuf before 4.24 cannot show them: written whole
        return model.ByteSize(), None
    if len(unknown_fields.UnknownFieldSet(model)) or len(unknown_fields.UnknownFieldSet(model.graph)):
        return model.ByteSize(), None
    graph = model.graph
    graph_size = 0
    for field, value in graph.ListFields():
        if field.name in _STREAMED:
            tag = len(_varint(field.number << 3 | 2))
            graph_size += sum(tag + len(_varint(n)) + n for n in (element.ByteSize() for element in value))
        else:
            graph_size += len(_one_field(graph, field.name))
    fields = [field for field, _ in model.ListFields()]
    outside = {field.name: _one_field(model, field.name) for field in fields if field.name != "graph"}
    graph_head = _varint(_GRAPH << 3 | 2) + _varint(graph_size) if model.HasField("graph") else b""
    size = sum(map(len, outside.values())) + len(graph_head) + graph_size

    def pieces():
        for field in fields:
            if field.name != "graph":
                yield outside[field.name]
                continue
            yield graph_head
            for part, value in graph.ListFields():
                if part.name not in _STREAMED:
                    yield _one_field(graph, part.name)
                    continue
                tag = _varint(part.number << 3 | 2)
                for element in value:
                    body = element.SerializeToString()
                    yield tag + _varint(len(body))
                    yield body
                    del body

    return size, pieces()


def _one_field(message: Any, name: str) -> bytes:
    """The bytes protobuf writes for one field of ``message``."""
    alone = type(message)()
    copy_fields(message, alone, skip=tuple(f.name for f, _ in message.ListFields() if f.name != name))
    return alone.SerializeToString()


def _varint(number: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer (tags and lengths)."""
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


_PAGE = 4096  # onnxruntime maps external weights page-aligned instead of copying them


def write_with_weights_beside(model: Any, path: str | os.PathLike, threshold: int = 1024, typed_lists: bool = True) -> None:
    """Write ``model`` with the main graph's initializers over ``threshold`` bytes in a data file beside it.

    For files onnxruntime and onnx's checker read back at once: onnxruntime maps page-aligned
    external weights rather than copying them, and nothing here serialises the whole model
    into one string (each weight is written as it is read). ``model`` is not modified.
    ``typed_lists`` False keeps a tensor held as a typed list (``float_data``...) inline, so that
    :func:`read_with_weights_beside` gives back the very same proto (beside, it is raw bytes).
    """
    from onnx import TensorProto, numpy_helper

    path = Path(path)
    data_name = path.name + ".data"
    skeleton = without_initializers(model)
    with open(path.with_name(data_name), "wb") as data:
        for init in model.graph.initializer:
            raw = init.HasField("raw_data")
            if (init.data_location == TensorProto.EXTERNAL or init.data_type == TensorProto.STRING or init.ByteSize() <= threshold
                    or not (raw or typed_lists)):
                skeleton.graph.initializer.add().CopyFrom(init)
                continue
            raw = init.raw_data if raw else numpy_helper.to_array(init).tobytes()
            data.write(b"\0" * (-data.tell() % _PAGE))
            offset = data.tell()
            data.write(raw)
            entry = skeleton.graph.initializer.add()
            copy_fields(init, entry, skip=_VALUE_FIELDS)  # its name, type, dims, doc string... as they were
            entry.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry.external_data.add(key=key, value=value)
            del raw
    path.write_bytes(skeleton.SerializeToString())


def read_with_weights_beside(path: str | os.PathLike):
    """The model :func:`write_with_weights_beside` wrote to ``path``, its weights inline again, in a new proto.

    A new proto is the compact one: protobuf frees none of a message's memory while any part of
    it lives, so a model whose weights were replaced in place still holds the old ones. Each
    weight is read on its own (never the whole data file at once). Tensors whose data lies in
    another file (the model's own external data) are left pointing there; a ``data_location``
    of DEFAULT set explicitly (onnx.load of a model with external data) reads back unset, the
    same meaning.
    """
    import onnx
    from onnx import TensorProto

    path = Path(path)
    data_name = path.name + ".data"
    model = onnx.ModelProto()
    model.ParseFromString(path.read_bytes())
    with open(path.with_name(data_name), "rb") as data:
        for init in model.graph.initializer:
            where = {entry.key: entry.value for entry in init.external_data}
            if init.data_location != TensorProto.EXTERNAL or where.get("location") != data_name:
                continue
            data.seek(int(where["offset"]))
            init.raw_data = data.read(int(where["length"]))
            init.ClearField("data_location")
            init.ClearField("external_data")
    return model


_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
                 "data_location", "external_data")


def without_initializers(model: Any):
    """A copy of ``model`` with every field but the main graph's initializers: the caller adds them as it needs."""
    import onnx

    copy = onnx.ModelProto()
    copy_fields(model, copy, skip="graph")
    copy_fields(model.graph, copy.graph, skip="initializer")
    return copy


def copy_fields(source: Any, target: Any, skip: str | tuple[str, ...]) -> None:
    """Copy every set field of a protobuf message into ``target`` but those named in ``skip`` (a model's weights, say)."""
    skip = (skip,) if isinstance(skip, str) else skip
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
