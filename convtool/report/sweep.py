"""A :class:`~convtool.Sweep` for people and pipelines: JSON, a Markdown table, and the trade-off picture.

The picture needs matplotlib (``pip install 'convtool[plot]'``); it is drawn on a bare
``Figure`` (no pyplot), so no global backend or figure state of the caller's changes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from ..measure.counts import FLOPS_UNIT
from ..search.sweep import Sweep, SweepPoint
from .render import _json_value, _md_row, human

SWEEP_SCHEMA_VERSION = 1
PLOT_HINT = "pip install 'convtool[plot]'"


def sweep_to_dict(sweep: Sweep) -> dict[str, Any]:
    """The sweep as JSON-ready data: every :class:`~convtool.SweepPoint` field under its own name.

    An SQNR of identical outputs (the original's) is null; ``measure`` names the figure the
    picture plots, ``metric_name`` the user's metric (null without one).
    """
    point = lambda p: {f.name: _json_value(getattr(p, f.name)) for f in dataclasses.fields(SweepPoint)}  # noqa: E731
    return {
        "schema_version": SWEEP_SCHEMA_VERSION,
        "flops_unit": FLOPS_UNIT,
        "input_shapes": [list(s) for s in sweep.input_shapes],
        "provider": sweep.provider,
        "runs": sweep.runs,
        "threads": sweep.threads,
        "judged_on": sweep.judged_on,
        "metric_name": sweep.metric_name,
        "measure": sweep.measure,
        "seconds": sweep.seconds,
        "original": point(sweep.original),
        "points": [point(p) for p in sweep.points],
    }


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _sqnr(x: float | None, original: bool) -> str:
    return "inf (identical)" if x is None and original else "-" if x is None else f"{x:.1f}"


def _row(sweep: Sweep, p: SweepPoint) -> list[str]:
    original = p.target is None
    target = "original" if original else f"{p.target:g}" + ("" if p.budget_met else " (not reached)")
    cells = [target, human(p.flops), f"{p.flops_fraction:.3f}", human(p.params), f"{p.latency_ms:.4g}", f"{p.speedup:.2f}x",
             _share(p.top1_agreement), _sqnr(p.sqnr_db, original)]
    if sweep.metric_name is not None:
        cells.append(f"{p.metric:.4g}")
    return cells + [str(p.layers), "-" if original else f"{p.seconds:.1f}"]


def sweep_to_markdown(sweep: Sweep, *, title: str | None = None) -> str:
    """The sweep as a Markdown table, a row per point (the original first), and how it was measured."""
    header = ["FLOP target", "FLOPs", "FLOPs fraction", "params", "latency ms", "speed-up", "top-1 agreement", "SQNR dB"]
    if sweep.metric_name is not None:
        header.append(sweep.metric_name)
    header += ["layers separated", "seconds"]
    shapes = " and ".join("x".join(map(str, s)) for s in sweep.input_shapes)
    threads = "onnxruntime's default threads" if sweep.threads is None else f"{sweep.threads} threads"
    lines = [f"# Trade-off{': ' + title if title else ''}", "",
             f"Each FLOP target separated (one costing of the layers for all), exported to ONNX and timed on "
             f"{sweep.provider} at input {shapes}, every file in turn, {sweep.runs} runs each, {threads}: medians, speed-up "
             f"over the original's median from the same run. Top-1 agreement and SQNR against the original on "
             f"{sweep.judged_on}" + (f"; {sweep.metric_name}: the given metric" if sweep.metric_name else "") + ".", "",
             _md_row(header), _md_row(["---"] * len(header))]
    lines += [_md_row(_row(sweep, p)) for p in (sweep.original, *sweep.points)]
    lines += ["", f"FLOPs are multiply-adds ({FLOPS_UNIT}); seconds: each target's separation, refit, export and judging "
                  f"(the first includes the costing every target shares); the sweep took {sweep.seconds:.1f} s in all."]
    return "\n".join(lines) + "\n"


def plot_available() -> bool:
    """Whether matplotlib is installed, so :func:`write_sweep_png` can draw."""
    return importlib.util.find_spec("matplotlib") is not None


def write_sweep_png(sweep: Sweep, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Draw the trade-off: the measure against measured speed-up, and against the FLOPs fraction.

    One point per target, labelled with it (points that coincide share one label), joined in
    the targets' order against FLOPs; the original is a star at (1, its value), or a dotted
    line at 1 when its value is infinite (SQNR).

    Raises:
        ImportError: matplotlib is not installed (:data:`PLOT_HINT` says how to get it).
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    percent = sweep.metric_name is None and sweep.original.top1_agreement is not None
    panels = ((axes[0], "speedup", f"measured speed-up on {sweep.provider.replace('ExecutionProvider', '')} (x)", "o"),
              (axes[1], "flops_fraction", "FLOPs, fraction of the original's", "o-"))
    for ax, attribute, label, style in panels:
        # Speed-ups need not fall in the targets' order: joining them would draw a curve that is not there.
        points = [(getattr(p, attribute), sweep.value(p), p) for p in sweep.points if sweep.value(p) is not None]
        ax.plot([x for x, _, _ in points], [y for _, y, _ in points], style, color="tab:blue", label="separated")
        for (x, y), targets in _labels(points).items():
            ax.annotate(", ".join(targets), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        original = sweep.value(sweep.original)
        if original is None:
            ax.axvline(1.0, color="tab:red", linestyle=":", label="original (identical outputs)")
        else:
            ax.plot([1.0], [original], "*", color="tab:red", markersize=14, label="original")
            ax.axhline(original, color="tab:red", linewidth=0.6, linestyle="--")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[1].invert_xaxis()  # fewer FLOPs to the right, as more speed is on the left panel
    axes[0].set_ylabel(sweep.measure)
    if percent:
        from matplotlib.ticker import PercentFormatter

        axes[0].yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0].legend(fontsize=8, loc="lower left")
    figure.suptitle(f"convtool sweep{': ' + title if title else ''} (labels: FLOP targets)", fontsize=10)
    figure.savefig(path, format="png")


def _labels(points: list[tuple[float, float, SweepPoint]]) -> dict[tuple[float, float], list[str]]:
    """One label per place: targets whose points lie within 2% of the axes' spans of each other share it."""
    if not points:
        return {}
    xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    labels: dict[tuple[float, float], list[str]] = {}
    for x, y, p in points:
        near = next((k for k in labels if abs(k[0] - x) <= 0.02 * span_x and abs(k[1] - y) <= 0.02 * span_y), (x, y))
        labels.setdefault(near, []).append(f"{p.target:g}")
    return labels
