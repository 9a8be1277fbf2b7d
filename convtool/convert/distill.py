"""Label-free distillation: fine-tune the separated model to reproduce the original's outputs.

Most users have unlabeled inputs at hand but not the labels or the training pipeline; the
original model is the teacher. The loss is the normalised squared error of every output leaf
(so logits, boxes and flow fields all work), plus, optionally, of every separated layer's
output against the dense layer it replaced (same qualified name).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten

from ..core.inputs import eval_mode, model_device, on_device, run_checked
from ..core.modules import CONV_TYPES, SeparableConv
from ..errors import InvalidOptionError
from .bake import copy_model
from .calibrate import calibration_batches


@dataclass(frozen=True)
class Distillation:
    """A distilled model and how the loss went (one value per step).

    ``model`` is the result, as in every convtool result; ``student`` is the same model.
    """

    model: nn.Module
    losses: tuple[float, ...]
    steps: int
    seconds: float

    @property
    def student(self) -> nn.Module:
        """The distilled model (``model``), under the name distillation gives it."""
        return self.model


def _normalised_mse(student: Tensor, teacher: Tensor) -> Tensor:
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-8)


class _Sampler:
    """Seeded minibatches: random rows of in-memory tensors, or a cycle over given batches."""

    def __init__(self, data: Any, batch_size: int, generator: torch.Generator) -> None:
        if isinstance(data, Tensor):
            data = (data,)
        if isinstance(data, tuple) and all(isinstance(t, Tensor) for t in data):
            if data[0].shape[0] == 0 or any(t.shape[0] != data[0].shape[0] for t in data):
                raise InvalidOptionError("distillation tensors must share a non-empty first (batch) dimension")
            self.tensors, self.batches = data, None
        else:
            self.tensors, self.batches = None, calibration_batches(data)
        self.batch_size, self.generator, self.i = batch_size, generator, 0

    def first(self) -> tuple:
        """A sample of the data, drawn without moving the seeded sequence."""
        return tuple(t[:1] for t in self.tensors) if self.tensors is not None else self.batches[0]

    def next(self) -> tuple:
        if self.tensors is not None:
            n = self.tensors[0].shape[0]
            index = torch.randint(0, n, (min(self.batch_size, n),), generator=self.generator)
            return tuple(t[index] for t in self.tensors)
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    features: bool = False,
    freeze_batchnorm: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Distillation:
    """Fine-tune a copy of ``student`` to match ``teacher`` on unlabeled ``data``.

    Args:
        student: the separated model (copied; the caller's is not changed).
        teacher: the original model, run in eval mode and never changed.
        data: model inputs: a tensor (rows are samples), a tuple of tensors for several
            inputs, or an iterable of batches.
        steps, batch_size, lr: Adam steps with a cosine schedule; the defaults work on
            classification CNNs without tuning.
        seed: makes the run deterministic (on the CPU): sampling and any randomness in the model.
        features: also match each separated layer's output to the dense layer it replaced.
        freeze_batchnorm: keep BatchNorm statistics as calibrated (recommended with small data).
        on_step: called with (step, loss) after each step, e.g. to drive a progress bar.

    Returns:
        A :class:`Distillation` with the trained model and the loss of every step.

    Raises:
        InvalidOptionError: bad settings or data, or a teacher with no float output to match
            (integer outputs such as ``argmax`` indices are left out of the loss).

    Example:
        >>> result = distill(separate(model, x).model, model, unlabeled_images, steps=300)
        >>> result.losses[-1] < result.losses[0]
        True
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise InvalidOptionError("steps and batch_size must be positive, lr above zero")
    start = time.perf_counter()
    student = copy_model(student)[0]  # closures too: training must not reach the caller's modules
    device = model_device(student)
    generator = torch.Generator().manual_seed(seed)
    sampler = _Sampler(data, batch_size, generator)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise InvalidOptionError("the student has no trainable parameters")
    run_checked(teacher, on_device(sampler.first(), model_device(teacher)), "the distillation data (model inputs, without labels)")
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    pairs = {n: m for n, m in student.named_modules() if isinstance(m, SeparableConv)} if features else {}
    dense = dict(teacher.named_modules())
    matched = {n: dense[n] for n in pairs if isinstance(dense.get(n), CONV_TYPES)}
    losses: list[float] = []
    was_training = student.training
    with torch.random.fork_rng(devices=[]), eval_mode(teacher):
        torch.manual_seed(seed)
        student.train()
        if freeze_batchnorm:
            for m in student.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        for step in range(steps):
            batch = on_device(sampler.next(), device)
            with torch.no_grad(), _Capture(matched) as teacher_features:
                target, _ = tree_flatten(teacher(*batch))
            with _Capture({n: pairs[n] for n in matched}) as student_features:
                output, _ = tree_flatten(student(*batch))
            matched_outputs = [(s, t) for s, t in zip(output, target) if _float(t)]
            if not matched_outputs:
                raise InvalidOptionError(
                    "the model has no float output to distil on (integer outputs such as argmax indices have no gradient)"
                )
            loss = sum(_normalised_mse(s, t) for s, t in matched_outputs)
            for name in matched:
                loss = loss + _normalised_mse(student_features.outputs[name], teacher_features.outputs[name]) / max(len(matched), 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, losses[-1])
    student.train(was_training)
    return Distillation(student, tuple(losses), steps, time.perf_counter() - start)


def _float(value: object) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


class _Capture:
    """Forward hooks keeping the first output of each named module during one pass."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules, self.outputs, self.handles = modules, {}, []

    def __enter__(self) -> "_Capture":
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(lambda m, i, o, name=name: self.outputs.setdefault(name, o)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
