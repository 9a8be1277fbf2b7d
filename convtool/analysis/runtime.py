"""onnxruntime checks: does the ONNX file give the model's answers on each provider, and how fast.

onnxruntime falls back to the CPU silently when a provider cannot load (CUDA libraries
missing, driver too old). A check therefore reads ``session.get_providers()`` and never counts
a provider as passed unless it was really used.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import InvalidOptionError, OnnxFileError
from ..inputs import as_inputs, eval_mode

SHORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
_INSTALL_HINT = {
    "CUDAExecutionProvider": "pip install 'convtool[gpu]' (onnxruntime-gpu, in place of onnxruntime) on a machine with CUDA",
    "TensorrtExecutionProvider": "pip install 'convtool[gpu]' (onnxruntime-gpu) with TensorRT installed",
}
DEFAULT_PROVIDERS = ("cpu", "cuda")


@dataclass(frozen=True)
class ProviderCheck:
    """The verdict for one execution provider.

    Attributes:
        provider: onnxruntime's name for it (``"CPUExecutionProvider"``).
        available: this onnxruntime build has the provider.
        used: the session really ran on it (onnxruntime did not fall back to the CPU).
        passed: used, and every output matched the reference at every batch size checked.
        max_abs_error: worst absolute difference to the reference model over all outputs.
        latency_ms: median latency of one run at the first batch size (1 where the batch is
            dynamic), after warm-up.
        batch_sizes: the batch sizes checked (two of them prove a dynamic batch axis).
        reason: why it did not run or did not pass; ``None`` when it passed.
    """

    provider: str
    available: bool
    used: bool
    passed: bool
    max_abs_error: float | None = None
    latency_ms: float | None = None
    batch_sizes: tuple[int, ...] = ()
    reason: str | None = None


def provider_name(name: str) -> str:
    """onnxruntime's provider name from a short name (``"cuda"``) or the full name."""
    if name in SHORT_NAMES.values() or name.endswith("ExecutionProvider"):
        return name
    try:
        return SHORT_NAMES[name.lower()]
    except KeyError:
        known = ", ".join(SHORT_NAMES)
        raise InvalidOptionError(f"unknown provider {name!r}; use one of {known} or onnxruntime's full name") from None


def open_session(path: str | os.PathLike, provider: str, threads: int | None = None):
    """An onnxruntime session on ``provider`` (CPU as fallback for nodes it cannot run)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"{path} does not exist; export the model first (convtool export)")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise OnnxFileError(f"{path} is not a valid ONNX model onnxruntime can load ({first}); export it again") from error


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _batched(inputs: tuple, size: int) -> tuple:
    """The example inputs cut or repeated to ``size`` rows."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            reps = -(-size // x.shape[0])
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:size]
        out.append(x)
    return tuple(out)


def _feed(session, inputs: tuple) -> dict[str, Any]:
    names = [i.name for i in session.get_inputs()]
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if len(names) != len(tensors):
        raise OnnxFileError(f"the ONNX model takes {len(names)} inputs but {len(tensors)} were given; check --input-shape")
    return {name: _numpy(x) for name, x in zip(names, tensors)}


def _dynamic_batch(session) -> bool:
    return all(not isinstance(i.shape[0], int) for i in session.get_inputs() if i.shape)


def verify_onnx(
    path: str | os.PathLike,
    reference_model: nn.Module,
    example_inputs: Any,
    *,
    providers: Sequence[str] | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    runs: int = 20,
    warmup: int = 3,
) -> list[ProviderCheck]:
    """Run an ONNX file on each provider and compare it with the PyTorch model.

    Args:
        path: the ONNX file.
        reference_model: the model the file was exported from (run in eval mode on its device).
        example_inputs: a tensor or tuple of tensors; checked at batch 1 and, when the file has
            a dynamic batch axis, at a second batch size.
        providers: short (``"cpu"``, ``"cuda"``) or full onnxruntime names; CPU and CUDA by default.
        rtol, atol: tolerances of ``numpy.allclose`` against the reference outputs.
        runs, warmup: timed and untimed runs for ``latency_ms``.

    Returns:
        One :class:`ProviderCheck` per provider, in the order asked. Returns rather than raises
        on a mismatch, so a pipeline can report every provider.

    Raises:
        OnnxFileError: the file is missing or not a model onnxruntime can load.
        InvalidOptionError: an unknown provider name.

    Example:
        >>> [c.provider for c in verify_onnx("m.onnx", model, x, providers=["cpu"]) if c.passed]
        ['CPUExecutionProvider']
    """
    import onnxruntime as ort

    names = [provider_name(p) for p in (providers or DEFAULT_PROVIDERS)]
    inputs = as_inputs(example_inputs)
    available = set(ort.get_available_providers())
    checks = []
    for name in names:
        if name not in available:
            hint = _INSTALL_HINT.get(name, "install an onnxruntime build that includes it")
            checks.append(ProviderCheck(name, False, False, False, reason=f"not in this onnxruntime build; {hint}"))
            continue
        session = open_session(path, name)
        if session.get_providers()[0] != name:
            checks.append(
                ProviderCheck(name, True, False, False, reason=f"onnxruntime could not load {name} and fell back to the CPU")
            )
            continue
        checks.append(_check(session, name, reference_model, inputs, rtol, atol, runs, warmup))
    return checks


