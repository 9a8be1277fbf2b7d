"""How many threads torch's batched small-matrix linear algebra runs on.

A batch of small SVDs or Cholesky factorisations is split across torch's intra-op threads,
and each LAPACK call inside may start threads of its own: on a 2-core machine a batch of 1,024
SVDs of 128 x 64 took 12-15 CPU seconds on 2 threads and 1 on one (benchmarks/RESULTS.md,
issue 36). One large factorisation still gains from every thread, so only batches drop to one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def one_thread_for(batch: Tensor, largest: int = 2048) -> Iterator[None]:
    """torch on one thread for the block when ``batch`` (..., n, n') holds several matrices of at most ``largest`` rows and columns."""
    several = batch.dim() > 2 and batch.shape[:-2].numel() > 1 and max(batch.shape[-2:]) <= largest
    threads = torch.get_num_threads()
    if not several or threads == 1 or batch.device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
