"""One report, three renderings: a rich table for terminals, JSON for pipelines, Markdown.

The JSON keys are a contract (``SCHEMA_VERSION``); a test compares a golden file so that a
renamed key is a conscious act. A separated layer is written as its
:class:`~convtool.LayerChange` record, every field under its own name, and each table column
shows those fields. Tables round numbers for people (12.3M, 4.56G); JSON keeps them exact.

Schema history: 2 (convtool 0.2) writes each layer as the whole ``LayerChange`` record
(``weight_relative_error`` became ``weight_error``; ``aliases``, ``source``, ``calls`` and
``output_error`` are new), adds ``verified`` and ``latency`` (null unless measured), and gives each analysed
module its ``own_params`` / ``own_flops``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..core.records import LayerChange, Search, measured_words
from ..measure.compare import Comparison
from ..measure.counts import FLOPS_UNIT, Analysis, ModuleCost

# 3: layers carry "transposed"; 4: "budget_search"; 5: "latency_search"; 6: one "search" for every searched
# budget (replacing both), and an ONNX separation's "not_refit", "counted" and "not_run"; 7: "int8" (--int8).
SCHEMA_VERSION = 7


def human(n: float | None) -> str:
    """12345678 -> '12.3M': three significant digits and an SI suffix."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            value = n / factor
            return f"{value:.3g}{suffix}" if value < 1000 else f"{value:.0f}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def _ratio(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None and math.isfinite(r) else "-"


def _json_value(x: Any) -> Any:
    """Tuples as lists, infinities and NaN as null: strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (tuple, list)):
        return [_json_value(v) for v in x]
    return x


def layer_to_dict(layer: LayerChange) -> dict[str, Any]:
    """A layer record as JSON-ready data: every field, under its own name."""
    return {f.name: _json_value(getattr(layer, f.name)) for f in dataclasses.fields(layer)}


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
        "verified": c.verified,
        "totals": {
            "params_before": c.before.params,
            "params_after": c.after.params,
            "params_ratio": _json_value(c.params_ratio),
            "flops_before": c.before.flops,
            "flops_after": c.after.flops,
            "flops_ratio": _json_value(c.flops_ratio),
        },
        "layers": [layer_to_dict(layer) for layer in c.layers],
        "skipped": [{"name": name, "reason": reason} for name, reason in c.skipped],
        "fidelity": {
            **{k: _json_value(v) for k, v in dataclasses.asdict(f).items() if k != "outputs"},
            "outputs": [{k: _json_value(v) for k, v in dataclasses.asdict(o).items()} for o in f.outputs],
        },
        "latency": None if c.latency is None else {
            **{k: _json_value(v) for k, v in dataclasses.asdict(c.latency).items()},
            "speedup": c.latency.speedup,
            "slower_layers": [dataclasses.asdict(layer) for layer in c.slower_layers],
        },
        "unsupported_ops": {"before": c.before.unsupported_ops, "after": c.after.unsupported_ops},
        "search": None if c.search is None else search_dict(c.search),
        "not_refit": [{"name": name, "reason": reason} for name, reason in c.not_refit],
        "counted": list(c.counted),
        "not_run": list(c.not_run),
        "int8": None if c.int8 is None else int8_dict(c.int8),
    }


def int8_dict(int8: Any) -> dict[str, Any]:
    """The int8 file's comparison as JSON-ready data: every field (each fidelity without its per-output rows), and both ratios."""
    fields = {k: getattr(int8, k) for k in (f.name for f in dataclasses.fields(int8))}
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if dataclasses.is_dataclass(value):
            value = {k: _json_value(v) for k, v in dataclasses.asdict(value).items() if k != "outputs"}
        out[key] = list(value) if isinstance(value, tuple) else _json_value(value)
    return {**out, "vs_original": _json_value(int8.vs_original), "vs_dense_int8": _json_value(int8.vs_dense_int8)}


