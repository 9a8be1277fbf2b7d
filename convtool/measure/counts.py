"""Parameters and FLOPs per module, through fvcore.

fvcore counts one multiply-add as one flop (a MAC); every number called ``flops`` here is in
that unit. fvcore traces the model with ``torch.jit``: the counts are those of the path the
example inputs take, in eval mode.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.inputs import as_inputs, eval_mode, model_device, on_device, tensors_of
from ..core.names import describe_error, join
from ..core.references import references
from ..errors import AnalysisError

FLOPS_UNIT = "fvcore flops: one multiply-add counts as one flop"


@dataclass(frozen=True)
class ModuleCost:
    """One module's cost: ``params`` and ``flops`` include its submodules; ``own_*`` do not.

    ``own_flops`` is what the module's own code computes (a functional conv in its forward,
    say), so every counted flop belongs to exactly one module's ``own_flops``.
    """

    name: str
    type: str
    params: int
    flops: int
    own_params: int
    own_flops: int


@dataclass(frozen=True)
class Analysis:
    """What a model costs on given inputs.

    Attributes:
        params: parameters of the whole model.
        flops: fvcore flops (multiply-adds) of one forward pass on the example inputs.
        modules: one row per module, in model order; the model itself is the row named "".
        unsupported_ops: ops no counting rule covers, with how often each ran (their cost is
            missing from ``flops``: it is of the counted part only; ops fvcore ignores by
            design, views and casts, are not listed). An ONNX model's lists ONNX op types, and
            any op whose shapes could not be read out of the run.
        input_shapes: the shapes of the example inputs the counts are for.
    """

    params: int
    flops: int
    modules: tuple[ModuleCost, ...]
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    input_shapes: tuple[tuple[int, ...], ...] = ()

    def module(self, name: str) -> ModuleCost | None:
        """The row for the module at qualified ``name`` ("" for the model), if any."""
        return next((m for m in self.modules if m.name == name), None)


def _convolution_mode_flops(inputs: list, outputs: list) -> int:
    """fvcore's conv count for ``aten::_convolution_mode``, the op of ``padding="same"/"valid"``.

    fvcore has no handle for it (its conv handle would read the ``groups`` argument as
    ``transposed``), so these convs would silently count as zero.
    """
    from fvcore.nn.jit_handles import conv_flop_count, get_shape

    return conv_flop_count(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]), transposed=False)


def _recurrent_flops(inputs: list, outputs: list) -> int:
    """``aten::lstm``, ``aten::gru`` and ``aten::rnn_*``: every step's gate products, each layer and direction.

    fvcore has no handle for them (it lists them as not counted). Each weight matrix of the
    layer's parameters (the op's last list input) is applied once per step and sample: (steps x
    batch) x its elements, the ONNX counts' rule for ``LSTM``/``GRU``/``RNN`` nodes; elementwise
    gate arithmetic is not counted, as fvcore counts no elementwise op.
    """
    from fvcore.nn.jit_handles import get_shape

    lists = [v for v in inputs if v.node().kind() == "prim::ListConstruct"]
    weights = [get_shape(w) for w in lists[-1].node().inputs()] if lists else []
    rows = math.prod(get_shape(inputs[0])[:-1])
    return rows * sum(math.prod(w) for w in weights if w is not None and len(w) == 2)


def _recurrent_cell_flops(inputs: list, outputs: list) -> int:
    """``aten::lstm_cell``, ``aten::gru_cell`` and ``aten::rnn_*_cell``: one step's gate products, (batch) x (W_ih + W_hh elements)."""
    from fvcore.nn.jit_handles import get_shape

    return math.prod(get_shape(inputs[0])[:-1]) * sum(math.prod(get_shape(w)) for w in inputs[2:4])


RECURRENT_OPS = {"aten::lstm": _recurrent_flops, "aten::gru": _recurrent_flops, "aten::rnn_tanh": _recurrent_flops,
                 "aten::rnn_relu": _recurrent_flops, "aten::lstm_cell": _recurrent_cell_flops, "aten::gru_cell": _recurrent_cell_flops,
                 "aten::rnn_tanh_cell": _recurrent_cell_flops, "aten::rnn_relu_cell": _recurrent_cell_flops}


class _TupleOutputs(nn.Module):
    """Flattens dict and list outputs, which torch.jit tracing refuses, into a tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        leaves, _ = torch.utils._pytree.tree_flatten(self.model(*inputs))
        return tuple(leaves)


class _frozen:
    """Turns off ``requires_grad`` on every tensor the model can reach while fvcore traces it.

    torch.jit refuses to trace a tensor that requires grad and is not a registered parameter
    (a conv held only in a plain list); frozen, it becomes a constant and its conv is counted.
    """

    def __init__(self, model: nn.Module) -> None:
        tensors = list(model.parameters())
        for _, _, value in references(model):
            tensors += list(value.parameters()) if isinstance(value, nn.Module) else [value]
        self.tensors = [t for t in {id(t): t for t in tensors}.values() if t.is_leaf and t.requires_grad]

    def __enter__(self) -> None:
        for t in self.tensors:
            t.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for t in self.tensors:
            t.requires_grad_(True)


def analyze(model: nn.Module, example_inputs: Any) -> Analysis:
    """Parameters and fvcore FLOPs of ``model``, in total and per module.

    Args:
        model: any module fvcore (torch.jit tracing) can run.
        example_inputs: a tensor or tuple of tensors, as the model's forward takes them.

    Returns:
        An :class:`Analysis`; flops count one multiply-add as one flop.

    Raises:
        AnalysisError: fvcore (torch.jit tracing) cannot run the model.

    Example:
        >>> a = analyze(nn.Conv2d(16, 32, 3, bias=False), torch.randn(1, 16, 10, 10))
        >>> a.params, a.flops
        (4608, 294912)
    """
    with warnings.catch_warnings():  # fvcore's import touches deprecated torch.jit APIs
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis, parameter_count

    inputs = on_device(as_inputs(example_inputs), model_device(model))
    wrapper = _TupleOutputs(model)
    with eval_mode(model), torch.no_grad(), _frozen(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counter = FlopCountAnalysis(wrapper, inputs)
        counter.set_op_handle("aten::_convolution_mode", _convolution_mode_flops, **RECURRENT_OPS)
        counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        fvcore_log = logging.getLogger("fvcore")
        level, fvcore_log.level = fvcore_log.level, logging.ERROR
        try:
            by_module = counter.by_module()
            unsupported = dict(Counter(counter.unsupported_ops()))
        except Exception as error:  # torch.jit.trace, under fvcore, refuses some models
            raise AnalysisError(
                f"fvcore cannot count this model: torch.jit.trace fails on it ({describe_error(error)})"
            ) from error
        finally:
            fvcore_log.setLevel(level)
    params = parameter_count(model)
    modules = dict(model.named_modules())
    nested = {name: (int(params.get(name, 0)), int(by_module.get(f"model.{name}" if name else "model", 0))) for name in modules}
    rows = []
    for name, module in modules.items():
        children = [join(name, child) for child, _ in module.named_children()]
        own = [nested[name][i] - sum(nested[c][i] for c in children if c in nested) for i in (0, 1)]
        rows.append(ModuleCost(name, type(module).__name__, *nested[name], max(own[0], 0), max(own[1], 0)))
    shapes = tuple(tuple(x.shape) for x in tensors_of(inputs))
    return Analysis(
        params=int(params.get("", 0)),
        flops=int(by_module.get("model", 0)),
        modules=tuple(rows),
        unsupported_ops=unsupported,
        input_shapes=shapes,
    )
