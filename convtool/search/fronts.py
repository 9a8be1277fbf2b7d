"""Each front end as the trials see it (:class:`~convtool.search.trials.FrontEnd`): PyTorch modules and ONNX graphs."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..core.inputs import as_inputs, batch_dim, eval_mode, model_device, on_device, samples_of
from ..core.records import Benchmark
from ..deploy.export import export_onnx
from ..deploy.int8 import Int8Form
from ..deploy.int8_latency import quantized_for_timing
from ..deploy.int8_verify import int8_outputs
from ..deploy.verify import AgainstOriginal
from ..errors import InvalidOptionError
from ..measure.onnxrt import open_session, require_provider
from ..onnx import separate as onnx_separate
from ..onnx.files import write_with_weights_beside
from ..plan.budget import Budget, Timing
from ..plan.costing import Costing
from ..pytorch.separate import Separation, check_options, check_recovery, separate_at, synthetic_calibration
from ..recovery.batches import calibration_batches


def _provider(current: str | None, asked: str | None) -> str:
    """onnxruntime's name of ``asked`` (None: ``current``, else the CPU), refusing it where another provider was named."""
    if asked is None:
        return current or require_provider("cpu")
    name = require_provider(asked)
    if current is not None and current != name:
        raise InvalidOptionError(f"the latency provider {current} differs from the latency target's provider {name}: drop one")
    return name


def _joined_floats(rows: list[list[np.ndarray]], samples: list[int]) -> list[torch.Tensor]:
    """Each float output over all batches (``rows``: per batch, the outputs), joined along its samples' dimension."""
    leaves = [[torch.from_numpy(np.asarray(o)) for o in row if np.asarray(o).dtype.kind == "f"] for row in rows]
    return [torch.cat(parts, dim=batch_dim(parts[0], samples[0]) or 0) for parts in zip(*leaves)]


class PyTorchFront:
    """An ``nn.Module``, separated by :func:`~convtool.pytorch.separate.separate_at`; models run and timed in PyTorch and onnxruntime."""

    def __init__(self, model: nn.Module, example_inputs: Any, calibration: Any, *, order: str, include: Sequence[str],
                 exclude: Sequence[str], recalibrate_bn: bool, latency_provider: str | None, refit: str,
                 int8: Int8Form | None = None) -> None:
        self.provider = check_options(model, order, refit, latency_provider)
        check_recovery(recalibrate_bn, refit, calibration is not None)
        self.model, self.example_inputs, self._calibration = model, example_inputs, calibration
        self.options = dict(order=order, include=include, exclude=exclude, recalibrate_bn=recalibrate_bn, refit=refit, int8=int8)
        self.int8 = int8
        self.has_data = calibration is not None
        self.has_inputs = bool(as_inputs(example_inputs)) or self.has_data
        self.synthetic = None
        self._fit: Any = None  # the data the last trial was refit on: with int8, what a judged model is calibrated on

    def __enter__(self) -> "PyTorchFront":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def time_on(self, provider: str | None) -> None:
        self.provider = _provider(self.provider, provider)

    def calibration(self) -> Any:
        if isinstance(self._calibration, str):
            self._calibration, self.synthetic = synthetic_calibration(self.model, self.example_inputs, self._calibration)
        return self._calibration

    def separate(self, budget: Budget, calibration: Any, costing: Costing | None, shared: bool) -> tuple[Separation, Costing]:
        self._fit = calibration
        return separate_at(self.model, self.example_inputs, budget, calibration=calibration, provider=self.provider,
                           costing=costing, shared=shared, **self.options)

    def batches(self, calibration: Any) -> list[tuple]:
        return [tuple(b) for b in calibration_batches(calibration)]

    def as_calibration(self, batches: list[tuple]) -> list[tuple]:
        return batches

    def rows(self, batch: tuple) -> int:
        return batch[0].shape[0]

    def cut(self, batch: tuple, start: int, stop: int) -> tuple:
        return samples_of(batch, start, stop, as_inputs(self.example_inputs))  # a recurrent state's batch may be on dim 1

    def outputs(self, result: Separation | None, batches: list[tuple]) -> list[torch.Tensor]:
        """The model's float outputs; with int8, a separation's are its int8 file's (the original's stay fp32)."""
        if result is not None and self.int8 is not None:
            with tempfile.TemporaryDirectory(prefix="convtool-int8-") as tmp:
                fp32 = export_onnx(result.model, result.inputs, Path(tmp) / "trial.onnx", exporter="torchscript").path
                rows = int8_outputs(fp32, self.batches(self._fit), batches, Path(tmp) / "trial.int8.onnx", form=self.int8)
            return _joined_floats(rows, [self.rows(b) for b in batches])
        model = self.model if result is None else result.model
        device = model_device(model)
        leaves: list[list[torch.Tensor]] = []
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                flat, _ = tree_flatten(model(*on_device(batch, device)))
                leaves.append([t.detach().cpu() for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()])
        rows = [self.rows(b) for b in batches]
        # Each output joined along the dimension holding its samples (a returned state's batch may be on dim 1).
        return [torch.cat(parts, dim=batch_dim(parts[0], rows[0]) or 0) for parts in zip(*leaves)]

    @contextlib.contextmanager
    def timer(self, timing: Timing) -> Iterator[Callable[[Separation], Benchmark]]:
        # TorchScript, as the layers are timed: torch.export would take seconds per trial for the same operators.
        with AgainstOriginal(self.model, self.example_inputs, provider=timing.provider or self.provider or "cpu", threads=timing.threads,
                             exporter="torchscript", int8=self.int8) as against:
            yield lambda result: against.benchmark(result.model, runs=timing.runs)

    def finish(self, result: Separation, search: Any) -> Separation:
        return dataclasses.replace(result, search=search, synthetic=self.synthetic)


