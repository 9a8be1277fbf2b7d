"""Which values of an ONNX graph are constants, however the exporter wrote them.

torch's exporter writes weights as initializers; paddle2onnx (and others) as ``Constant``
nodes, sometimes behind ``Identity``, ``Cast`` or ``Reshape`` nodes. All of them are constant
weights. A subgraph (a branch of ``If``, the body of ``Loop`` or ``Scan``) also sees the
constants of the graphs around it (outer scope).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

# Ops that turn a constant into a constant without reading anything else that varies.
_PASSING = ("Identity", "Cast", "Reshape")


class LazyValues(MutableMapping):
    """Arrays by value name, made when read: a 100 MB model's weights are not all copied to numpy
    to find its convs (each is read when its conv is planned, and not kept).

    An entry is an array, an ONNX ``TensorProto`` (an initializer, a Constant node's value) or
    a function computing the array (an Identity/Cast/Reshape of other constants).
    """

    def __init__(self, entries: dict[str, Any] | None = None) -> None:
        self.entries: dict[str, Any] = dict(entries or {})

    def __getitem__(self, name: str) -> np.ndarray:
        from onnx import TensorProto, numpy_helper

        entry = self.entries[name]
        if isinstance(entry, TensorProto):
            return numpy_helper.to_array(entry)
        return entry() if callable(entry) else entry

    def __setitem__(self, name: str, entry: Any) -> None:
        self.entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self.entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries


@dataclass
class Constants:
    """The constant values a graph sees: per value name, its array and the values it was computed through.

    ``chains[v]``: the names of the values (``v`` included) whose nodes or initializers make
    ``v``; a weight no other node reads can be dropped with its whole chain once replaced.
    ``producers``: per value name, the op that wrote it (of this graph or an outer one).
    """

    values: LazyValues = field(default_factory=LazyValues)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)
    initializers: set[str] = field(default_factory=set)  # of the main graph: the values a refit may override

    def inner(self, graph) -> "Constants":
        """The constants a subgraph sees: these, its own initializers, and its Constant nodes and chains."""
        scoped = Constants(LazyValues(self.values.entries), dict(self.chains), dict(self.producers), self.initializers)
        scoped.add(graph)
        return scoped

    def add(self, graph) -> None:
        for init in graph.initializer:
            self.values[init.name] = init
            self.chains[init.name] = (init.name,)
        # A graph input of the same name hides an outer constant (and an IR >= 4 input that
        # shadows its initializer makes it overridable, which the caller decides).
        for value in graph.input:
            if value.name not in {i.name for i in graph.initializer}:
                self.values.pop(value.name, None)
                self.producers[value.name] = "a graph input"
        for node in graph.node:  # nodes are topologically sorted: a chain's inputs come first
            for out in node.output:
                self.producers[out] = node.op_type
            value = _constant_output(node, self.values)
            if value is not None and node.output:  # an entry for LazyValues
                self.values[node.output[0]] = value
                self.chains[node.output[0]] = tuple(dict.fromkeys(
                    (node.output[0], *(v for i in node.input if i for v in self.chains.get(i, (i,))))))

    def reason(self, value: str) -> str:
        """What made a value that is not a constant, in the user's words."""
        producer = self.producers.get(value)
        if producer is None or producer == "a graph input":
            return "a graph input"
        return f"a {producer} node"


def model_constants(model) -> Constants:
    """The constants of the main graph (initializers, Constant nodes and their Identity/Cast/Reshape chains)."""
    found = Constants(initializers={i.name for i in model.graph.initializer})
    found.add(model.graph)
    return found


def _constant_output(node, values: LazyValues) -> np.ndarray | Any | Callable[[], np.ndarray] | None:
    """What a Constant node, or an Identity/Cast/Reshape of constants, writes, as a :class:`LazyValues` entry; None for any other node."""
    from onnx import helper

    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        if not node.attribute:
            return None
        attr = node.attribute[0]
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats"):
            return np.array(helper.get_attribute_value(attr), dtype=np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.array(helper.get_attribute_value(attr), dtype=np.int64)
        return None
    if node.op_type not in _PASSING or not node.input or any(i and i not in values for i in node.input):
        return None
    source = node.input[0]
    if node.op_type == "Identity":
        return lambda: values[source]
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return (lambda: values[source].astype(helper.tensor_dtype_to_np_dtype(to))) if to else None
    if len(node.input) < 2 or any(a.name == "allowzero" and a.i for a in node.attribute):
        return None
    x_shape = _shape(values.entries[source], values, source)
    shape = [int(s) for s in values[node.input[1]].reshape(-1)]
    shape = [x_shape[i] if s == 0 else s for i, s in enumerate(shape)]  # 0 copies the input's dimension
    try:
        np.empty(x_shape, dtype=np.uint8).reshape(shape)  # the shapes fit (without reading the weight)
    except ValueError:
        return None
    return lambda: values[source].reshape(shape)


def _shape(entry: Any, values: LazyValues, name: str) -> tuple[int, ...]:
    from onnx import TensorProto

    return tuple(entry.dims) if isinstance(entry, TensorProto) else np.shape(values[name])

