"""Label-free distillation: fine-tune the separated model to reproduce the original's outputs.

Most users have unlabeled inputs at hand but not the labels or the training pipeline; the
original model is the teacher. The loss is the normalised squared error of every output leaf
(so logits, boxes and flow fields all work), plus, optionally, of every separated layer's
output against the dense layer it replaced (same qualified name).

Launched by ``torchrun``, every process joins the group (gloo on the CPU, NCCL on CUDA), the
student is wrapped in DistributedDataParallel, and each process takes its share of the same
seeded global batch: with gradients averaged and the loss a mean over samples (its normaliser
taken over the global batch), a step is the step one process would take on the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..core.inputs import eval_mode, model_device, on_device, run_checked
from ..core.modules import CONV_TYPES, SeparableConv
from ..core.working_copy import copy_model
from ..errors import InvalidOptionError
from ..measure.layers import pair_groups
from .batches import BATCH, calibration_batches
from .calibrate import Layer, give_biases, refit as refit_layers
from .distributed import World, all_reduce_sum, process_group
from .sampling import Sampler, as_tuple

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
REFIT_SAMPLES = 512  # the samples of the data the refit before distillation reads (all processes together)


@dataclass(frozen=True)
class Distillation:
    """A distilled model and how the loss went (one value per step, averaged over the processes).

    ``model`` is the result, as in every convtool result; ``student`` is the same model.
    ``processes`` is how many took part; ``resumed_from`` the step a checkpoint gave (0: none),
    and ``losses`` covers every step, those before the checkpoint included. ``refit`` names each
    separated layer refit on the data before the first step, with its relative output error
    after the refit (None: it did not run on the data); empty with ``refit=False``.
    """

    model: nn.Module
    losses: tuple[float, ...]
    steps: int
    seconds: float
    processes: int = 1
    resumed_from: int = 0
    refit: tuple[tuple[str, float | None], ...] = ()

    @property
    def student(self) -> nn.Module:
        """The distilled model (``model``), under the name distillation gives it."""
        return self.model


def _normalised_mse(student: Tensor, teacher: Tensor, processes: int = 1) -> Tensor:
    """Mean squared error over the teacher's mean square; with several processes, the mean square of the global batch.

    The normaliser carries no gradient, so with it shared, the mean of the processes' losses
    (what DDP's gradient averaging differentiates) is the one-process loss on the global batch.
    """
    scale = teacher.detach().float().pow(2).mean()
    if processes > 1:
        scale = all_reduce_sum(scale.clone()) / processes  # equal shares: the mean of their means
    return (student - teacher).pow(2).mean() / scale.clamp_min(1e-8)


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
    workers: int = 0,
    amp: bool = False,
    checkpoints: Any = None,
    refit: bool = True,
) -> Distillation:
    """Fine-tune a copy of ``student`` to match ``teacher`` on unlabeled ``data``.

    Under ``torchrun`` (or in a process group the caller initialised) every process runs this
    with the same arguments: the student is wrapped in DistributedDataParallel and each process
    takes ``batch_size / processes`` samples of the same seeded global batch, so N processes
    give what one process gives on the same global batch, to float rounding. Every process
    returns the same model.

    Args:
        student: the separated model (copied; the caller's is not changed).
        teacher: the original model, run in eval mode and never changed.
        data: model inputs: a tensor (rows are samples), a tuple of tensors for several
            inputs, a map-style ``Dataset`` whose items are inputs, a ``DataLoader`` (its data
            set, collate function and workers are used; the sampling is distillation's own),
            or an iterable of batches (cycled through; under torchrun each process takes every
            N-th batch, which is not the one-process run).
        steps, batch_size, lr: Adam steps with a cosine schedule; the defaults work on
            classification CNNs without tuning. ``batch_size`` is the global batch.
        seed: makes the run deterministic (on the CPU): sampling and any randomness in the model.
        features: also match each separated layer's output to the dense layer it replaced.
        freeze_batchnorm: keep BatchNorm statistics as calibrated (recommended with small data,
            and what keeps N processes equal to one). Unfrozen under torchrun, CUDA BatchNorm
            layers are synchronised (SyncBatchNorm) for the run; on the CPU, where torch has no
            synchronised BatchNorm, each process normalises over its own share.
        on_step: called with (step, loss) after each step on every process, e.g. to drive a
            progress bar.
        workers: DataLoader worker processes reading a ``Dataset`` (0 reads in this process).
        amp: mixed precision (float16 autocast and a gradient scaler), CUDA only.
        checkpoints: a :class:`convtool.io.Checkpoints`: where and how often to save the run's
            state (model, optimizer, schedule, step, random state; the main process writes),
            and whether to resume from the newest checkpoint there, bit for bit.
        refit: before the first step, refit each separated layer's last conv (with a bias) by
            least squares to reproduce the teacher's dense layer of the same name on the first
            :data:`REFIT_SAMPLES` samples of ``data``, as ``separate(calibration=...)`` does:
            gradient steps from an SVD-only start recover far less (91.5% against 99.2% on
            the digits example after 300 steps). Under torchrun every process reads the same
            samples (the sums across processes then give the one-process refit, and N
            processes stay equal to one). A resumed run takes the
            layers' shapes (the new biases) but not the refit: the checkpoint holds the weights.

    Returns:
        A :class:`Distillation` with the trained model and the loss of every step.

    Raises:
        InvalidOptionError: bad settings or data, a checkpoint from other settings, or a teacher
            with no float output to match (integer outputs such as ``argmax`` indices are left
            out of the loss).
        DistributedError: the processes torchrun started cannot form their group.

    Example:
        >>> result = distill(separate(model, x).model, model, unlabeled_images, steps=300)
        >>> result.losses[-1] < result.losses[0]
        True
    """
    if steps < 1 or batch_size < 1 or lr <= 0 or workers < 0:
        raise InvalidOptionError("steps and batch_size must be positive, lr above zero, workers zero or more")
    cuda = model_device(student).type == "cuda"
    if amp and not cuda:
        raise InvalidOptionError("mixed precision (amp) needs the model on CUDA; drop it on the CPU")
    with process_group(cuda=cuda) as world:
        return _distill(student, teacher, data, world, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                        features=features, freeze_batchnorm=freeze_batchnorm, on_step=on_step, workers=workers,
                        amp=amp, checkpoints=checkpoints, refit=refit)


def _distill(student, teacher, data, world: World, *, steps, batch_size, lr, seed, features, freeze_batchnorm, on_step,
             workers, amp, checkpoints, refit) -> Distillation:
    """:func:`distill` in a process group, as its steps: the student placed, the run resumed or begun, the
    layers refit, the optimiser made, then the steps."""
    start_time = time.perf_counter()
    student, device = _placed_student(student, world)
    config = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, features=features,
                  freeze_batchnorm=freeze_batchnorm, amp=amp, refit=refit)
    state = _agreed_state(checkpoints, config, world)
    start = state["step"] if state else 0
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise InvalidOptionError("the student has no trainable parameters")
    sampler = Sampler(data, batch_size, seed, world, start, steps, workers, pin=device.type == "cuda")
    if state and sampler.samples is not None and state.get("samples") not in (None, sampler.samples):
        raise InvalidOptionError(f"the checkpoint was made on {state['samples']} samples, the data holds "
                                 f"{sampler.samples}; resume on the same data")
    run_checked(teacher, on_device(sampler.first(), model_device(teacher)), "the distillation data (model inputs, without labels)")
    refit_errors = _refit_first(student, teacher, data, device, refit, resumed=bool(state))
    run = _Run.begin(student, params, lr, steps, amp, state, world)
    if checkpoints is not None:
        checkpoints.start(world.main)
    was_training = student.training
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices), eval_mode(teacher):  # manual_seed reseeds every GPU: restore them all
        torch.manual_seed(seed)
        if state:
            torch.set_rng_state(state["rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
        _training_mode(student, freeze_batchnorm, world, device)
        with _synced_batchnorm(student, world.size > 1 and not freeze_batchnorm and device.type == "cuda"):
            model = _wrap(student, world, device)
            pairs = _matched_features(student, teacher) if features else {}
            batches = iter(sampler)
            for step in range(start, steps):
                run.step(model, teacher, next(batches), pairs, device, world, amp)
                if checkpoints is not None and checkpoints.due(step + 1, steps):
                    checkpoints.save(step + 1, run.checkpoint(step + 1, config, sampler.samples, world, student, device), world.main)
                if on_step is not None:
                    on_step(step + 1, run.losses[-1])
    student.train(was_training)
    return Distillation(student, tuple(run.losses), steps, time.perf_counter() - start_time, world.size, start,
                        tuple(refit_errors.items()))


def _placed_student(student: nn.Module, world: World) -> tuple[nn.Module, torch.device]:
    """A copy of the student (closures too: training must not reach the caller's modules), on this process's device."""
    student = copy_model(student)[0]
    device = model_device(student)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        student.to(device)
    return student, device


def _agreed_state(checkpoints: Any, config: dict, world: World) -> dict | None:
    """The checkpoint to resume from (None: begin), the same on every process."""
    state = _resume_state(checkpoints, config)
    if world.size > 1:  # processes resuming from different steps would wait for one another's exchanges
        import torch.distributed as dist

        starts: list = [None] * world.size
        dist.all_gather_object(starts, state["step"] if state else 0)
        if len(set(starts)) > 1:
            raise InvalidOptionError(f"the processes found different checkpoints (steps {sorted(set(starts))}): put "
                                     "--checkpoint-dir on a disk every machine shares")
    return state


def _refit_first(student: nn.Module, teacher: nn.Module, data: Any, device: torch.device, refit: bool,
                 resumed: bool) -> dict[str, float | None]:
    """Each separated layer's last conv refit on the data before the first step (not when resuming); the errors left."""
    if not refit:
        return {}
    layers = matched_layers(student, teacher)
    give_biases(layers)  # before the optimizer sees the parameters, and before a checkpoint's are loaded
    if not layers or resumed:
        return {}
    teacher_device = model_device(teacher)
    if teacher_device != device:
        raise InvalidOptionError(f"the refit before distillation runs the teacher and the student on the same data: "
                                 f"put both on one device (teacher on {teacher_device}, student on {device}), "
                                 "or pass refit=False")
    with eval_mode(teacher):
        errors = refit_layers(teacher, student, layers, _refit_batches(data))
    log.info("refit %d separated layers on the data before distilling", len(layers))
    return errors


def _training_mode(student: nn.Module, freeze_batchnorm: bool, world: World, device: torch.device) -> None:
    student.train()
    if freeze_batchnorm:
        for m in student.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
    if world.size > 1 and not freeze_batchnorm and device.type != "cuda" and any(
            isinstance(m, _BatchNorm) for m in student.modules()):
        log.warning("BatchNorm is trained on %d CPU processes: torch has no synchronised BatchNorm on the CPU, so each "
                    "normalises over its own share of the batch (not the one-process run)", world.size)


def _matched_features(student: nn.Module, teacher: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Per separated layer name, its pair in the student and the dense conv of that name in the teacher."""
    pairs = {n: m for n, m in student.named_modules() if isinstance(m, SeparableConv)}
    dense = dict(teacher.named_modules())
    return {n: (pairs[n], dense[n]) for n in pairs if isinstance(dense.get(n), CONV_TYPES)}


@dataclass
class _Run:
    """The optimiser, schedule, gradient scaler and losses of one distillation."""

    optimizer: Any
    schedule: Any
    scaler: Any
    losses: list[float]

    @staticmethod
    def begin(student: nn.Module, params: list, lr: float, steps: int, amp: bool, state: dict | None, world: World) -> "_Run":
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        losses: list[float] = []
        if state:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            if amp and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            losses = list(state["losses"])
            if state.get("processes", world.size) != world.size:
                log.warning("resuming with %d processes a run made with %d: equal to float rounding, not bit for bit",
                            world.size, state["processes"])
        return _Run(optimizer, schedule, scaler, losses)

    def step(self, model: nn.Module, teacher: nn.Module, batch: Any, pairs: dict, device: torch.device, world: World,
             amp: bool) -> None:
        """One step: the teacher's outputs (and dense layers' outputs) matched, the loss kept as every process's mean."""
        teacher_device = model_device(teacher)
        with torch.no_grad(), _Capture({n: dense for n, (_, dense) in pairs.items()}) as teacher_features, _autocast(amp):
            target, _ = tree_flatten(teacher(*on_device(batch, teacher_device)))
        target = on_device(target, device)
        with _Capture({n: pair for n, (pair, _) in pairs.items()}) as student_features, _autocast(amp):
            output, _ = tree_flatten(model(*on_device(batch, device)))
        matched_outputs = [(s.float(), t.float()) for s, t in zip(output, target) if _float(t)]
        if not matched_outputs:
            raise InvalidOptionError(
                "the model has no float output to distil on (integer outputs such as argmax indices have no gradient)")
        loss = sum(_normalised_mse(s, t, world.size) for s, t in matched_outputs)
        for name in pairs:
            feature = _normalised_mse(student_features.outputs[name].float(),
                                      on_device(teacher_features.outputs[name], device).float(), world.size)
            loss = loss + feature / max(len(pairs), 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.losses.append(float(all_reduce_sum(loss.detach().clone())) / world.size)

    def checkpoint(self, step: int, config: dict, samples: int | None, world: World, student: nn.Module,
                   device: torch.device) -> dict:
        return dict(
            format=CHECKPOINT_FORMAT, step=step, config=config, samples=samples, processes=world.size,
            model=student.state_dict(), optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
            scaler=self.scaler.state_dict(), losses=list(self.losses), rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        )


def matched_layers(student: nn.Module, teacher: nn.Module) -> list[Layer]:
    """The student's separated layers, each with the teacher's dense weight of the same name and shape.

    Separated layers keep the qualified name of the conv they replaced (``layer1.0.conv1``
    stands where ``layer1.0.conv1.weight`` was); pairs sharing their factors are one layer
    (:func:`~convtool.measure.layers.pair_groups`, as the report groups them).
    A pair with no such weight in the teacher (renamed, or computed by a parametrization) is
    left as it is, and said so in the log.
    """
    dense = dict(teacher.named_parameters(remove_duplicate=False))
    layers = []
    for names, pairs in pair_groups(student):
        name = names[0]
        weight = dense.get(f"{name}.weight" if name else "weight")
        with torch.no_grad():
            shape = tuple(pairs[0].weight.shape)
        if weight is None or tuple(weight.shape) != shape:
            log.info("%s: no dense weight of its name and shape in the teacher; it is distilled without a refit", name)
            continue
        layers.append(Layer(name, weight, pairs))
    return layers


def _refit_batches(data: Any) -> Any:
    """The first :data:`REFIT_SAMPLES` samples of ``data``, as calibration batches.

    Tensors are cut in rows, a map-style data set read through a loader of its own (never all
    in memory), any other iterable taken batch by batch. Every process of a group reads the
    same samples: the refit then sums identical equations and gives every process the
    one-process refit, so N processes still give what one gives (a refit on each process's
    share would not: each layer's inputs depend on the order its predecessors were fit in).
    """
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        collate, data = data.collate_fn, data.dataset
    else:
        collate = None
    if isinstance(data, Tensor):
        data = (data,)
    if isinstance(data, tuple) and all(isinstance(t, Tensor) for t in data):
        return calibration_batches(tuple(t[:REFIT_SAMPLES] for t in data))
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        share = torch.utils.data.Subset(data, range(min(len(data), REFIT_SAMPLES)))
        return calibration_batches(DataLoader(share, batch_size=BATCH, collate_fn=collate,
                                              generator=torch.Generator().manual_seed(0)))
    taken, seen = [], 0
    for batch in data:
        taken.append(as_tuple(batch))
        seen += len(taken[-1][0])
        if seen >= REFIT_SAMPLES:
            break
    return calibration_batches(taken)


def _resume_state(checkpoints: Any, config: dict) -> dict | None:
    """The newest checkpoint's state when resuming, checked against this run's settings."""
    if checkpoints is None or not checkpoints.resume:
        return None
    state = checkpoints.newest()
    if state is None:
        log.info("no checkpoint in %s: starting from step 0", checkpoints.folder)
        return None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidOptionError(f"the checkpoints in {checkpoints.folder} are not convtool distillation checkpoints")
    different = [f"{key} {state['config'].get(key)!r} (now {value!r})" for key, value in config.items()
                 if state["config"].get(key) != value]
    if different:
        raise InvalidOptionError(f"the checkpoint in {checkpoints.folder} was made with other settings: "
                                 f"{', '.join(different)}; resume with the same ones")
    return state


def _wrap(student: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The student in DistributedDataParallel when there are several processes; the student itself otherwise."""
    if world.size == 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)


def _autocast(amp: bool):
    return torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()


@contextlib.contextmanager
def _synced_batchnorm(model: nn.Module, sync: bool) -> Iterator[None]:
    """Every BatchNorm replaced by a SyncBatchNorm sharing its parameters and statistics, for the block.

    The originals go back afterwards, trained in place: the result holds no SyncBatchNorm,
    which would neither export nor run outside a process group.
    """
    if not sync:
        yield
        return
    swapped = []
    for name, m in list(model.named_modules()):
        if name and isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            synced = nn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            synced.weight, synced.bias = m.weight, m.bias
            if m.track_running_stats:
                synced.running_mean, synced.running_var = m.running_mean, m.running_var
                synced.num_batches_tracked = m.num_batches_tracked
            synced.train(m.training)
            _set_module(model, name, synced)
            swapped.append((name, m))
    try:
        yield
    finally:
        for name, m in swapped:
            _set_module(model, name, m)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


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