def _check(session, name, model, inputs, rtol, atol, runs, warmup) -> ProviderCheck:
    sizes = (1, max(3, _first_batch(inputs))) if _dynamic_batch(session) else (_first_batch(inputs),)
    worst, failures = 0.0, []
    for size in sizes:
        batch = _batched(inputs, size)
        with eval_mode(model), torch.no_grad():
            reference, _ = tree_flatten(model(*batch))
        try:
            got = session.run(None, _feed(session, batch))
        except OnnxFileError:
            raise
        except Exception as error:  # onnxruntime's own errors: shapes or types the file refuses
            first = str(error).strip().splitlines()[0][:240]
            return ProviderCheck(name, True, True, False, reason=f"onnxruntime failed at batch {size}: {first}")
        if len(got) != len(reference):
            raise OnnxFileError(f"the ONNX model has {len(got)} outputs, the reference model {len(reference)}")
        for i, (actual, expected) in enumerate(zip(got, reference)):
            expected = _numpy(expected)
            if actual.shape != expected.shape:
                failures.append(f"output {i} has shape {actual.shape}, expected {expected.shape} at batch {size}")
                continue
            worst = max(worst, float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0)))
            if not np.allclose(actual, expected, rtol=rtol, atol=atol):
                failures.append(f"output {i} differs at batch {size}")
    feed = _feed(session, _batched(inputs, sizes[0]))
    (latency,) = time_sessions([session], feed, runs, warmup)
    reason = None
    if failures:
        reason = f"{'; '.join(failures[:3])} (max abs error {worst:.3g}, rtol={rtol}, atol={atol})"
    return ProviderCheck(name, True, True, not failures, worst, latency, sizes, reason)


def _first_batch(inputs: tuple) -> int:
    return next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)


@dataclass(frozen=True)
class Benchmark:
    """Latency of two models on one provider, timed interleaved in one run (medians, ms)."""

    provider: str
    used: bool
    original_ms: float
    separated_ms: float
    runs: int
    threads: int | None

    @property
    def speedup(self) -> float:
        """Original latency over separated latency (above 1: the separated model is faster)."""
        return self.original_ms / self.separated_ms


def time_sessions(sessions: Sequence[Any], feed: dict[str, Any], runs: int, warmup: int) -> list[float]:
    """Median milliseconds of each session, timed round-robin so drift hits all alike."""
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1000 for t in times]


def time_modules(
    modules: Sequence[nn.Module],
    example_inputs: Any,
    *,
    provider: str = "cpu",
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    exporter: str = "auto",
    fold_bn: bool = True,
    layout: str = "branches",
) -> tuple[list[float], bool]:
    """Export each module and time them all on one provider, round-robin: medians in ms.

    ``exporter``, ``fold_bn`` and ``layout`` are passed to :func:`~convtool.export_onnx`.
    Returns the medians and whether every session really ran on ``provider``.
    """
    from ..convert.onnx import export_onnx

    name = provider_name(provider)
    inputs = as_inputs(example_inputs)
    with tempfile.TemporaryDirectory(prefix="convtool-bench-") as tmp:
        sessions = []
        for i, module in enumerate(modules):
            exported = export_onnx(
                module, inputs, Path(tmp) / f"m{i}.onnx", dynamic_batch=False, exporter=exporter,
                fold_bn=fold_bn, layout=layout,
            )
            sessions.append(open_session(exported.path, name, threads))
        used = all(s.get_providers()[0] == name for s in sessions)
        return time_sessions(sessions, _feed(sessions[0], inputs), runs, warmup), used


_LATENCY_CACHE: dict[tuple, float] = {}


def module_latency(module: nn.Module, input_shape: tuple[int, ...], provider: str, key: tuple, runs: int = 15) -> float:
    """Median latency (ms) of one small module alone on ``provider``, cached under ``key``.

    For per-layer decisions: exported with the TorchScript exporter (fast, exact for a single
    conv or pair), as is, so the caller decides the form being timed.
    """
    key = (*key, provider_name(provider))
    if key not in _LATENCY_CACHE:
        x = torch.randn(input_shape, dtype=next(module.parameters()).dtype)
        (ms,), _ = time_modules(
            [module.cpu()], x, provider=provider, runs=runs, warmup=3, exporter="torchscript", fold_bn=False, layout="multiplier"
        )
        _LATENCY_CACHE[key] = ms
    return _LATENCY_CACHE[key]


def benchmark(
    original: nn.Module,
    separated: nn.Module,
    example_inputs: Any,
    *,
    provider: str = "cpu",
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
) -> Benchmark:
    """Export both models and time them on one onnxruntime provider, interleaved.

    The separated model is timed in the form :func:`~convtool.export_onnx` ships (BatchNorm
    folded, pairs in their fastest layout).

    Args:
        original, separated: the two models; exported with the same exporter settings.
        example_inputs: the inputs both are timed on (their batch size is used as is).
        provider: short or full provider name.
        runs, warmup: timed runs of each model, alternating, after ``warmup`` runs of each.
        threads: onnxruntime intra-op threads; onnxruntime's default when ``None``.

    Returns:
        A :class:`Benchmark` with the medians and the speedup.
    """
    (original_ms, separated_ms), used = time_modules(
        [original, separated], example_inputs, provider=provider, runs=runs, warmup=warmup, threads=threads
    )
    return Benchmark(provider_name(provider), used, original_ms, separated_ms, runs, threads)
