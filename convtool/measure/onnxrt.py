"""onnxruntime sessions and timing: which providers run here, and how fast a module runs on one.

onnxruntime falls back to the CPU silently when a provider cannot load (CUDA libraries
missing, driver too old). Nothing here times a provider that did not run: asking for one
that is not in this build, or that fell back, raises :class:`ProviderUnavailableError`, so a
CPU figure is never filed under CUDA.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.inputs import as_inputs, tensors_of
from ..core.names import describe_error
from ..errors import InvalidOptionError, OnnxFileError, ProviderUnavailableError
from .onnx_file import write_onnx

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


def provider_name(name: str) -> str:
    """onnxruntime's provider name from a short name (``"cuda"``) or the full name."""
    if name in SHORT_NAMES.values() or name.endswith("ExecutionProvider"):
        return name
    try:
        return SHORT_NAMES[name.lower()]
    except KeyError:
        known = ", ".join(SHORT_NAMES)
        raise InvalidOptionError(f"unknown provider {name!r}; use one of {known} or onnxruntime's full name") from None


def missing_reason(name: str) -> str | None:
    """Why provider ``name`` (full name) is not in this onnxruntime build, with how to get it; None if it is."""
    import onnxruntime as ort

    if name in ort.get_available_providers():
        return None
    hint = _INSTALL_HINT.get(name, "install an onnxruntime build that includes it")
    return f"{name} is not in this onnxruntime build; {hint}"


def require_provider(provider: str) -> str:
    """onnxruntime's name for ``provider``, or :class:`ProviderUnavailableError` if this build lacks it."""
    name = provider_name(provider)
    reason = missing_reason(name)
    if reason:
        raise ProviderUnavailableError(f"cannot time on {provider!r}: {reason}")
    return name


def open_session(path: str | os.PathLike, provider: str, threads: int | None = None, lean: bool = False,
                 strict: bool = False, spin: bool = True):
    """An onnxruntime session on ``provider`` (CPU as fallback for nodes it cannot run).

    ``lean`` is for a session run once, to check outputs rather than to time: its CPU kernels do
    not pre-pack the weights (a second copy of each conv's and matmul's weight, in the layout
    their GEMM wants) and it keeps no memory arena, so it holds about one copy of the model.
    ``strict`` runs every node on ``provider`` or refuses: a provider that lacks a kernel for one
    (an int8 model's quantized ops, say) would otherwise hand that node to the CPU unseen.
    ``spin=False``: its intra-op threads sleep between runs instead of spinning (see :func:`timing_session`).

    Raises:
        ProviderUnavailableError: this build has no kernel for a node on ``provider`` (any
            provider for an op or dtype it cannot run; a provider other than the CPU when
            ``strict``).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"{path} does not exist; export the model first (convtool export)")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lean:
        options.enable_cpu_mem_arena = False
        options.add_session_config_entry("session.disable_prepacking", "1")
    alone = provider == "CPUExecutionProvider" or strict
    if alone and provider != "CPUExecutionProvider":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        options.log_severity_level = 4  # the refusal is raised below, in one line; onnxruntime would log it too
    providers = [provider] if alone else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:
        if type(error).__name__ == "NotImplemented":  # a valid model with an op or dtype this build has no kernel for
            raise ProviderUnavailableError(f"onnxruntime cannot run {path.name} on {provider}: {describe_error(error)}") from None
        if strict and "fallback" in str(error).lower():  # a node the provider cannot run, and the CPU may not take it
            raise ProviderUnavailableError(f"{provider} has no kernel for some nodes of {path.name} (onnxruntime would run "
                                           "them on the CPU); run it on CPUExecutionProvider") from None
        raise OnnxFileError(f"{path} is not a valid ONNX model onnxruntime can load ({describe_error(error)}); export it again") from error


def timing_session(path: str | os.PathLike, provider: str, threads: int | None = None, strict: bool = False):
    """A session to time on ``provider`` (onnxruntime's name): refused if onnxruntime fell back to the CPU.

    A fallback would time the CPU under the provider's name. ``strict``: as :func:`open_session`'s.
    Its intra-op threads do not spin between runs: every session owns its thread pool, and sessions
    timed round-robin in one process would otherwise spin on the cores the next one runs on (2
    cores, 2 threads: the pitch estimator's four files ran 3-7x slower round-robin than alone, and
    a separated int8 file 1.8x faster than the dense int8 one alone timed 1.04x faster;
    benchmarks/RESULTS.md, issue 37).

    Raises:
        ProviderUnavailableError: the session runs on the CPU instead.
    """
    session = open_session(path, provider, threads, strict=strict, spin=False)
    if session.get_providers()[0] != provider:
        raise ProviderUnavailableError(f"cannot time on {provider!r}: onnxruntime could not load it and fell back to the CPU")
    return session


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the system (glibc keeps it otherwise).

    An onnxruntime session's weights and buffers, freed when it closes, stay in the process's
    resident memory under glibc, and what comes next (the next session, writing the model)
    piles on top: the peak of a conversion is then the sum of its phases, not their maximum.
    Does nothing where the C library has no ``malloc_trim``.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def feed(session, inputs: tuple) -> dict[str, Any]:
    """The session's inputs by name, from the model's (possibly nested) inputs in flattening order."""
    names = [i.name for i in session.get_inputs()]
    tensors = tensors_of(inputs)
    if len(names) != len(tensors):
        raise OnnxFileError(f"the ONNX model takes {len(names)} inputs but {len(tensors)} were given; check --input-shape")
    return {name: numpy(x) for name, x in zip(names, tensors)}


def has_dynamic_batch(session) -> bool:
    """Whether any input's first dimension is symbolic (inputs that are not per-sample keep theirs)."""
    return any(not isinstance(i.shape[0], int) for i in session.get_inputs() if i.shape)


def time_sessions(sessions: Sequence[Any], inputs: dict[str, Any], runs: int, warmup: int) -> list[float]:
    """Median milliseconds of each session, timed round-robin so drift hits all alike."""
    for session in sessions:
        for _ in range(warmup):
            session.run(None, inputs)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, inputs)
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
) -> list[float]:
    """Export each module as it is and time them all on one provider, round-robin: medians in ms.

    Raises:
        ProviderUnavailableError: the provider is not in this build, or a session fell back to
            the CPU; nothing is timed then.
    """
    name = require_provider(provider)
    inputs = as_inputs(example_inputs)
    with tempfile.TemporaryDirectory(prefix="convtool-bench-") as tmp:
        sessions = []
        for i, module in enumerate(modules):
            exported = write_onnx(module, inputs, Path(tmp) / f"m{i}.onnx", dynamic_batch=False, exporter=exporter)
            sessions.append(timing_session(exported.path, name, threads))
        return time_sessions(sessions, feed(sessions[0], inputs), runs, warmup)


