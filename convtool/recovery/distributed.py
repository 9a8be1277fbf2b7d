"""Many processes on torch's own engine: the process group torchrun describes, and the sums across it.

``torchrun`` starts one process per device and tells each, through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), where it stands; the
``env://`` rendezvous forms the group from that. Everything here is a no-op in a single
process, so the library behaves the same with and without torchrun.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..errors import DistributedError

DEFAULT_TIMEOUT = 600.0  # seconds to wait for every process to join, and for any one collective


@dataclass(frozen=True)
class World:
    """This process's place among the processes: ``rank`` of ``size``, on device ``local_rank`` of its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is the process that writes files and prints (rank 0)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a group of several processes (torchrun, or the same variables set by hand)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def world() -> World:
    """Where this process stands: from the initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))
    return World()


@contextlib.contextmanager
def process_group(*, cuda: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Iterator[World]:
    """Join the process group torchrun describes (``env://``), for the duration of the block.

    NCCL on CUDA, gloo on the CPU. Does nothing in a single process, or when the caller has
    initialised a group already (that group is used and left as it is).

    Args:
        cuda: whether the model runs on CUDA (NCCL, one device per local rank) or the CPU (gloo).
        timeout: seconds to wait for every process to join, and for any collective after.

    Raises:
        DistributedError: the group cannot form in ``timeout`` (a process that did not start, an
            unreachable ``MASTER_ADDR``, a port in use), or the backend is not available here.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield world()
        return
    backend = "nccl" if cuda else "gloo"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    size, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if not dist.is_available() or (cuda and not dist.is_nccl_available()) or (not cuda and not dist.is_gloo_available()):
        raise DistributedError(f"this torch build has no {backend} backend for the {size} processes torchrun started")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if local >= torch.cuda.device_count():
            raise DistributedError(f"process {rank} wants CUDA device {local}, but this machine has {torch.cuda.device_count()}; "
                                   "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
    try:
        with _native_stderr_held() as held:
            dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout))
            dist.barrier()  # every process has joined: a missing one fails here, not at the first step
            held.release()
    except Exception as error:
        if dist.is_initialized():
            dist.destroy_process_group()
        reason = " ".join(str(error).split())[:200]
        raise DistributedError(
            f"the group of {size} processes could not form at {where} within {timeout:g} s (process {rank}: "
            f"{type(error).__name__}: {reason}); check that every node runs the same torchrun command and reaches "
            "MASTER_ADDR:MASTER_PORT"
        ) from None
    try:
        yield world()
    finally:
        dist.destroy_process_group()


class _Held:
    """What native code wrote to stderr while held; given back on :meth:`release`, dropped otherwise."""

    def __init__(self, file) -> None:
        self.file, self.released = file, False

    def release(self) -> None:
        self.released = True


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[_Held]:
    """Hold what C++ writes to file descriptor 2 during the rendezvous.

    A failed rendezvous makes c10d log dozens of lines of C++ stack per retry; the user needs
    the one line the error becomes. A rendezvous that succeeds gets its messages back.
    """
    import sys
    import tempfile

    with tempfile.TemporaryFile(mode="w+b") as file:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        held = _Held(file)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if held.released:
                file.seek(0)
                sys.stderr.write(file.read().decode(errors="replace"))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes, in place (unchanged in a single process)."""
    if world().size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
