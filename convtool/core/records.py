"""The records every layer shares: what became of each conv, how fast, and how a searched budget was found.

A separated layer is described once, by :class:`LayerChange`, from the pass that makes it to
the JSON report: every report column and JSON key is one of its fields under the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple


def measured_words(top1: float | None, sqnr_db: float | None, measure: str = "top-1 agreement") -> str:
    """What a separation measured, in words: ``top-1 agreement 98.75%, SQNR 12.2 dB`` (``measure`` names the share)."""
    words = [f"{measure} {top1:.2%}"] if top1 is not None else []
    return ", ".join(words + ["SQNR inf (identical)" if sqnr_db is None else f"SQNR {sqnr_db:.1f} dB"])


@dataclass(frozen=True)
class Benchmark:
    """Latency of two models on one provider, timed interleaved in one run (medians, ms).

    Only ever made from sessions that really ran on ``provider``.
    """

    provider: str
    original_ms: float
    separated_ms: float
    runs: int
    threads: int | None

    @property
    def speedup(self) -> float:
        """Original latency over separated latency (above 1: the separated model is faster)."""
        return self.original_ms / self.separated_ms

    @property
    def ratio(self) -> float:
        """Separated latency over original latency (below 1: the separated model is faster)."""
        return self.separated_ms / self.original_ms


@dataclass(frozen=True)
class Trial:
    """One plan a search tried, and what its model measured."""

    budget: float  # the inner budget asked: a fraction of the FLOPs, or of the costed layers' dense milliseconds
    unit: str  # "FLOPs" or "ms"
    flops_fraction: float  # the model's FLOPs after over before, as reached
    latency_ratio: float | None  # separated over original, timed end to end (None: not timed)
    top1_agreement: float | None  # on the held-out calibration data (None: not judged, or not a classifier)
    sqnr_db: float | None  # None: identical outputs, or not judged
    met: bool  # the target's every condition held


@dataclass(frozen=True)
class Search:
    """How a target met by measurement (an agreement floor, a latency target) was found, or why not.

    One record for every search: what the model returned measured, and every plan tried.

    Attributes:
        target: the budget asked (an ``AgreementTarget`` or a ``LatencyTarget``).
        goal: the target in words.
        met: the returned model meets it (a latency within the target's tolerance above it).
        reason: why not, in one sentence ("" when met).
        flops_fraction: the returned model's FLOPs over the original's.
        latency: the returned model's own end-to-end timing against the original, when timed.
        top1_agreement, sqnr_db: the returned model's, on ``samples`` held-out calibration
            samples that its refit never saw, when judged.
        floor: for a latency target below reach, the ratio the fastest plan measured.
        tried: every trial, in the order tried.
        baseline: what ``latency`` timed the model against, in words: "the original", or "the
            dense int8 model" when planned in int8.
    """

    target: Any
    goal: str
    met: bool
    reason: str
    flops_fraction: float
    latency: Benchmark | None
    top1_agreement: float | None
    sqnr_db: float | None
    samples: int
    floor: float | None
    tried: tuple[Trial, ...]
    baseline: str = "the original"

    @property
    def ratio(self) -> float | None:
        """The returned model's latency over the original's, when timed."""
        return None if self.latency is None else self.latency.ratio


@dataclass(frozen=True)
class LayerChange:
    """One dense conv weight replaced by separable factors.

    A weight is one layer however it is reached: a conv module shared under several names, two
    conv modules tying one weight, or an ``F.conv2d`` weight called with several settings all
    give one record, whose pairs share their parameters.

    Attributes:
        name: qualified name of the conv module, or of the weight parameter of a functional conv.
        aliases: the other names its pairs sit at (shared modules, tied weights, other call settings).
        source: ``"module"`` (a torch conv module) or ``"function"`` (``F.conv1d/2d/3d`` on a parameter).
        in_channels, out_channels, kernel_size, stride, groups: the dense conv (stride of its
            first use); one entry per spatial dimension (1 to 3).
        rank, order: the pair (``"dw-pw"``: depthwise then pointwise; ``"pw-dw"``: the reverse).
        params_before, params_after: parameters of the dense conv and of the pair(s), each
            tensor counted once.
        flops_before, flops_after: multiply-adds over all its calls on the example inputs
            (fvcore's unit); None when it was not run.
        calls: how many times its pairs ran on the example inputs, the proof that the rewrite
            took effect; None when the separation could not be run (see ``Separation.verified``).
        weight_error: relative Frobenius error of the SVD factors against the dense weight.
        output_error: relative error of the layer's output against the dense layer's on the
            calibration data, after the refit; None without calibration.
        transposed: the dense conv was a transposed conv (its stride upsamples).
    """

    name: str
    aliases: tuple[str, ...]
    source: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    rank: int
    order: str
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None
    calls: int | None
    weight_error: float
    output_error: float | None = None
    transposed: bool = False

    @property
    def params_ratio(self) -> float:
        """Dense parameters over the pair's (above 1: the pair is smaller)."""
        return self.params_before / self.params_after if self.params_after else math.inf

    @property
    def flops_ratio(self) -> float | None:
        """Dense FLOPs over the pair's; None when not measured."""
        if self.flops_before is None or self.flops_after is None:
            return None
        return self.flops_before / self.flops_after if self.flops_after else math.inf


@dataclass(frozen=True)
class LayerLatency:
    """One separated layer timed alone: a dense conv of its shape against its pair, at its input shape (ms)."""

    name: str
    dense_ms: float
    separated_ms: float

    @property
    def faster(self) -> bool:
        return self.separated_ms < self.dense_ms


class SkippedLayer(NamedTuple):
    """A conv, or a part of the model, left as it was, and why."""

    name: str
    reason: str
