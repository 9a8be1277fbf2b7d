"""Example inputs: one normal form, the model's device, and runs that leave the model as it was."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def as_inputs(example_inputs: Any) -> tuple:
    """A tuple of example inputs from a tensor, a list or a tuple (``None`` gives ``()``)."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def on_device(inputs: tuple, device: torch.device) -> tuple:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


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
