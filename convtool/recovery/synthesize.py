"""Data-free calibration: inputs synthesised from the trained model alone.

Without unlabeled data the refit has nothing to fit on. A trained model still remembers what
its data looked like: every BatchNorm stores the mean and variance its input had over the
training set. Optimising random inputs until each BatchNorm's batch statistics match its stored
ones (ZeroQ, Cai et al. 2020; DeepInversion, Yin et al. 2020) gives inputs whose activations
are, layer by layer, distributed like real data's, which is all the least-squares refit and the
distillation need: they match the dense layers' outputs, whatever the inputs depict.

The objective, per batch: the sum over BatchNorms of ``‖mean - running_mean‖ + ‖var -
running_var‖`` of its input; a small input prior (total variation and L2, as DeepInversion);
and, for classifier-like outputs ((batch, classes) floats), the cross-entropy to classes assigned
round-robin, so the samples spread over every class rather than collapsing on a few. A model
without BatchNorm gets the output objective and the prior alone (logged, and said in the
result); a model with neither is refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten

from ..core.inputs import as_inputs, eval_mode, model_device, model_dtype, running
from ..core.working_copy import working_copy
from ..errors import InvalidOptionError

log = logging.getLogger(__name__)

# Defaults measured on the digits CNN at 0.25 of its FLOPs (benchmarks/RESULTS.md, "Data-free
# calibration"; original 99.33%): 256 samples at 300 steps per batch gave 98.22-98.67% over three
# seeds (200 steps: 98.00-99.11%; 1024 samples at 50 steps, the same time: 95.56%); the output
# term at weight 1 did at least as well as 0.1 or none; DeepInversion's jitter (``jitter=1``)
# did not help on 8x8 digits (98.22-98.44%), so it is off.
SAMPLES = 256  # what calibration="synthetic" makes
STEPS = 300
BATCH = 64
OUTPUT_WEIGHT = 1.0
TV_WEIGHT = 1e-3
L2_WEIGHT = 1e-4
# Below this many input elements per batch the loop runs on one thread: synchronising threads
# costs more than they save on such small tensors, and on a shared 2-core machine OpenMP's
# spin-waits made 2 threads 7-10x slower than 1 on the digits CNN (3 s against 21-35 s).
ONE_THREAD_BELOW = 1 << 16


@dataclass(frozen=True)
class Synthesis:
    """Inputs made from a model alone, and how they were made.

    Attributes:
        inputs: the synthetic inputs, a tensor (a tuple of tensors for a model of several inputs).
        objective: ``"batchnorm+output"``, ``"batchnorm"`` or ``"output"``: what they were fit to.
        batchnorms: how many BatchNorm layers' statistics they match.
        steps: Adam steps per batch.
        seconds: wall time of the synthesis.
        losses: the objective's value at the last step of each batch.
        note: one line saying what was done, for a report or a CLI.
    """

    inputs: Any = field(repr=False, compare=False)
    objective: str
    batchnorms: int
    steps: int
    seconds: float
    losses: tuple[float, ...]
    note: str


def synthesize(
    model: nn.Module,
    example_inputs: Any,
    n: int = SAMPLES,
    *,
    seed: int = 0,
    steps: int = STEPS,
    batch_size: int = BATCH,
    output_weight: float = OUTPUT_WEIGHT,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Any:
    """Synthesise ``n`` model inputs whose activations look like the training data's.

    Inputs of the example input's shape (batch dimension replaced) start as seeded Gaussian
    noise and are optimised with Adam, ``batch_size`` at a time, so that the batch mean and
    variance reaching every BatchNorm match the running statistics it stored in training (plus
    a small smoothness prior and, for a classifier, confident outputs spread over all classes).
    Use them as ``calibration`` and distillation data when no real data can be had; save them
    with ``torch.save`` to reuse.

    Args:
        model: the trained model (copied; the caller's is never changed, nor its gradients).
        example_inputs: one input batch as the forward takes it (a tensor or a tuple of
            tensors); only shapes, dtype and device are read.
        n: how many samples to make.
        seed: makes the result deterministic (on the CPU).
        steps: Adam steps per batch.
        batch_size: samples optimised together (BatchNorm statistics are batch statistics:
            larger batches match them better).
        output_weight: weight of the output (class) term beside the BatchNorm term; 0 drops it
            where BatchNorm statistics exist.
        on_step: called with (steps done, steps in all, loss) after every step, e.g. to drive
            a progress bar.

    Returns:
        A tensor of ``n`` samples (a tuple of tensors for a model of several inputs).

    Raises:
        InvalidOptionError: bad settings or inputs, or a model with neither BatchNorm
            statistics nor a (batch, classes) float output to synthesise from.

    Example:
        >>> images = convtool.synthesize(model, torch.randn(1, 3, 32, 32), 256, seed=0)
        >>> torch.save(images, "synthetic.pt")
        >>> result = convtool.separate(model, images[:1], rank=convtool.FlopsTarget(0.25), calibration=images)
    """
    return synthesis(model, example_inputs, n, seed=seed, steps=steps, batch_size=batch_size,
                     output_weight=output_weight, on_step=on_step).inputs


def synthesis(
    model: nn.Module,
    example_inputs: Any,
    n: int = SAMPLES,
    *,
    seed: int = 0,
    steps: int = STEPS,
    batch_size: int = BATCH,
    output_weight: float = OUTPUT_WEIGHT,
    lr: float = 0.1,
    jitter: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Synthesis:
    """:func:`synthesize`, returning the :class:`Synthesis` record (what was matched, time, losses)."""
    if n < 1 or steps < 1 or batch_size < 1 or lr <= 0 or output_weight < 0:
        raise InvalidOptionError("n, steps and batch_size must be positive, lr above zero and output_weight not negative")
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) and t.dim() >= 1 and t.is_floating_point() for t in inputs):
        raise InvalidOptionError(
            "synthesis needs example inputs as float tensors with a batch dimension (a tensor or a tuple of tensors); "
            "a dict or integer inputs (token ids) cannot be optimised"
        )
    start = time.perf_counter()
    teacher = working_copy(model).eval().requires_grad_(False)
    device, dtype = model_device(teacher), model_dtype(teacher)
    norms = [m for m in teacher.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None]
    classes = _classes(teacher, inputs)
    if not norms and classes is None:
        raise InvalidOptionError(
            "the model has no BatchNorm statistics and no (batch, classes) float output to synthesise inputs from; "
            "give real unlabeled inputs as calibration data instead"
        )
    use_output = classes is not None and (output_weight > 0 or not norms)
    objective = "+".join(part for part, on in (("batchnorm", bool(norms)), ("output", use_output)) if on)
    if not norms:
        log.warning("the model has no BatchNorm statistics: synthesising inputs from its outputs alone (weaker than real data)")
    generator = torch.Generator().manual_seed(seed)
    made: list[list[Tensor]] = [[] for _ in inputs]
    losses: list[float] = []
    total, done = -(-n // batch_size) * steps, 0
    small = batch_size * sum(t[:1].numel() for t in inputs) < ONE_THREAD_BELOW
    with torch.random.fork_rng(devices=[]), _Statistics(norms) as stats, eval_mode(teacher), _threads(1 if small else None):
        for first in range(0, n, batch_size):
            size = min(batch_size, n - first)
            xs = [torch.randn((size, *t.shape[1:]), generator=generator, dtype=torch.float32).to(device=device, dtype=t.dtype)
                  .requires_grad_(True) for t in inputs]
            targets = torch.arange(first, first + size, device=device) % classes if use_output else None
            optimizer = torch.optim.Adam(xs, lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
            for _ in range(steps):
                stats.loss = torch.zeros((), device=device, dtype=dtype)
                output = teacher(*(_jitter(x, jitter, generator) for x in xs))
                loss = stats.loss + sum(_prior(x) for x in xs)
                if targets is not None:
                    logits = tree_flatten(output)[0][0]
                    loss = loss + (output_weight if norms else 1.0) * F.cross_entropy(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                done += 1
                if on_step is not None:
                    on_step(done, total, float(loss.detach()))
            losses.append(float(loss.detach()))
            for store, x in zip(made, xs):
                store.append(x.detach())
    data = [torch.cat(store) for store in made]
    what = {"batchnorm+output": f"{len(norms)} BatchNorms' statistics and confident outputs over {classes} classes",
            "batchnorm": f"{len(norms)} BatchNorms' statistics",
            "output": f"confident outputs over {classes} classes (the model has no BatchNorm: weaker than real data)"}[objective]
    seconds = time.perf_counter() - start
    note = f"synthesised {n} inputs matching {what} in {seconds:.1f} s"
    return Synthesis(data[0] if len(data) == 1 else tuple(data), objective, len(norms), steps, seconds, tuple(losses), note)


def _classes(model: nn.Module, inputs: tuple) -> int | None:
    """Classes of a classifier-like model (its first output leaf is a (batch, classes) float), else None."""
    probe = tuple(t[:2] if t.shape[0] >= 2 else torch.cat([t, t]) for t in inputs)
    with running(probe, "the example inputs"), torch.no_grad():
        leaves = tree_flatten(model(*probe))[0]
    first = leaves[0] if leaves else None
    if isinstance(first, Tensor) and first.is_floating_point() and first.dim() == 2 and first.shape[0] == 2 and first.shape[1] >= 2:
        return int(first.shape[1])
    return None


def _jitter(x: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    """``x`` rolled by a random shift of up to ``pixels`` along each spatial dimension (DeepInversion's jitter)."""
    if pixels <= 0 or x.dim() < 3:
        return x
    dims = tuple(range(2, x.dim()))
    shifts = tuple(torch.randint(-pixels, pixels + 1, (len(dims),), generator=generator).tolist())
    return x.roll(shifts, dims)


def _prior(x: Tensor) -> Tensor:
    """DeepInversion's image prior: squared total variation over spatial dimensions, and a little L2."""
    loss = L2_WEIGHT * x.pow(2).mean()
    for dim in range(2, x.dim()):
        if x.shape[dim] > 1:
            loss = loss + TV_WEIGHT * x.diff(dim=dim).pow(2).mean()
    return loss


class _threads:
    """Runs a block with torch's intra-op threads set to ``count`` (unchanged for None), then restores them."""

    def __init__(self, count: int | None) -> None:
        self.count, self.before = count, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.count is not None:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


class _Statistics:
    """Forward pre-hooks adding, per BatchNorm, how far its input's batch statistics are from the running ones."""

    def __init__(self, norms: list[_BatchNorm]) -> None:
        self.norms, self.handles, self.loss = norms, [], torch.zeros(())

    def __enter__(self) -> "_Statistics":
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.norms]
        return self

    def _hook(self, module: _BatchNorm, args: tuple) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.loss = self.loss + (mean - module.running_mean).norm() + (var - module.running_var).norm()

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