_LATENCY_CACHE: dict[tuple, float] = {}
MIN_TIMED_MS = 100.0  # time small modules over at least this long in all
MAX_RUNS = 1000


def module_fingerprint(module: nn.Module) -> tuple:
    """What decides a small module's latency: its classes, hyper-parameters and tensor shapes."""
    parts = []
    for m in module.modules():
        settings = tuple(sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and k != "training"))
        parts.append((type(m).__name__, settings))
    parts.append(tuple((tuple(p.shape), str(p.dtype)) for p in module.parameters()))
    return tuple(parts)


def module_latency(module: nn.Module, input_shape: tuple[int, ...], provider: str, runs: int = 15) -> float:
    """Median latency (ms) of one small module alone on ``provider`` at ``input_shape``.

    For per-layer decisions: exported with the TorchScript exporter (fast, exact for a single
    conv or pair), as it is, so the caller decides the form being timed. Cached per module
    structure, shape and provider.

    Raises:
        ProviderUnavailableError: the provider cannot run here.
    """
    name = require_provider(provider)
    key = (module_fingerprint(module), tuple(input_shape), name)

    def measure() -> float:
        with tempfile.TemporaryDirectory(prefix="convtool-bench-") as tmp:
            path, feeds = module_session(module, input_shape, Path(tmp))
            return time_alone(timing_session(path, name), feeds, runs)

    return cached_latency(key, measure)


def graph_latency(path: str | os.PathLike, feeds: dict[str, Any], provider: str, key: tuple, runs: int = 15) -> float:
    """Median latency (ms) of a small ONNX graph alone on ``provider``, as :func:`module_latency` times a module.

    ``key``: what decides its latency (its nodes' types, attributes and shapes), for the cache.
    """
    name = require_provider(provider)
    return cached_latency(("graph", key, name), lambda: time_alone(timing_session(path, name), feeds, runs))


PAIRED_MS = 100.0  # each form of a paired timing runs at least this long in all
PAIRED_RUNS = (30, 3000)  # and this many times, at least and at most


def paired_latencies(timed: Sequence[tuple[Any, dict[str, Any]]]) -> list[float]:
    """Median ms of each (session, feeds), timed round-robin, enough runs that each adds to :data:`PAIRED_MS`.

    What decides between a layer's forms: the ratio of two figures measured at different
    moments moves with whatever else the machine did in between (a 15 µs conv measured 0.89 and
    1.23 of its dense time in two runs, idle); run by run in turn, both see the same machine.
    """
    for session, feeds in timed:
        for _ in range(10):
            session.run(None, feeds)
    probe = max(time_each(timed, 5))
    runs = int(min(max(PAIRED_MS / max(probe, 1e-3), PAIRED_RUNS[0]), PAIRED_RUNS[1]))
    return time_each(timed, runs)


def time_each(timed: Sequence[tuple[Any, dict[str, Any]]], runs: int) -> list[float]:
    """Median ms of each (session, feeds) over ``runs`` rounds, one run of each per round."""
    times: list[list[float]] = [[] for _ in timed]
    for _ in range(runs):
        for i, (session, feeds) in enumerate(timed):
            start = time.perf_counter()
            session.run(None, feeds)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1000 for t in times]


def module_session(module: nn.Module, input_shape: tuple[int, ...], folder: Path) -> tuple[Path, dict[str, Any]]:
    """One small module exported as it is (as :func:`module_latency` times it) to ``folder``: its file and feeds."""
    x = torch.randn(input_shape, dtype=next(module.parameters()).dtype)
    exported = write_onnx(module.cpu(), (x,), folder / "m.onnx", dynamic_batch=False, exporter="torchscript")
    return exported.path, {"input": numpy(x)}


def cached_latency(key: tuple, measure: Callable[[], float]) -> float:
    """The figure cached under ``key``, or ``measure()`` once, cached: a layer's latency, measured once per process.

    ``key`` holds everything that decides the figure (the layer's structure and shape, the
    provider, the form it is timed in); ``measure`` prepares and times it only on a miss.
    """
    if key not in _LATENCY_CACHE:
        _LATENCY_CACHE[key] = measure()
    return _LATENCY_CACHE[key]


def time_alone(session, feeds: dict[str, Any], runs: int) -> float:
    """The median of ``runs``; of more where that is too short to mean anything (a layer of microseconds)."""
    (ms,) = time_sessions([session], feeds, runs, warmup=3)
    if ms * runs < MIN_TIMED_MS:
        more = min(MAX_RUNS, int(MIN_TIMED_MS / max(ms, 1e-3)))
        (ms,) = time_sessions([session], feeds, more, warmup=10)
    return ms
