"""The trials a budget searches with: separate at an inner budget, then judge and time, on any front end.

A front end (:class:`FrontEnd`) says how to separate its kind of model, run a model on data and
time one against the original; the trials hold what every trial shares: the costing (filled by
the first), the calibration data less a held-out part, the original's outputs on that part, and
one timing session of the original.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Protocol

import torch

from ..core.records import Benchmark
from ..errors import InvalidOptionError
from ..measure.fidelity import output_fidelity
from ..plan.budget import Agreement, Attempt, Budget, Needs, Timing
from ..plan.costing import Costing


class FrontEnd(Protocol):
    """What the trials need of a front end; ``None`` stands for the original model where a model is asked."""

    has_inputs: bool  # example inputs (or calibration data) to cost and time on
    has_data: bool  # calibration data

    def time_on(self, provider: str | None) -> None:
        """Time layers on ``provider`` (None: the one the caller named, else onnxruntime CPU); refuses another one given."""

    def calibration(self) -> Any:
        """The calibration data (synthesised first, where asked), or None."""

    def separate(self, budget: Budget, calibration: Any, costing: Costing | None, shared: bool) -> tuple[Any, Costing]:
        """The model separated at ``budget`` (refit on ``calibration``), and the costing planned from."""

    def batches(self, calibration: Any) -> list[Any]:
        """Calibration data as a list of batches in memory."""

    def as_calibration(self, batches: list[Any]) -> Any:
        """Batches of :meth:`batches` as calibration data again (what :meth:`separate` takes)."""

    def rows(self, batch: Any) -> int:
        """Samples in a batch."""

    def cut(self, batch: Any, start: int, stop: int) -> Any:
        """Samples ``start:stop`` of a batch (inputs without a batch dimension kept whole)."""

    def outputs(self, model: Any, batches: list[Any]) -> list[torch.Tensor]:
        """The float outputs of ``model`` (a separation's, or None: the original) on ``batches``, each output joined."""

    def timer(self, timing: Timing) -> ContextManager[Callable[[Any], Benchmark]]:
        """A timing session of the original: given a separation, its model timed against the original, interleaved."""

    def finish(self, result: Any, search: Any) -> Any:
        """The result as returned to the caller, with how its budget was found."""


def split_held_out(front: FrontEnd, calibration: Any, share: float) -> tuple[Any, list[Any]]:
    """The calibration batches to refit on, and those held out to judge by (``share`` of the samples).

    Every fourth batch (or the share's nearest stride) is held out when there are enough
    batches; otherwise the last rows of each batch, so a single tensor of 64 samples still
    gives both parts. Streamed data is read into memory here: a search runs the same data once
    per budget.
    """
    batches = front.batches(calibration)
    stride = max(round(1 / share), 2)
    if len(batches) >= stride:
        held = [b for i, b in enumerate(batches) if i % stride == stride - 1]
        fit = [b for i, b in enumerate(batches) if i % stride != stride - 1]
        return front.as_calibration(fit), held
    fit, held = [], []
    for batch in batches:
        n = front.rows(batch)
        cut = n - max(round(n * share), 1)
        if cut < 1:
            raise InvalidOptionError(
                f"an agreement target holds {share:g} of the calibration data out to judge by: give at least "
                f"{max(round(1 / share), 2)} samples")
        fit.append(front.cut(batch, 0, cut))
        held.append(front.cut(batch, cut, n))
    return front.as_calibration(fit), held


class HeldOut:
    """The original's outputs on held-out batches, and the measure of a separated model against them.

    ``classifier``: refuse, before any trial, a model whose outputs have no top class to agree on;
    ``agreement``: the task's own measure of agreement, in place of top-1.
    """

    def __init__(self, front: FrontEnd, batches: list[Any], classifier: bool = False, agreement: Agreement | None = None) -> None:
        self.front, self.batches, self.agreement = front, batches, agreement
        self.samples = sum(front.rows(b) for b in batches)
        self.reference = front.outputs(None, batches)
        if classifier and output_fidelity(self.reference, self.reference).top1_agreement is None:
            raise InvalidOptionError(
                "a top-1 agreement floor needs a model returning one (batch, classes) float output; "
                "use an SQNR floor (--min-sqnr DB) for other outputs")

    def measure(self, result: Any) -> tuple[float | None, float | None]:
        """(top-1 agreement, SQNR in dB) of a separation's model against the original on the held-out samples."""
        outputs = self.front.outputs(result, self.batches)
        fidelity = output_fidelity(outputs, self.reference)
        if self.agreement is None:
            return fidelity.top1_agreement, fidelity.sqnr_db
        kept = self.agreement(self.reference, outputs)
        if isinstance(kept, torch.Tensor) and kept.numel() == 1:
            kept = kept.item()
        if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not 0 <= kept <= 1:
            raise InvalidOptionError(f"the agreement measure {getattr(self.agreement, '__name__', 'given')} returned {kept!r}; "
                                     "it must return the share of samples kept, in [0, 1]")
        return float(kept), fidelity.sqnr_db


class Trials:
    """The trials of one budget on one front end (:class:`~convtool.plan.budget.Trials`); a context manager.

    ``needs``: what each trial measures; ``shared``: the costing serves several budgets (every
    option cheaper than dense is costed).
    """

    def __init__(self, front: FrontEnd, needs: Needs, shared: bool) -> None:
        self.front, self.needs, self.shared = front, needs, shared
        self.costing = Costing()  # filled by the first trial
        calibration = front.calibration()
        self.held: HeldOut | None = None
        self.fit = calibration
        if needs.held_out is not None:
            self.fit, held = split_held_out(front, calibration, needs.held_out)
            self.held = HeldOut(front, held, needs.top1, needs.agreement)
        self.samples = self.held.samples if self.held is not None else 0
        self.baseline = "the original" if getattr(front, "int8", None) is None else "the dense int8 model"
        self._stack = contextlib.ExitStack()
        self._time: Callable[[Any], Benchmark] | None = None

    def __enter__(self) -> "Trials":
        if self.needs.timing is not None:
            self._time = self._stack.enter_context(self.front.timer(self.needs.timing))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def run(self, budget: Budget) -> Attempt:
        result, self.costing = self.front.separate(budget, self.fit, self.costing, self.shared)
        before, after = result.flops_before, result.flops_after
        flops = after / before if before and after is not None else 1.0
        latency = self._time(result) if self._time is not None else None
        top1, sqnr = self.held.measure(result) if self.held is not None else (None, None)
        return Attempt(result, flops, latency, top1, sqnr)
