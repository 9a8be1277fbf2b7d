"""One report, three renderings: a rich table for terminals, JSON for pipelines, Markdown.

The JSON keys are a contract (``SCHEMA_VERSION``); a test compares a golden file so that a
renamed key is a conscious act. Tables round numbers for people (12.3M, 4.56G); JSON keeps
them exact.
"""

from __future__ import annotations

import math
from typing import Any

from .compare import Comparison
from .counts import FLOPS_UNIT, Analysis, ModuleCost

SCHEMA_VERSION = 1


def human(n: float) -> str:
    """12345678 -> '12.3M': three significant digits and an SI suffix."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            value = n / factor
            return f"{value:.3g}{suffix}" if value < 1000 else f"{value:.0f}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def _ratio(r: float) -> str:
    return f"{r:.2f}x" if math.isfinite(r) else "-"


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def to_dict(comparison: Comparison) -> dict[str, Any]:
    """The report as plain JSON-ready data, exact numbers, keys fixed by ``SCHEMA_VERSION``.

    Infinite values (an SQNR of identical outputs, a ratio over zero) are written as null.
    """
    c = comparison
    f = c.fidelity
    return {
        "schema_version": SCHEMA_VERSION,
        "flops_unit": FLOPS_UNIT,
        "input_shapes": [list(s) for s in c.before.input_shapes],
        "totals": {
            "params_before": c.before.params,
            "params_after": c.after.params,
            "params_ratio": _finite(c.params_ratio),
            "flops_before": c.before.flops,
            "flops_after": c.after.flops,
            "flops_ratio": _finite(c.flops_ratio),
        },
        "layers": [
            {
                "name": layer.name,
                "in_channels": layer.in_channels,
                "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size),
                "stride": list(layer.stride),
                "groups": layer.groups,
                "rank": layer.rank,
                "order": layer.order,
                "params_before": layer.params_before,
                "params_after": layer.params_after,
                "flops_before": layer.flops_before,
                "flops_after": layer.flops_after,
                "weight_relative_error": _finite(layer.relative_error),
            }
            for layer in c.layers
        ],
        "skipped": [{"name": name, "reason": reason} for name, reason in c.skipped],
        "fidelity": {
            "max_abs_error": f.max_abs_error,
            "relative_error": _finite(f.relative_error),
            "cosine_similarity": f.cosine_similarity,
            "sqnr_db": _finite(f.sqnr_db),
            "top1_agreement": f.top1_agreement,
            "outputs": [
                {
                    "name": o.name,
                    "shape": list(o.shape),
                    "max_abs_error": o.max_abs_error,
                    "relative_error": _finite(o.relative_error),
                    "cosine_similarity": o.cosine_similarity,
                    "sqnr_db": _finite(o.sqnr_db),
                    "top1_agreement": o.top1_agreement,
                }
                for o in f.outputs
            ],
        },
        "unsupported_ops": {"before": c.before.unsupported_ops, "after": c.after.unsupported_ops},
    }


def _fidelity_line(c: Comparison) -> str:
    f = c.fidelity
    sqnr = "inf (identical)" if f.sqnr_db is None else f"{f.sqnr_db:.1f} dB"
    parts = [
        f"max abs error {f.max_abs_error:.3g}",
        f"relative error {f.relative_error:.3g}",
        f"cosine {f.cosine_similarity:.4f}",
        f"SQNR {sqnr}",
    ]
    if f.top1_agreement is not None:
        parts.append(f"top-1 agreement {f.top1_agreement:.1%}")
    return ", ".join(parts)


def _totals_rows(c: Comparison) -> list[tuple[str, str, str, str]]:
    return [
        ("params", human(c.before.params), human(c.after.params), _ratio(c.params_ratio)),
        ("FLOPs (multiply-adds)", human(c.before.flops), human(c.after.flops), _ratio(c.flops_ratio)),
    ]


_LAYER_HEAD = ("layer", "shape", "rank", "params", "FLOPs", "FLOPs ratio", "SVD weight error")


def _layer_rows(c: Comparison) -> list[tuple[str, ...]]:
    rows = []
    for layer in c.layers:
        k = "x".join(map(str, layer.kernel_size))
        shape = f"{layer.in_channels}->{layer.out_channels} {k}"
        if layer.stride != (1, 1):
            shape += f" /{layer.stride[0]}" if layer.stride[0] == layer.stride[1] else f" /{layer.stride}"
        if layer.groups > 1:
            shape += f" g{layer.groups}"
        rows.append(
            (
                layer.name,
                shape,
                f"{layer.rank} {layer.order}",
                f"{human(layer.params_before)} -> {human(layer.params_after)}",
                f"{human(layer.flops_before)} -> {human(layer.flops_after)}",
                _ratio(layer.flops_ratio),
                f"{layer.relative_error:.3f}",
            )
        )
    return rows


def to_markdown(comparison: Comparison) -> str:
    """The report as Markdown, for pull requests and notebooks."""
    c = comparison
    lines = [
        "## convtool report",
        "",
        f"Inputs: {', '.join('x'.join(map(str, s)) for s in c.before.input_shapes)}. {FLOPS_UNIT}.",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {a} | {b} | {d} | {e} |" for a, b, d, e in _totals_rows(c)),
        "",
        f"Output fidelity: {_fidelity_line(c)}.",
        "",
    ]
    if c.layers:
        lines += [
            f"### Separated layers ({len(c.layers)})",
            "",
            "| " + " | ".join(_LAYER_HEAD) + " |",
            "|---|---|---|---:|---:|---:|---:|",
            *("| " + " | ".join(row) + " |" for row in _layer_rows(c)),
            "",
        ]
    if c.skipped:
        lines += [f"### Left as they were ({len(c.skipped)})", "", "| name | reason |", "|---|---|"]
        lines += [f"| {name} | {reason} |" for name, reason in c.skipped]
        lines.append("")
    return "\n".join(lines)


def to_rich(comparison: Comparison, *, max_layers: int | None = 40) -> list[Any]:
    """Renderables for a rich Console: totals first, then the layers that changed."""
    from rich.table import Table

    c = comparison
    totals = Table(title="convtool: before / after", title_justify="left")
    for head, justify in (("", "left"), ("before", "right"), ("after", "right"), ("ratio", "right")):
        totals.add_column(head, justify=justify)
    for row in _totals_rows(c):
        totals.add_row(*row)
    out: list[Any] = [totals, f"Output fidelity: {_fidelity_line(c)}"]
    if c.layers:
        rows = _layer_rows(c)
        layers = Table(title=f"Separated layers ({len(rows)})", title_justify="left")
        for head in _LAYER_HEAD:
            layers.add_column(head, justify="left" if head in ("layer", "shape") else "right")
        shown = rows if max_layers is None else rows[:max_layers]
        for row in shown:
            layers.add_row(*row)
        if len(shown) < len(rows):
            layers.add_row(f"... {len(rows) - len(shown)} more (see --report)", *[""] * (len(_LAYER_HEAD) - 1))
        out.append(layers)
    if c.skipped:
        skipped = Table(title=f"Left as they were ({len(c.skipped)})", title_justify="left")
        skipped.add_column("name")
        skipped.add_column("reason")
        for name, reason in c.skipped:
            skipped.add_row(name, reason)
        out.append(skipped)
    return out


def analysis_to_dict(analysis: Analysis) -> dict[str, Any]:
    """One model's costs as JSON-ready data (``convtool analyze --report x.json``)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "flops_unit": FLOPS_UNIT,
        "input_shapes": [list(s) for s in analysis.input_shapes],
        "params": analysis.params,
        "flops": analysis.flops,
        "modules": [
            {"name": m.name, "type": m.type, "params": m.params, "flops": m.flops} for m in analysis.modules if m.name
        ],
        "unsupported_ops": analysis.unsupported_ops,
    }


