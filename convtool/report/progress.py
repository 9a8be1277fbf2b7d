"""Progress of a long run for people: a live bar on a terminal, a line every tenth of the run in a log."""

from __future__ import annotations

import time
from typing import Any


class StepProgress:
    """Step, loss and throughput (samples per second, over the steps this run made).

    On a terminal a rich bar; otherwise (a log file, a batch job) one line every tenth of the
    run and at the last step, so the log shows the run advancing without a line per step.
    """

    def __init__(self, console: Any, total: int, samples_per_step: int, what: str = "distilling") -> None:
        self.console, self.total, self.samples_per_step, self.what = console, total, samples_per_step, what
        self.first: int | None = None
        self.started = time.perf_counter()
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console)
            self.task = self.bar.add_task(what, total=total, loss="-", speed="")

    def __enter__(self) -> "StepProgress":
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def samples_per_second(self, step: int) -> float | None:
        """Samples a second over the steps seen so far (None before the second step)."""
        if self.first is None or step <= self.first:
            return None
        return (step - self.first) * self.samples_per_step / max(time.perf_counter() - self.started, 1e-9)

    def __call__(self, step: int, loss: float) -> None:
        if self.first is None:  # timed from the end of the first step: start-up is not throughput
            self.first, self.started = step, time.perf_counter()
        speed = self.samples_per_second(step)
        shown = f"{speed:,.0f} samples/s" if speed is not None else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", speed=shown)
        elif step == self.total or step % max(self.total // 10, 1) == 0:
            self.console.print(f"{self.what}: step {step}/{self.total} loss {loss:.4f} {shown}".rstrip(),
                               markup=False, highlight=False)