def int8_lines(int8: Any) -> list[str]:
    """The int8 file's two latency ratios (against the fp32 original and the dense int8 model), and what each file keeps."""
    if int8 is None:
        return []
    f = int8.form
    form = f"{f.format.upper()}, {'per-channel' if f.per_channel else 'per-tensor'} {f.weights} weights, {f.activations} activations"
    floats = f"; in float: {', '.join(int8.float_convs)}" if int8.float_convs else ""
    lines = [
        f"int8 file {int8.path} ({form}; {int8.int8_convs} convs in int8{floats}; calibrated on {int8.calibration_samples} samples).",
        f"int8 on onnxruntime {int8.provider}: {int8.int8_ms:.3g} ms = {int8.vs_original:.3f} of the fp32 original's "
        f"{int8.original_ms:.3g} ms ({_speed(int8.vs_original)}) and {int8.vs_dense_int8:.3f} of the dense int8 "
        f"model's {int8.dense_int8_ms:.3g} ms ({_speed(int8.vs_dense_int8)}); separated fp32 {int8.fp32_ms:.3g} ms "
        f"(medians of {int8.runs} interleaved runs).",
    ]
    judged = "; ".join(f"{what}: {_brief_fidelity(fid)}" for what, fid in (
        ("separated int8", int8.int8), ("separated fp32", int8.fp32), ("dense int8", int8.dense_int8)))
    lines.append(f"Against the fp32 original on {int8.held_out} held-out samples: {judged}.")
    return lines


def _speed(ratio: float) -> str:
    """A latency ratio in words: '1.52x faster', or 'SLOWER, 1.10x'."""
    return f"{1 / ratio:.2f}x faster" if ratio <= 1 else f"SLOWER, {ratio:.2f}x"


def _brief_fidelity(f: Any) -> str:
    sqnr = "identical" if f.sqnr_db is None or not math.isfinite(f.sqnr_db) else f"SQNR {f.sqnr_db:.1f} dB"
    return sqnr + ("" if f.top1_agreement is None else f", top-1 agreement {f.top1_agreement:.1%}")


def search_dict(search: Search) -> dict[str, Any]:
    """How a searched budget was found, as JSON-ready data: the target (its type and fields), what the model returned
    measured, and every plan tried."""
    target = search.target
    fields = dataclasses.asdict(target) if dataclasses.is_dataclass(target) else {}
    return {
        "target": {"type": type(target).__name__,
                   **{k: _json_value(getattr(v, "__name__", repr(v)) if callable(v) else v) for k, v in fields.items()}},
        "goal": search.goal, "met": search.met, "reason": search.reason, "flops_fraction": search.flops_fraction,
        "latency": None if search.latency is None else {**{k: _json_value(v) for k, v in dataclasses.asdict(search.latency).items()},
                                                        "ratio": search.latency.ratio},
        "top1_agreement": search.top1_agreement, "sqnr_db": _json_value(search.sqnr_db), "held_out_samples": search.samples,
        "floor": search.floor, "tried": [{k: _json_value(v) for k, v in dataclasses.asdict(t).items()} for t in search.tried],
        "baseline": search.baseline,
    }


def search_line(search: Search) -> str:
    """How a searched budget was found, or why not, in one or two sentences: the goal, what the model returned measured."""
    parts = []
    t = search.latency
    if t is not None:
        threads = f"{t.threads} threads" if t.threads else "onnxruntime's default threads"
        parts.append(f"{t.ratio:.3f} of {search.baseline}'s latency ({t.separated_ms:.3g} / {t.original_ms:.3g} ms, medians of "
                     f"{t.runs} interleaved runs on {t.provider}, {threads})")
    if search.samples:
        measure = getattr(search.target, "measure", "top-1 agreement")
        parts.append(f"{measured_words(search.top1_agreement, search.sqnr_db, measure)} on {search.samples} held-out calibration samples "
                     "(not used by the refit)")
    parts.append(f"{search.flops_fraction:.3f} of the FLOPs")
    count = len(search.tried)
    line = f"Searched for {search.goal}: the model returned measured {', '.join(parts)}; {count} plan{'s' if count != 1 else ''} tried."
    return f"{line} {search.reason[0].upper()}{search.reason[1:]}." if search.reason else line


def _trial_rows(search: Search) -> list[str]:
    """The plans a search tried, as a Markdown table."""
    measure = getattr(search.target, "measure", "top-1 agreement")
    rows = [f"| plan | budget | FLOPs | latency | {measure} | SQNR dB | met |", "|---:|---:|---:|---:|---:|---:|---|"]
    for i, t in enumerate(search.tried):
        rows.append(_md_row((str(i + 1), f"{t.budget:.3f} of the {'layer ms' if t.unit == 'ms' else 'FLOPs'}",
                             f"{t.flops_fraction:.3f}", "-" if t.latency_ratio is None else f"{t.latency_ratio:.3f}",
                             "-" if t.top1_agreement is None else f"{t.top1_agreement:.2%}",
                             "-" if t.sqnr_db is None else f"{t.sqnr_db:.1f}", "yes" if t.met else "no")))
    return rows


