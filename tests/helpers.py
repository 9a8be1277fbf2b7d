"""Assertions shared by the test modules."""

from __future__ import annotations

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
