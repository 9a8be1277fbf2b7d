"""Assertions shared by the test modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils._pytree import tree_flatten


def assert_outputs_close(actual, expected, **tolerances) -> None:
    """assert_close leaf by leaf over tuple, list and dict outputs, with the same structure."""
    a_leaves, a_spec = tree_flatten(actual)
    e_leaves, e_spec = tree_flatten(expected)
    assert a_spec == e_spec, f"output structure changed: {a_spec} != {e_spec}"
    for a, e in zip(a_leaves, e_leaves):
        torch.testing.assert_close(a, e, **tolerances)


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


# An independent proof that a separation's layers run: forward hooks count the calls of the
# pairs at each reported name, and a TorchFunctionMode records the weight of every conv call.
# Nothing here reads what convtool measured (LayerChange.calls, its own recorder).


_CONV_FUNCTIONS = {
    getattr(torch, f"conv{kind}{d}d") for kind in ("", "_transpose") for d in (1, 2, 3)
} | {getattr(torch.nn.functional, f"conv{kind}{d}d") for kind in ("", "_transpose") for d in (1, 2, 3)}


class ConvWeightRecorder(torch.overrides.TorchFunctionMode):
    """Records the weight tensor of every conv and transposed conv call (1-, 2- and 3-d) made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV_FUNCTIONS:
            self.weights.append(args[1] if len(args) > 1 else kwargs["weight"])
        return func(*args, **kwargs)


def module_at(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module at a reported qualified name; ``"<model>"`` (and ``""``) is the model itself."""
    return model if name in ("", "<model>") else model.get_submodule(name)


class eval_mode:
    """Every module of ``model`` in eval mode inside the block, each one's own mode restored after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for module, mode in self.modes:
            module.training = mode


@dataclass
class WatchedRun:
    """One forward pass: its output, the forward calls of the module at each watched name, every conv2d weight used."""

    output: Any
    calls: dict[str, int]
    conv_weights: list[torch.Tensor]

    def used(self, tensor: torch.Tensor) -> bool:
        """Whether a conv2d call used this very tensor as its weight."""
        return any(w is tensor for w in self.conv_weights)

    def used_value(self, tensor: torch.Tensor) -> bool:
        """Whether a conv2d call used a weight equal to ``tensor`` (same shape and values)."""
        return any(w.shape == tensor.shape and w.dtype == tensor.dtype and torch.equal(w, tensor) for w in self.conv_weights)


def watch_run(model: torch.nn.Module, inputs: tuple, names: Iterable[str]) -> WatchedRun:
    """Run ``model(*inputs)`` once without gradients, in its own train/eval mode, watching ``names``."""
    modules = {name: module_at(model, name) for name in names}
    counts: dict[int, int] = {}

    def count(module, args, output) -> None:
        counts[id(module)] = counts.get(id(module), 0) + 1

    handles = [m.register_forward_hook(count) for m in {id(m): m for m in modules.values()}.values()]
    recorder = ConvWeightRecorder()
    try:
        with torch.no_grad(), recorder:
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return WatchedRun(output, {name: counts.get(id(m), 0) for name, m in modules.items()}, recorder.weights)


def _dense_weights(original: torch.nn.Module, layer) -> list[torch.Tensor]:
    """The caller's dense weights a layer stands for, read at every name of the layer the caller has."""
    found = []
    for name in (layer.name, *layer.aliases):
        try:
            if layer.source == "function":
                found.append(original.get_parameter(name))
            else:
                found.append(module_at(original, name).weight)
        except AttributeError:  # a name only the separated model has (a functional conv's other setting)
            parent = name.rpartition(".")[0]  # or a conv subclass's stand-in behind its padding step
            if layer.source == "module" and name.endswith(".conv") and parent:
                try:
                    found.append(module_at(original, parent).weight)
                except AttributeError:
                    pass
            continue
    return found


def assert_layers_proven(result, original: torch.nn.Module, inputs: tuple) -> WatchedRun:
    """Check every layer ``result`` reports against one run of ``result.model``, trusting no number of convtool's.

    For each layer: a ``SeparableConv`` sits at its name and every alias, its pairs share their
    depthwise and pointwise weights, and each pair ran (a training-only one, of an eval-mode
    model, in a train-mode run of a copy). No conv call of the run used the caller's
    dense weight of a separated layer, by identity (a reference leaking into the caller's model)
    or by value (a copy of it still running). A weight computed on access (a parametrization) has
    no stable identity, so it is checked by value only, as the caller's model computes it in eval mode.
    """
    from convtool import SeparableConv

    names = [n for layer in result.layers for n in (layer.name, *layer.aliases)]
    for layer in result.layers:
        pairs = [module_at(result.model, n) for n in (layer.name, *layer.aliases)]
        assert all(isinstance(p, SeparableConv) for p in pairs), (layer.name, [type(p).__name__ for p in pairs])
        assert all(p.depthwise.weight is pairs[0].depthwise.weight for p in pairs), layer.name
        assert all(p.pointwise.weight is pairs[0].pointwise.weight for p in pairs), layer.name
    run = watch_run(result.model, inputs, names)
    missing = [n for n, c in run.calls.items() if not c]
    if missing and not result.model.training:  # training-only convs (an aux head): they must run in train mode, on a copy
        import copy

        trained = watch_run(copy.deepcopy(result.model).train(), inputs, missing)
        missing = [n for n, c in trained.calls.items() if not c]
    assert not missing, f"pairs that did not run: {missing}"
    with eval_mode(original), torch.no_grad():
        dense = {layer.name: _dense_weights(original, layer) for layer in result.layers}
    for name, weights in dense.items():
        assert weights, f"{name}: no dense weight of the caller's model found at its names"
        for weight in weights:
            if isinstance(weight, torch.nn.Parameter):
                assert not run.used(weight), f"{name}: the caller's dense weight still runs"
            assert not run.used_value(weight.detach()), f"{name}: a copy of the dense weight still runs"
    return run
