"""How far a model's outputs moved: error measures over tuple, list and dict outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import keystr

from ..core.inputs import flatten_with_paths


@dataclass(frozen=True)
class OutputFidelity:
    """Agreement of one output tensor (one leaf of the output structure).

    ``sqnr_db`` is 20*log10(||reference|| / ||reference - actual||); ``None`` when the two are
    identical (infinite SQNR). ``top1_agreement`` is the share of rows whose argmax agrees, for
    2-d float outputs (a batch of class logits); ``None`` otherwise.
    """

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    relative_error: float
    cosine_similarity: float
    sqnr_db: float | None
    top1_agreement: float | None


@dataclass(frozen=True)
class Fidelity:
    """Agreement over all outputs: worst max-abs error, pooled relative error, cosine and SQNR.

    ``top1_agreement`` is set when the model returns a single batch of class logits.
    """

    max_abs_error: float
    relative_error: float
    cosine_similarity: float
    sqnr_db: float | None
    top1_agreement: float | None
    outputs: tuple[OutputFidelity, ...]


def _measures(actual: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float, float | None]:
    """Max-abs, relative error, cosine and SQNR. NaN or infinity where the other has the same is agreement;
    anywhere else it is an unbounded error (the infinities are written as null in JSON)."""
    a = actual.detach().to(torch.float64).flatten().cpu()
    r = reference.detach().to(torch.float64).flatten().cpu()
    finite = torch.isfinite(a) & torch.isfinite(r)
    if not bool(finite.all()):
        same = (a == r) | (torch.isnan(a) & torch.isnan(r))
        if not bool((finite | same).all()):
            return math.inf, math.inf, math.nan, -math.inf
        a, r = a[finite], r[finite]
    diff = a - r
    err, ref_norm = float(diff.norm()), float(r.norm())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    relative = err / ref_norm if ref_norm > 0 else (0.0 if err == 0 else math.inf)
    denom = float(a.norm()) * ref_norm
    cosine = float(a @ r) / denom if denom > 0 else (1.0 if err == 0 else 0.0)
    sqnr = None if err == 0 else (20 * math.log10(ref_norm / err) if ref_norm > 0 else -math.inf)
    return max_abs, relative, cosine, sqnr


def output_fidelity(actual: Any, reference: Any) -> Fidelity:
    """Compare two model outputs leaf by leaf; structures must match.

    Raises:
        ValueError: the outputs differ in structure or shape.
    """
    a_leaves, a_spec = flatten_with_paths(actual)
    r_leaves, r_spec = flatten_with_paths(reference)
    if a_spec != r_spec:
        raise ValueError(f"the outputs differ in structure: {a_spec} against {r_spec}")
    rows: list[OutputFidelity] = []
    pairs = [(keystr(path) or "output", a, r) for (path, a), (_, r) in zip(a_leaves, r_leaves) if isinstance(r, torch.Tensor)]
    for name, a, r in pairs:
        if a.shape != r.shape:
            raise ValueError(f"output {name} has shape {tuple(a.shape)}, the reference {tuple(r.shape)}")
        max_abs, relative, cosine, sqnr = _measures(a, r)
        top1 = None
        if r.dim() == 2 and r.shape[1] > 1 and r.is_floating_point():
            top1 = float((a.argmax(1) == r.argmax(1)).double().mean())
        rows.append(OutputFidelity(name, tuple(r.shape), max_abs, relative, cosine, sqnr, top1))
    if not rows:
        raise ValueError("the model returned no tensor to compare")
    pooled = _measures(torch.cat([a.flatten().double() for _, a, _ in pairs]), torch.cat([r.flatten().double() for _, _, r in pairs]))
    return Fidelity(
        max_abs_error=max(row.max_abs_error for row in rows),
        relative_error=pooled[1],
        cosine_similarity=pooled[2],
        sqnr_db=pooled[3],
        top1_agreement=rows[0].top1_agreement if len(rows) == 1 else None,
        outputs=tuple(rows),
    )