def notes(c: Comparison) -> list[str]:
    """What an ONNX separation says beyond its layers: what the FLOPs count, what its check did not run, what was not refit."""
    lines = [f"counted: {branch}" for branch in c.counted]
    if c.not_run:
        lines.append("not run by the check (a branch its inputs did not take; give inputs that take it to check it): "
                     + ", ".join(c.not_run))
    lines += [f"not refit (kept as its SVD factors): {name}: {reason}" for name, reason in c.not_refit]
    return lines


def run_lines(runs) -> list[str]:
    """One line per provider an ONNX separation ran both graphs on, or why it did not."""
    return [f"{r.provider}: ran both models; max abs error {r.max_abs_error:.3g}, relative {r.relative_error:.3g}" if r.ran
            else f"{r.provider}: not run: {r.reason}" for r in runs]


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


def _latency_lines(c: Comparison) -> list[str]:
    """Both latencies, and when the separated model is slower, which layers lose and what keeps them dense."""
    t = c.latency
    if t is None:
        return []
    line = f"onnxruntime {t.provider}: original {t.original_ms:.3g} ms, separated {t.separated_ms:.3g} ms"
    if t.speedup >= 1:
        return [f"{line} ({t.speedup:.2f}x faster)."]
    lines = [f"{line}: the separated model is SLOWER ({t.speedup:.2f}x)."]
    if c.slower_layers:
        losers = ", ".join(f"{l.name} ({l.dense_ms:.3g} ms dense, {l.separated_ms:.3g} ms separated)" for l in c.slower_layers)
        short = t.provider.removesuffix("ExecutionProvider").lower()
        lines.append(f"Layers whose separated form is not faster: {losers}; --latency {short} keeps such layers dense.")
    return lines


def _uncounted_line(c: Comparison) -> str | None:
    """Where some ops ran uncounted, that the FLOPs and their ratio are of the counted part, and which ops those are."""
    ops = dict(c.after.unsupported_ops) | dict(c.before.unsupported_ops)
    if not ops:
        return None
    shown = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
    return f"FLOPs and their ratio are of the counted part only; not counted (no counting rule, or shapes not known): {shown}."


def _verified_line(c: Comparison) -> str | None:
    if c.verified is None:
        return None
    if c.verified:
        return "Verified: every separated layer ran in the separated model, and none of the convs it replaced did."
    return "NOT VERIFIED: the separated model could not be run, so no layer is proven to run (pass example inputs)."


def _totals_rows(c: Comparison) -> list[tuple[str, str, str, str]]:
    return [
        ("params", human(c.before.params), human(c.after.params), _ratio(c.params_ratio)),
        ("FLOPs (multiply-adds)", human(c.before.flops), human(c.after.flops), _ratio(c.flops_ratio)),
    ]


# Column titles are the record's field names, in words.
_LAYER_HEAD = ("name", "shape", "rank", "params", "flops", "flops ratio", "calls", "weight error", "output error")


def _shape(layer: LayerChange) -> str:
    shape = f"{layer.in_channels}->{layer.out_channels} {'x'.join(map(str, layer.kernel_size))}"
    step = "*" if layer.transposed else "/"  # a transposed conv's stride upsamples
    if any(s != 1 for s in layer.stride):
        shape += f" {step}{layer.stride[0]}" if len(set(layer.stride)) == 1 else f" {step}{layer.stride}"
    if layer.transposed:
        shape += " transposed"
    if layer.groups > 1:
        shape += f" g{layer.groups}"
    return shape


def _layer_rows(c: Comparison) -> list[tuple[str, ...]]:
    rows = []
    for layer in c.layers:
        name = layer.name + (f" (+{len(layer.aliases)})" if layer.aliases else "")
        rows.append(
            (
                name,
                _shape(layer),
                f"{layer.rank} {layer.order}",
                f"{human(layer.params_before)} -> {human(layer.params_after)}",
                f"{human(layer.flops_before)} -> {human(layer.flops_after)}",
                _ratio(layer.flops_ratio),
                "-" if layer.calls is None else str(layer.calls),
                f"{layer.weight_error:.3f}",
                "-" if layer.output_error is None else f"{layer.output_error:.3f}",
            )
        )
    return rows