class OnnxFront:
    """An ONNX model (a path or a proto), separated by :func:`~convtool.onnx.separate.separate_onnx_at`; graphs run
    and timed in onnxruntime. A context manager: the files it stages live in a temporary folder until it exits."""

    def __init__(self, model: Any, example_inputs: Any, calibration: Any, *, order: str, include: Sequence[str],
                 exclude: Sequence[str], providers: Sequence[str], layout: str, fold_bn: bool,
                 latency_provider: str | None, int8: Int8Form | None = None) -> None:
        self.provider = onnx_separate.check_options(order, layout, latency_provider)
        self.int8 = int8
        self._fit: Any = None  # as the PyTorch front end's
        self._folder = tempfile.TemporaryDirectory(prefix="convtool-onnx-")
        self.staging = Path(self._folder.name)
        try:
            self.original = onnx_separate.read_original(model, example_inputs, calibration, self.staging)
        except BaseException:
            self._folder.cleanup()
            raise
        self._calibration = calibration
        self.options = dict(order=order, include=include, exclude=exclude, providers=providers, layout=layout, fold_bn=fold_bn,
                            int8=int8)
        self.has_data = calibration is not None
        self.has_inputs = self.original.feeds is not None
        self._count = 0

    def __enter__(self) -> "OnnxFront":
        return self

    def __exit__(self, *exc: object) -> None:
        self._folder.cleanup()

    def time_on(self, provider: str | None) -> None:
        self.provider = _provider(self.provider, provider)

    def calibration(self) -> Any:
        return self._calibration

    def separate(self, budget: Budget, calibration: Any, costing: Costing | None, shared: bool) -> tuple[Any, Costing]:
        self._fit = calibration
        return onnx_separate.separate_onnx_at(self.original, budget, calibration=calibration, provider=self.provider,
                                              staging=self.staging, costing=costing, shared=shared, **self.options)

    def batches(self, calibration: Any) -> list[list[np.ndarray]]:
        return onnx_separate.calibration_batches(self.original, calibration)

    def as_calibration(self, batches: list[list[np.ndarray]]) -> Any:
        return onnx_separate.Feeds(batches)

    def rows(self, batch: list[np.ndarray]) -> int:
        return batch[0].shape[0]

    def cut(self, batch: list[np.ndarray], start: int, stop: int) -> list[np.ndarray]:
        rows = self.rows(batch)
        return [x[start:stop] if x.ndim and x.shape[0] == rows else x for x in batch]

    def _file(self, result: Any) -> Path:
        """The original's staged file, or a separation's graph written beside it."""
        if result is None:
            return self.original.file
        self._count += 1
        path = self.staging / f"trial{self._count}.onnx"
        write_with_weights_beside(result.model, path)
        return path

    def outputs(self, result: Any, batches: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """The graph's float outputs; with int8, a separation's are its int8 file's (the original's stay fp32)."""
        if result is not None and self.int8 is not None:
            path = self._file(result)
            rows = int8_outputs(path, self.batches(self._fit), batches, path.with_suffix(".int8.onnx"), form=self.int8)
            return _joined_floats(rows, [self.rows(b) for b in batches])
        session = open_session(self._file(result), "CPUExecutionProvider", lean=True)
        names = [i.name for i in session.get_inputs()]
        leaves = []
        for batch in batches:
            outputs = session.run(None, dict(zip(names, batch)))
            leaves.append([torch.from_numpy(np.asarray(o)) for o in outputs if np.asarray(o).dtype.kind == "f"])
        return [torch.cat(parts) for parts in zip(*leaves)]

    @contextlib.contextmanager
    def timer(self, timing: Timing) -> Iterator[Callable[[Any], Benchmark]]:
        provider = timing.provider or self.provider or "cpu"
        original = self.original.file if self.int8 is None else self._int8(self.original.file)
        yield lambda result: onnx_separate.time_onnx(original, self._int8(self._file(result)), self.original.feeds, timing.runs,
                                                     provider, timing.threads)

    def _int8(self, path: Path) -> Path:
        """``path`` as timed: itself in fp32; with int8, quantized beside it (scales from the example inputs: see
        :func:`~convtool.deploy.int8_latency.quantized_for_timing`)."""
        if self.int8 is None:
            return path
        feeds = dict(zip([i.name for i in onnx_separate.graph_inputs(self.original.inputs)], self.original.feeds))
        return Path(quantized_for_timing(path, feeds, path.with_suffix(".timed-int8.onnx"), self.int8).path)

    def finish(self, result: Any, search: Any) -> Any:
        return dataclasses.replace(result, search=search)
