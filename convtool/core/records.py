"""The records every layer shares: how ranks are chosen, and what became of each conv.

A separated layer is described once, by :class:`LayerChange`, from the pass that makes it to
the JSON report: every report column and JSON key is one of its fields under the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Union

from ..errors import InvalidOptionError


@dataclass(frozen=True)
class FlopsTarget:
    """Choose ranks so the whole model's FLOPs fall to ``fraction`` of before, with the least error.

    Layers may stay dense where the budget is better spent elsewhere. Needs example inputs:
    a conv's FLOPs depend on the resolution it runs at.

    With calibration data, each option's error is its layer's output error on the first batch;
    with ``sensitivity``, it is instead the error that layer's change causes at the *model's*
    output (measured by running the model with that layer alone replaced, at a few ranks; mean
    KL divergence for a 2-d float output, taken to be logits), so the budget goes where errors
    matter to the result.

    Example:
        >>> convtool.separate(model, x, rank=convtool.FlopsTarget(0.25))
    """

    fraction: float
    sensitivity: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise InvalidOptionError(f"a FLOP target is a fraction of the original FLOPs in (0, 1]; got {self.fraction!r}")


@dataclass(frozen=True)
class Energy:
    """Per layer, the smallest rank keeping ``share`` of the weight's squared singular values.

    A layer whose pair at that rank would cost more than the dense conv stays dense.
    """

    share: float

    def __post_init__(self) -> None:
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0 < self.share <= 1:
            raise InvalidOptionError(f"energy is a share of spectral energy in (0, 1]; got {self.share!r}")


@dataclass(frozen=True)
class AgreementTarget:
    """The fewest FLOPs whose separated model still agrees with the original on held-out data.

    Users know the agreement they need, not the FLOP fraction that gives it. A part of the
    calibration data (``held_out``, a quarter by default) is kept aside from the refit; FLOP
    budgets are tried (one costing of the layers serves them all), each separation refit on the
    rest and measured on the held-out part, and the smallest budget meeting every floor given
    wins. ``top1``: the share of held-out samples whose top class is the original's (a model
    returning one (batch, classes) float output); ``sqnr_db``: the signal-to-error ratio of all
    outputs together, in dB (any model). Needs calibration data.

    Example:
        >>> convtool.separate(model, x, rank=convtool.AgreementTarget(0.99), calibration=images)
    """

    top1: float | None = None
    sqnr_db: float | None = None
    sensitivity: bool = False
    held_out: float = 0.25

    def __post_init__(self) -> None:
        if self.top1 is None and self.sqnr_db is None:
            raise InvalidOptionError("an agreement target needs a floor: a top-1 agreement in (0, 1] or an SQNR in dB")
        if self.top1 is not None and (isinstance(self.top1, bool) or not isinstance(self.top1, (int, float))
                                      or not 0 < self.top1 <= 1):
            raise InvalidOptionError(f"a top-1 agreement floor is a share in (0, 1]; got {self.top1!r}")
        if self.sqnr_db is not None and (isinstance(self.sqnr_db, bool) or not isinstance(self.sqnr_db, (int, float))
                                         or not math.isfinite(self.sqnr_db)):
            raise InvalidOptionError(f"an SQNR floor is a finite number of dB; got {self.sqnr_db!r}")
        if not 0 < self.held_out < 1:
            raise InvalidOptionError(f"the held-out share of the calibration data is in (0, 1); got {self.held_out!r}")

    def floors(self) -> str:
        """The floors in words: ``top-1 agreement >= 0.99 and SQNR >= 20 dB``."""
        parts = ([f"top-1 agreement >= {self.top1:g}"] if self.top1 is not None else []) + (
            [f"SQNR >= {self.sqnr_db:g} dB"] if self.sqnr_db is not None else [])
        return " and ".join(parts)

    def met(self, top1: float | None, sqnr_db: float | None) -> bool:
        """Whether measured values meet every floor (an SQNR of None is infinite: identical outputs)."""
        if self.top1 is not None and (top1 is None or top1 < self.top1):
            return False
        return self.sqnr_db is None or sqnr_db is None or sqnr_db >= self.sqnr_db


def measured_words(top1: float | None, sqnr_db: float | None) -> str:
    """What a separation measured, in words: ``top-1 agreement 98.75%, SQNR 12.2 dB``."""
    words = [f"top-1 agreement {top1:.2%}"] if top1 is not None else []
    return ", ".join(words + ["SQNR inf (identical)" if sqnr_db is None else f"SQNR {sqnr_db:.1f} dB"])


@dataclass(frozen=True)
class BudgetTried:
    """One FLOP budget an :class:`AgreementTarget` search tried, and what its separation measured."""

    fraction: float  # the FlopsTarget asked
    flops_fraction: float  # the model's FLOPs after, over before, as reached
    top1_agreement: float | None
    sqnr_db: float | None  # None: identical outputs
    met: bool


@dataclass(frozen=True)
class BudgetSearch:
    """How an :class:`AgreementTarget` was met: the floors, what the returned model measured, on what.

    ``samples`` held-out calibration samples (never seen by the refit) gave ``top1_agreement``
    and ``sqnr_db`` of the model returned, whose FLOPs are ``flops_fraction`` of the original's;
    ``tried`` lists every budget in the order tried.
    """

    target: AgreementTarget
    samples: int
    flops_fraction: float
    top1_agreement: float | None
    sqnr_db: float | None
    tried: tuple[BudgetTried, ...]


@dataclass(frozen=True)
class LatencyTarget:
    """Choose ranks so the separated model runs in ``fraction`` of the original's time on ``provider``.

    Measured, not modelled: each layer's candidate ranks are timed alone in the form they ship
    in (dense included) at the layer's input shape, the knapsack spends milliseconds instead of
    FLOPs (errors and ``sensitivity`` as for :class:`FlopsTarget`), and the whole separated
    model is then exported and timed against the original, interleaved (``runs`` each,
    ``threads`` onnxruntime threads; its default when None). While that end-to-end ratio misses
    the target by more than ``tolerance`` (a share of it), the per-layer budget is corrected by
    the miss and the plan made again, at most ``rounds`` times. A target below what separation
    can reach returns the fastest plan, with the ratio it measured as the floor. Needs example inputs.

    Example:
        >>> convtool.separate(model, x, rank=convtool.LatencyTarget(0.5, provider="cpu"))
    """

    fraction: float
    provider: str = "cpu"
    sensitivity: bool = False
    runs: int = 30
    threads: int | None = None
    rounds: int = 5
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise InvalidOptionError(f"a latency target is a fraction of the original's latency in (0, 1]; got {self.fraction!r}")
        if not isinstance(self.provider, str) or not self.provider:
            raise InvalidOptionError(f"a latency target's provider is an onnxruntime provider name such as 'cpu'; got {self.provider!r}")
        for name, low in (("runs", 1), ("rounds", 1), ("threads", 1)):
            value = getattr(self, name)
            if name == "threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidOptionError(f"a latency target's {name} is a positive integer; got {value!r}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not 0 < self.tolerance < 1:
            raise InvalidOptionError(f"a latency target's tolerance is a share of the target in (0, 1); got {self.tolerance!r}")


@dataclass(frozen=True)
class LatencyRound:
    """One plan a :class:`LatencyTarget` tried, and how fast its exported model measured against the original."""

    layer_budget: float  # the per-layer budget asked: a fraction of the costed layers' dense milliseconds
    flops_fraction: float  # the model's FLOPs after, over before
    original_ms: float  # the interleaved medians of this round's benchmark
    separated_ms: float
    ratio: float  # separated_ms / original_ms
    within: bool  # within the tolerance of the target


@dataclass(frozen=True)
class LatencySearch:
    """How a :class:`LatencyTarget` was met, or why not: the target, what the returned model measured, every round.

    ``ratio`` is ``separated_ms / original_ms`` of the returned model's own benchmark (one of
    ``rounds``), on ``provider`` with ``runs`` interleaved runs of each and ``threads`` threads.
    ``met``: the ratio is at most the target plus its tolerance. ``floor``: when the target is
    below what separation reaches here, the ratio measured for the fastest plan (every layer at
    its fastest option), which is then the one returned; None otherwise. ``reason`` says why the
    ratio is not within the tolerance of the target ("" when it is).
    """

    target: LatencyTarget
    provider: str
    runs: int
    threads: int | None
    original_ms: float
    separated_ms: float
    ratio: float
    flops_fraction: float
    met: bool
    floor: float | None
    reason: str
    rounds: tuple[LatencyRound, ...]


#: What ``separate(rank=...)`` takes: a rank for every layer, ``"full"`` (exact), or a strategy.
Rank = Union[int, Literal["full"], FlopsTarget, Energy, AgreementTarget, LatencyTarget]


def check_rank(rank: object) -> Rank:
    """``rank`` if it is one of the forms :data:`Rank` allows, else a one-line error."""
    if rank == "full" or isinstance(rank, (FlopsTarget, Energy, AgreementTarget, LatencyTarget)):
        return rank  # type: ignore[return-value]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidOptionError(
            f"rank must be a positive integer, 'full', FlopsTarget(fraction), Energy(share), AgreementTarget(top1) or "
            f"LatencyTarget(fraction); got {rank!r}"
        )
    return rank


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
