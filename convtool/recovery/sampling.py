"""Each process's share of distillation's seeded global batches, and the step-indexed order behind it.

One seeded order of samples per step, each process taking its slice, indexed by step rather
than drawn as it goes: a resumed run reads exactly what the killed one would have, and one
process draws exactly what ``distill`` always drew.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import InvalidOptionError
from .batches import calibration_batches
from .distributed import World


class Sampler:
    """This process's share of each step's seeded global batch.

    Tensors: random rows (with replacement) drawn from one seeded generator, as one process
    always drew them. A map-style Dataset (or a DataLoader over one): the same indices, read by
    a DataLoader with workers. Any other iterable of batches is cycled through, process ``r``
    taking batches ``r, r + size, ...``. Starting at step ``start`` replays the draws before it,
    so a resumed run reads what the uninterrupted run read.
    """

    def __init__(self, data: Any, batch_size: int, seed: int, world: World, start: int, steps: int,
                 workers: int, pin: bool) -> None:
        self.world, self.start = world, start
        self.tensors = self.dataset = self.batches = None
        loader = data if isinstance(data, DataLoader) else None
        if loader is not None and not isinstance(loader.dataset, IterableDataset):
            data = loader.dataset
        if isinstance(data, Tensor):
            data = (data,)
        if isinstance(data, tuple) and all(isinstance(t, Tensor) for t in data):
            if data[0].dim() == 0 or data[0].shape[0] == 0 or any(t.dim() == 0 or t.shape[0] != data[0].shape[0] for t in data):
                raise InvalidOptionError("distillation tensors must share a non-empty first (batch) dimension")
            self.tensors, self.samples = data, data[0].shape[0]
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
            self.dataset, self.samples = data, len(data)
            if self.samples == 0:
                raise InvalidOptionError("the distillation data set is empty")
        else:
            self.samples = None
            self.batches = data if isinstance(data, DataLoader) else calibration_batches(data)
        if self.samples is not None:
            self.global_batch = min(batch_size, self.samples)
            if self.global_batch % world.size:
                raise InvalidOptionError(
                    f"a batch of {self.global_batch} does not split evenly over {world.size} processes; "
                    f"give a batch size that is a multiple of {world.size}")
        self.indices = StepIndices(self.samples, self.global_batch, seed, world, start, steps) if self.samples else None
        if self.dataset is not None:
            self.loader = DataLoader(
                self.dataset, batch_sampler=self.indices, num_workers=workers, pin_memory=pin,
                collate_fn=loader.collate_fn if loader is not None else None,
                persistent_workers=False, prefetch_factor=4 if workers else None,
                # its own generator: making an iterator would otherwise draw the workers' base seed
                # from the global one, one draw a resumed run does not repeat (it stopped bit for bit)
                generator=torch.Generator().manual_seed(seed),
            )
        self.iterator: Iterator | None = None

    def first(self) -> tuple:
        """A sample of the data, read without moving the seeded sequence."""
        if self.tensors is not None:
            return tuple(t[:1] for t in self.tensors)
        if self.dataset is not None:
            return as_tuple(torch.utils.data.default_collate([self.dataset[0]]))
        return as_tuple(next(iter(self.batches)))

    def __iter__(self) -> Iterator[tuple]:
        if self.tensors is not None:
            return (tuple(t[index] for t in self.tensors) for index in self.indices)
        if self.dataset is not None:
            return (as_tuple(batch) for batch in self.loader)
        return self._cycle()

    def _cycle(self) -> Iterator[tuple]:
        """Batch ``step * size + rank`` of the endless cycle through the batches, from step ``start`` on."""
        skip, position = self.start * self.world.size + self.world.rank, 0
        if isinstance(self.batches, list):
            while True:
                yield self.batches[skip % len(self.batches)]
                skip += self.world.size
        while True:
            empty = True
            for batch in self.batches:
                empty = False
                if position >= skip and (position - skip) % self.world.size == 0:
                    yield as_tuple(batch)
                position += 1
            if empty:
                raise InvalidOptionError("the distillation data yielded no batch")


class StepIndices:
    """Per step, this process's slice of the global batch's indices: a batch sampler for a DataLoader."""

    def __init__(self, samples: int, global_batch: int, seed: int, world: World, start: int, steps: int) -> None:
        self.samples, self.global_batch, self.seed, self.world = samples, global_batch, seed, world
        self.start, self.steps = start, steps

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        share = self.global_batch // self.world.size
        for step in range(self.steps):
            index = torch.randint(0, self.samples, (self.global_batch,), generator=generator)
            if step >= self.start:
                yield index[self.world.rank * share:(self.world.rank + 1) * share]


def as_tuple(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