def _leaf_rows(analysis: Analysis, limit: int | None) -> list[ModuleCost]:
    """Modules without submodules that cost something, most FLOPs first."""
    names = [m.name for m in analysis.modules]
    leaves = [
        m for m in analysis.modules
        if m.name and not any(n.startswith(m.name + ".") for n in names) and (m.params or m.flops)
    ]
    leaves.sort(key=lambda m: -m.flops)
    return leaves if limit is None else leaves[:limit]


def analysis_markdown(analysis: Analysis, *, limit: int | None = None) -> str:
    """One model's costs as Markdown."""
    lines = [
        "## convtool analysis",
        "",
        f"Inputs: {', '.join('x'.join(map(str, s)) for s in analysis.input_shapes)}. {FLOPS_UNIT}.",
        "",
        f"Parameters: {human(analysis.params)} ({analysis.params}). FLOPs: {human(analysis.flops)} ({analysis.flops}).",
        "",
        "| module | type | params | FLOPs |",
        "|---|---|---:|---:|",
        *(f"| {m.name} | {m.type} | {human(m.params)} | {human(m.flops)} |" for m in _leaf_rows(analysis, limit)),
    ]
    if analysis.unsupported_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(analysis.unsupported_ops.items()))
        lines += ["", f"Not counted (fvcore has no counter): {ops}."]
    return "\n".join(lines) + "\n"


def analysis_rich(analysis: Analysis, *, limit: int | None = 30) -> list[Any]:
    """Renderables for a rich Console: totals, then the costliest layers."""
    from rich.table import Table

    table = Table(
        title=f"convtool: {human(analysis.params)} params, {human(analysis.flops)} FLOPs (multiply-adds)",
        title_justify="left",
    )
    for head, justify in (("module", "left"), ("type", "left"), ("params", "right"), ("FLOPs", "right")):
        table.add_column(head, justify=justify)
    for m in _leaf_rows(analysis, limit):
        table.add_row(m.name, m.type, human(m.params), human(m.flops))
    out: list[Any] = [table]
    if analysis.unsupported_ops:
        out.append("Not counted (fvcore has no counter): " + ", ".join(sorted(analysis.unsupported_ops)))
    return out
