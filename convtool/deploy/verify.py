"""Does the ONNX file give the model's answers on each provider, and how fast does the shipped form run.

A provider is never counted as passed, nor timed, unless onnxruntime really ran on it: a
check reads ``session.get_providers()``, and :func:`benchmark` refuses a provider that
cannot run here rather than time the CPU under its name.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..core.inputs import as_inputs, batch_size, batched, eval_mode, model_device, on_device, run_checked
from ..core.modules import SeparableConv, conv_class
from ..core.names import describe_error
from ..core.records import Benchmark, LayerLatency
from ..errors import OnnxFileError, ProviderUnavailableError
from ..measure.onnx_file import write_onnx
from ..measure.onnxrt import (
    DEFAULT_PROVIDERS,
    feed,
    has_dynamic_batch,
    missing_reason,
    numpy,
    open_session,
    module_latency,
    provider_name,
    require_provider,
    time_sessions,
    timing_session,
)
from .int8 import Int8Form
from .int8_latency import quantized_for_timing
from .runtime_form import for_runtime


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


# Tolerances of numpy.allclose by the reference output's dtype: onnxruntime computes half
# precision convs with other accumulation orders than torch.
TOLERANCES = {
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
DEFAULT_TOLERANCE = (1e-3, 1e-4)


def verify_onnx(
    path: str | os.PathLike,
    reference_model: nn.Module,
    example_inputs: Any,
    *,
    providers: Sequence[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    runs: int = 20,
    warmup: int = 3,
) -> list[ProviderCheck]:
    """Run an ONNX file on each provider and compare it with the PyTorch model.

    Args:
        path: the ONNX file.
        reference_model: the model the file was exported from (run in eval mode on its device).
        example_inputs: a tensor or tuple of tensors; checked at their batch size, and when the
            file has a dynamic batch axis, at batch 1 and a second batch size.
        providers: short (``"cpu"``, ``"cuda"``) or full onnxruntime names; CPU and CUDA by default.
        rtol, atol: tolerances of ``numpy.allclose`` against the reference outputs; by default
            1e-3 / 1e-4, looser for float16 (1e-2) and bfloat16 (5e-2) outputs. ``atol`` is
            scaled by the largest magnitude of each output (when above 1).
        runs, warmup: timed and untimed runs for ``latency_ms``.

    Returns:
        One :class:`ProviderCheck` per provider, in the order asked. Returns rather than raises
        on a mismatch, so a pipeline can report every provider. A provider that has no kernel
        for the model (float64 convs on the CPU provider, say) is a check that did not pass.

    Raises:
        OnnxFileError: the file is missing or not a model onnxruntime can load.
        InvalidOptionError: an unknown provider name, or inputs the reference model does not take.

    Example:
        >>> [c.provider for c in verify_onnx("m.onnx", model, x, providers=["cpu"]) if c.passed]
        ['CPUExecutionProvider']
    """
    names = [provider_name(p) for p in (providers or DEFAULT_PROVIDERS)]
    inputs = on_device(as_inputs(example_inputs), model_device(reference_model))
    run_checked(reference_model, inputs)
    checks = []
    for name in names:
        missing = missing_reason(name)
        if missing:
            checks.append(ProviderCheck(name, False, False, False, reason=missing))
            continue
        try:
            session = open_session(path, name)
        except ProviderUnavailableError as error:
            checks.append(ProviderCheck(name, True, False, False, reason=str(error)))
            continue
        if session.get_providers()[0] != name:
            checks.append(
                ProviderCheck(name, True, False, False, reason=f"onnxruntime could not load {name} and fell back to the CPU")
            )
            continue
        checks.append(_check(session, name, reference_model, inputs, rtol, atol, runs, warmup))
    return checks


def _check(session, name, model, inputs, rtol, atol, runs, warmup) -> ProviderCheck:
    first = batch_size(inputs)
    sizes = (1, max(3, first)) if has_dynamic_batch(session) else (first,)
    worst: float | None = 0.0
    failures = []
    for size in sizes:
        batch = batched(inputs, size)
        try:
            with eval_mode(model), torch.no_grad():
                # A None among the outputs is no output of the file: tensors alone are compared.
                reference = [r for r in tree_flatten(model(*batch))[0] if isinstance(r, torch.Tensor)]
        except Exception as error:  # the file claims a batch size the model itself cannot take
            failures.append(f"the reference model does not run at batch {size} ({describe_error(error, 160)})")
            continue
        try:
            got = session.run(None, feed(session, batch))
        except OnnxFileError:
            raise
        except Exception as error:  # onnxruntime's own errors: shapes or types the file refuses
            return ProviderCheck(name, True, True, False, reason=f"onnxruntime failed at batch {size}: {_whole(error)}")
        if len(got) != len(reference):
            raise OnnxFileError(f"the ONNX model has {len(got)} outputs, the reference model {len(reference)}")
        for i, (actual, expected) in enumerate(zip(got, reference)):
            r_tol, a_tol = _tolerances(expected, rtol, atol)
            expected = numpy(expected)
            if actual.shape != expected.shape:
                failures.append(f"output {i} has shape {actual.shape}, expected {expected.shape} at batch {size}")
                worst = None  # not comparable: no error figure
                continue
            if worst is not None:
                worst = max(worst, float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0)))
            # atol is relative to the output's scale: float32 rounds large outputs by more than 1e-4.
            scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
            if not np.allclose(actual, expected, rtol=r_tol, atol=a_tol * scale):
                failures.append(f"output {i} differs at batch {size} (rtol={r_tol}, atol={a_tol} x {scale:.3g})")
    try:
        (latency,) = time_sessions([session], feed(session, batched(inputs, sizes[0])), runs, warmup)
    except Exception as error:  # onnxruntime refusing what it just ran: report, not a traceback
        return ProviderCheck(name, True, True, False, worst, None, sizes, f"onnxruntime failed while timing: {_whole(error)}")
    reason = None
    if failures:
        shown = f", max abs error {worst:.3g}" if worst is not None else ""
        reason = f"{'; '.join(failures[:3])}{shown}"
    return ProviderCheck(name, True, True, not failures, worst, latency, sizes, reason)


def _whole(error: BaseException, limit: int = 600) -> str:
    """onnxruntime's message on one line, every line of it: the part after its first line says which
    dimension it refused (``index: 0 Got: 1 Expected: 2``)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _tolerances(expected: Any, rtol: float | None, atol: float | None) -> tuple[float, float]:
    dtype = expected.dtype if isinstance(expected, torch.Tensor) else None
    default = TOLERANCES.get(dtype, DEFAULT_TOLERANCE)
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)


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

    Both are timed in the form :func:`~convtool.export_onnx` ships (BatchNorm folded, pairs in
    their runtime layout), so the figure is what a deployment gets.

    Args:
        original, separated: the two models.
        example_inputs: the inputs both are timed on (their batch size is used as is).
        provider: short or full provider name.
        runs, warmup: timed runs of each model, alternating, after ``warmup`` runs of each.
        threads: onnxruntime intra-op threads; onnxruntime's default when ``None``.

    Returns:
        A :class:`Benchmark` with the medians and the speedup.

    Raises:
        ProviderUnavailableError: the provider is not in this onnxruntime build or fell back to
            the CPU; nothing is timed then.
    """
    with AgainstOriginal(original, example_inputs, provider=provider, threads=threads) as timing:
        return timing.benchmark(separated, runs=runs, warmup=warmup)


class AgainstOriginal:
    """The original exported once in its shipped form, and each model given timed against it, interleaved.

    What :func:`benchmark` does for one pair of models, for a search that times many separated
    models against one original: exporting it again each time would cost seconds a round.
    ``exporter``: as :func:`~convtool.export_onnx`'s; a search passes ``"torchscript"``, which
    writes the same operators for these models in a fraction of torch.export's time.
    ``int8``: both models quantized in this form before they are timed (a search with int8: a
    latency target is then a fraction of the dense int8 model's latency).
    A context manager: the ONNX files live in a temporary folder until it exits.

    Raises:
        ProviderUnavailableError: the provider is not in this onnxruntime build or fell back to
            the CPU; nothing is timed then.
    """

    def __init__(self, original: nn.Module, example_inputs: Any, *, provider: str = "cpu", threads: int | None = None,
                 exporter: str = "auto", int8: Int8Form | None = None) -> None:
        self.provider, self.threads, self.exporter, self.int8 = require_provider(provider), threads, exporter, int8
        self.inputs = as_inputs(example_inputs)
        self._folder = tempfile.TemporaryDirectory(prefix="convtool-bench-")
        self._count = 0
        try:
            self._original = self._session(original)
        except BaseException:
            self._folder.cleanup()
            raise

    def __enter__(self) -> "AgainstOriginal":
        return self

    def __exit__(self, *exc: object) -> None:
        self._original = None
        self._folder.cleanup()

    def _session(self, model: nn.Module):
        shipped = for_runtime(model, on_device(self.inputs, model_device(model)))[0]
        self._count += 1
        exported = write_onnx(shipped, self.inputs, Path(self._folder.name) / f"m{self._count}.onnx", dynamic_batch=False,
                              exporter=self.exporter)
        path = exported.path
        if self.int8 is not None:
            feeds = {name: numpy(x) for name, x in zip(exported.input_names, self.inputs)}
            path = quantized_for_timing(path, feeds, path.with_suffix(".int8.onnx"), self.int8).path
        return timing_session(path, self.provider, self.threads, strict=self.int8 is not None)

    def benchmark(self, separated: nn.Module, *, runs: int = 50, warmup: int = 5) -> Benchmark:
        """``separated`` exported as shipped and timed against the original, round-robin: medians in ms."""
        session = self._session(separated)
        original_ms, separated_ms = time_sessions([self._original, session], feed(session, self.inputs), runs, warmup)
        return Benchmark(self.provider, original_ms, separated_ms, runs, self.threads)


def layer_latencies(model: nn.Module, example_inputs: Any, *, provider: str = "cpu") -> list[LayerLatency]:
    """Each separated layer of ``model`` timed alone against a dense conv of its shape, at its input shape.

    What the latency filter measures, for every pair the model holds: it names the layers that
    make a separated model slower than its original. A dense twin of each pair is built from
    its hyper-parameters (latency does not depend on the weights' values).

    Raises:
        ProviderUnavailableError: the provider cannot run here.
    """
    name = require_provider(provider)
    inputs = on_device(as_inputs(example_inputs), model_device(model))
    pairs = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, SeparableConv)}
    shapes: dict[int, tuple[int, ...]] = {}

    def record_shape(module: nn.Module, args: tuple) -> None:  # a pre-hook's return value would replace the inputs
        shapes.setdefault(id(module), tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record_shape) for _, m in pairs.values()]
    try:
        run_checked(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    found = []
    for key, (layer, pair) in pairs.items():
        if key not in shapes:
            continue
        extra = {"output_padding": pair.output_padding} if pair.transposed else {}
        dense = conv_class(pair.dims, pair.transposed)(
            pair.in_channels, pair.out_channels, pair.kernel_size, pair.stride, pair.padding, dilation=pair.dilation,
            groups=pair.groups, bias=pair.bias is not None, padding_mode=pair.padding_mode,
            dtype=pair.depthwise.weight.dtype, **extra,
        ).eval()
        found.append(LayerLatency(
            layer or "<model>",
            module_latency(dense, shapes[key], name),
            module_latency(copy.deepcopy(pair).eval(), shapes[key], name),
        ))
    return found
