"""Example inputs: one normal form, the model's device, a guess from the model, and runs that leave it as it was."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import SequenceKey, tree_flatten, tree_flatten_with_path, tree_map

from ..errors import InvalidOptionError
from .modules import CONV_TYPES
from .names import describe_error


def as_inputs(example_inputs: Any) -> tuple:
    """A tuple of example inputs from a tensor, a list or a tuple (``None`` gives ``()``).

    A dict is one input (a forward taking a dict), not a set of keyword arguments.
    """
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def tensors_of(inputs: tuple) -> list[torch.Tensor]:
    """The tensors of nested inputs, in the order ONNX flattens them."""
    leaves, _ = tree_flatten(inputs)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def flatten_with_paths(tree: Any) -> tuple[list[tuple[tuple, Any]], Any]:
    """``tree_flatten_with_path``, or where a pytree node was registered without key paths, the leaves by position.

    diffusers registers its output dataclasses with ``register_pytree_node`` and no
    ``flatten_with_keys_fn``: their leaves have no keys, but they have an order.
    """
    try:
        return tree_flatten_with_path(tree)
    except ValueError as error:
        if "flatten_with_keys_fn" not in str(error):
            raise
        leaves, spec = tree_flatten(tree)
        return [((SequenceKey(i),), leaf) for i, leaf in enumerate(leaves)], spec


def batch_size(inputs: tuple) -> int:
    """The first dimension of the first tensor with one: the batch the inputs hold."""
    return next((x.shape[0] for x in tensors_of(inputs) if x.dim() > 0), 1)


def has_batch(x: Any, batch: int) -> bool:
    """Whether ``x`` is a tensor whose first dimension is the inputs' batch (a per-sample tensor)."""
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch


def batch_dim(x: Any, n: int, like: Any = None) -> int | None:
    """Which dimension of ``x`` holds the ``n`` samples of a batch, or None (it goes whole with every sample).

    Dimension 0 where it has ``n`` rows; else the one dimension of size ``n``: a recurrent state
    in ``nn.GRU``/``nn.LSTM``'s layout ``(layers, batch, hidden)`` holds them on dimension 1.
    ``like``, the same input of the example inputs, tells them apart where that is not enough:
    the batch is the one dimension in which the two differ (their batches differ). A state of as
    many layers as samples, given with example inputs of the same batch, cannot be told apart:
    dimension 0 is taken.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    sized = [d for d in range(x.dim()) if x.shape[d] == n]
    if isinstance(like, torch.Tensor) and like.dim() == x.dim():
        differ = [d for d in range(x.dim()) if x.shape[d] != like.shape[d]]
        if len(differ) == 1 and differ[0] in sized:
            return differ[0]
    if 0 in sized or len(sized) > 1:
        return 0 if 0 in sized else None
    return sized[0] if sized else None


def samples_of(batch: tuple, start: int, stop: int, like: tuple = ()) -> tuple:
    """Samples ``start:stop`` of a batch of tensors, each cut along the dimension holding its samples
    (:func:`batch_dim`, the first tensor's dimension 0 giving their number); one holding none goes whole."""
    n = batch[0].shape[0] if batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() else 0
    likes = list(like) + [None] * (len(batch) - len(like))
    cut = []
    for x, twin in zip(batch, likes):
        d = batch_dim(x, n, twin)
        cut.append(x.narrow(d, start, max(min(stop, n) - start, 0)) if d is not None else x)
    return tuple(cut)


def batched(inputs: tuple, size: int) -> tuple:
    """The inputs with every per-sample tensor cut or repeated to ``size`` rows.

    A tensor whose first dimension is not the batch of the first input (a (C,) scale, say)
    is left as it is.
    """
    batch = batch_size(inputs)

    def resize(x: Any) -> Any:
        if has_batch(x, batch):
            reps = -(-size // x.shape[0])
            return x.repeat(reps, *([1] * (x.dim() - 1)))[:size]
        return x

    return tree_map(resize, inputs)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def on_device(inputs: Any, device: torch.device) -> Any:
    """``inputs`` with every tensor, however nested, moved to ``device``."""
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, inputs)


def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first conv of any kind (in module order): the image or audio channels, usually."""
    conv = next((m for m in model.modules() if isinstance(m, CONV_TYPES)), None)
    return conv.in_channels if conv is not None else None


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """A typical input for the model's first conv, by its dimensionality; None without a conv.

    Images (1, C, 224, 224); volumes and clips (1, C, 16, 112, 112); 1-d signals (1, C, 16000),
    a second of 16 kHz audio, when C is 1 or 2 (waveforms), else (1, C, 3000), a 30 s window of
    feature frames (mel spectrograms).
    """
    conv = next((m for m in model.modules() if isinstance(m, CONV_TYPES)), None)
    if conv is None:
        return None
    c, dims = conv.in_channels, len(conv.kernel_size)
    if dims == 1:
        return (1, c, 16000 if c <= 2 else 3000)
    return (1, c, 224, 224) if dims == 2 else (1, c, 16, 112, 112)


def guess_inputs(model: nn.Module) -> tuple[tuple, str | None]:
    """Seeded random inputs of :func:`default_input_shape`.

    Returns the inputs and ``None``, or ``()`` and why no such input runs the model.
    """
    shape = default_input_shape(model)
    if shape is None:
        return (), "the model has no conv to infer an input shape from"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=model_dtype(model)).to(model_device(model))
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except Exception as error:
        return (), f"the model does not run on a {shape} input ({describe_error(error)})"
    return (x,), None


@contextlib.contextmanager
def running(inputs: tuple, what: str = "the example inputs") -> Iterator[None]:
    """Turns a failure of the model on ``inputs`` inside the block into a one-line error naming ``what``.

    Wrong inputs are a user mistake: they get :class:`InvalidOptionError`, not torch's traceback.
    """
    try:
        yield
    except InvalidOptionError:
        raise
    except Exception as error:
        shapes = ", ".join("x".join(map(str, t.shape)) + f" {str(t.dtype).removeprefix('torch.')}" for t in tensors_of(inputs))
        advice = "give inputs its forward takes"
        if isinstance(error, TypeError) and "keyword-only argument" in str(error):
            advice = "convtool passes inputs positionally: wrap the model in a module whose forward takes them so"
        raise InvalidOptionError(f"the model does not run on {what} ({shapes or 'no tensors'}: {describe_error(error)}); {advice}") from None


def run_checked(model: nn.Module, inputs: tuple, what: str = "the example inputs") -> Any:
    """The model's output on ``inputs`` (eval mode, no gradients), or a one-line error naming ``what``."""
    with running(inputs, what), eval_mode(model), torch.no_grad():
        return model(*inputs)


class eval_mode:
    """Runs a block with every module in eval mode (BatchNorm statistics untouched), then restores each one's mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.modes = model, {}

    def __enter__(self) -> nn.Module:
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes.items():
            module.training = mode


class kept_state:
    """Runs a block in the model's own train/eval mode, then restores every buffer and the RNG.

    For a pass that must see training-only branches without updating BatchNorm statistics or
    consuming the caller's random stream.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.rng = torch.random.fork_rng(devices=[])
        self.rng.__enter__()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)


class train_mode:
    """Runs a block with every module in train mode when none is (an eval-mode model), then restores each one's mode.

    A model already training keeps its own modes (a frozen BatchNorm stays frozen). Buffers and
    the random stream are the caller's to keep (:class:`kept_state`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model, self.modes = model, {}

    def __enter__(self) -> nn.Module:
        self.modes = {m: m.training for m in self.model.modules()}
        if not any(self.modes.values()):
            self.model.train()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes.items():
            module.training = mode
