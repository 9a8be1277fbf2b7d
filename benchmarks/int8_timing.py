"""What benchmarks/int8_forms.py and benchmarks/int8.py share: inputs, interleaved timing in blocks, SQNR.

Not a benchmark itself. Timing: every session of a table runs once per round, in an order
shuffled from round to round (seeded; rotating one order, as this did before, keeps each form
right after the same neighbour, whatever that neighbour leaves in the caches), in blocks of
``runs`` rounds; a figure is the median of all its runs, and the spread of its block medians
says how far the machine's load moved it.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def images(count: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """Real-ish images: smooth random scenes (noise at 1/16 and 1/4 of the size, upsampled), normalised as ImageNet's."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(count, 3, size // 16, size // 16, generator=g), size=size, mode="bicubic", align_corners=False)
    detail = F.interpolate(torch.rand(count, 3, size // 4, size // 4, generator=g), size=size, mode="bilinear", align_corners=False)
    pixels = (0.75 * coarse + 0.25 * detail).clamp(0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((pixels - mean) / std).numpy().astype(np.float32)


@dataclass(frozen=True)
class Timed:
    median_ms: float
    block_medians: tuple[float, ...]

    def spread(self) -> str:
        return f"{min(self.block_medians):.2f}-{max(self.block_medians):.2f}"


def interleaved(sessions: Sequence[Any], feeds: Sequence[dict], runs: int, blocks: int = 3, warmup: int = 3) -> list[Timed]:
    """Each session timed on its feeds, round-robin in an order shuffled each round (seeded): medians in ms."""
    for session, feed in zip(sessions, feeds):
        for _ in range(warmup):
            session.run(None, feed)
    n = len(sessions)
    times: list[list[list[float]]] = [[[] for _ in range(blocks)] for _ in range(n)]
    order = random.Random(0)
    for block in range(blocks):
        for r in range(runs):
            for i in order.sample(range(n), n):
                start = time.perf_counter()
                sessions[i].run(None, feeds[i])
                times[i][block].append((time.perf_counter() - start) * 1000)
    return [Timed(statistics.median([t for b in per for t in b]), tuple(statistics.median(b) for b in per)) for per in times]


def sqnr(actual: np.ndarray, reference: np.ndarray) -> float:
    """20 log10(||reference|| / ||reference - actual||), in dB."""
    err = float(np.linalg.norm((actual - reference).astype(np.float64)))
    return math.inf if err == 0 else 20 * math.log10(float(np.linalg.norm(reference.astype(np.float64))) / err)


def top1(actual: np.ndarray, reference: np.ndarray) -> float:
    return float((actual.argmax(1) == reference.argmax(1)).mean())


def machine() -> str:
    """The machine, its int8 instructions, the load, the versions: the line a table is filed under."""
    import onnxruntime

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), platform.processor())
    isa = [f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return (f"{model} ({platform.machine()}, {os.cpu_count()} cores; {', '.join(isa) or 'no int8 dot-product instructions'}), "
            f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; {load}")