def _md(text: str) -> str:
    """A table cell: pipes escaped, lines joined."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_row(cells: tuple[str, ...] | list[str]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


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
        *(_md_row(row) for row in _totals_rows(c)),
        "",
    ]
    uncounted = _uncounted_line(c)
    if uncounted:
        lines += [_md(uncounted), ""]
    lines += [f"Output fidelity: {_fidelity_line(c)}.", ""]
    verified = _verified_line(c)
    if verified:
        lines += [verified, ""]
    if c.search is not None:
        lines += [_md(search_line(c.search)), "", *_trial_rows(c.search), ""]
    for text in notes(c):
        lines += [_md(text), ""]
    for text in _latency_lines(c) + int8_lines(c.int8):
        lines += [_md(text), ""]
    if c.layers:
        lines += [
            f"### Separated layers ({len(c.layers)})",
            "",
            _md_row(_LAYER_HEAD),
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
            *(_md_row(row) for row in _layer_rows(c)),
            "",
        ]
    if c.skipped:
        lines += [f"### Left as they were ({len(c.skipped)})", "", _md_row(("name", "reason")), "|---|---|"]
        lines += [_md_row((name, reason)) for name, reason in c.skipped]
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
    out: list[Any] = [totals, *filter(None, [_uncounted_line(c)]), f"Output fidelity: {_fidelity_line(c)}"]
    verified = _verified_line(c)
    if verified:
        out.append(verified)
    if c.search is not None:
        out.append(search_line(c.search))
    out += notes(c)
    out += _latency_lines(c)
    out += int8_lines(c.int8)
    if c.layers:
        rows = _layer_rows(c)
        layers = Table(title=f"Separated layers ({len(rows)})", title_justify="left")
        for head in _LAYER_HEAD:
            layers.add_column(head, justify="left" if head in ("name", "shape") else "right")
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
        "modules": [dataclasses.asdict(m) for m in analysis.modules],  # the model itself is the row named ""
        "unsupported_ops": analysis.unsupported_ops,
    }


def cost_rows(analysis: Analysis, limit: int | None = None) -> list[ModuleCost]:
    """The modules whose own code costs something, most FLOPs first.

    Leaves, and also containers whose forward computes something itself (a functional conv,
    a parameter used directly): every counted FLOP and parameter is in exactly one row.
    """
    rows = [m for m in analysis.modules if m.own_params or m.own_flops]
    rows.sort(key=lambda m: -m.own_flops)
    return rows if limit is None else rows[:limit]


def _row_name(m: ModuleCost) -> str:
    is_leaf = m.own_params == m.params and m.own_flops == m.flops
    name = m.name or "<model>"
    return name if is_leaf else f"{name} (own code)"


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
        *(_md_row((_row_name(m), m.type, human(m.own_params), human(m.own_flops))) for m in cost_rows(analysis, limit)),
    ]
    if analysis.unsupported_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(analysis.unsupported_ops.items()))
        lines += ["", f"Not counted (no counting rule, or shapes not known): {_md(ops)}; FLOPs are of the counted part."]
    return "\n".join(lines) + "\n"


def analysis_rich(analysis: Analysis, *, limit: int | None = 30) -> list[Any]:
    """Renderables for a rich Console: totals, then the costliest modules."""
    from rich.table import Table

    table = Table(
        title=f"convtool: {human(analysis.params)} params, {human(analysis.flops)} FLOPs (multiply-adds)",
        title_justify="left",
    )
    for head, justify in (("module", "left"), ("type", "left"), ("params", "right"), ("FLOPs", "right")):
        table.add_column(head, justify=justify)
    for m in cost_rows(analysis, limit):
        table.add_row(_row_name(m), m.type, human(m.own_params), human(m.own_flops))
    out: list[Any] = [table]
    if analysis.unsupported_ops:
        out.append("Not counted (no counting rule, or shapes not known): " + ", ".join(sorted(analysis.unsupported_ops)))
    return out
