"""A separated model's int8 file beside what a deployer compares it with: the fp32 original and the dense int8 model.

Quantizing the dense model is the step everyone takes anyway, so a separation that ships in
int8 must beat that, not only the fp32 original (issue 37). Here the original is quantized the
same way, on the same calibration samples, and the four files (original fp32, original int8,
separated fp32, separated int8) are timed in one interleaved run on one provider; each file's
outputs are judged against the fp32 original on held-out samples none of them saw.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.inputs import as_inputs
from ..measure.fidelity import Fidelity
from ..measure.onnxrt import feed, require_provider, time_sessions, timing_session
from .export import export_onnx
from .int8 import Int8Export, Int8Form, quantize_int8
from .int8_verify import verify_int8


@dataclass(frozen=True)
class Int8Comparison:
    """The int8 file of a separated model, judged and timed against the fp32 original and the dense int8 model.

    Attributes:
        path: the separated model's int8 file; ``form``, ``int8_convs``, ``float_convs``: how
            it was quantized, and which convs onnxruntime runs in int8 (its
            :class:`~convtool.deploy.int8.Int8Export`'s).
        provider: where the files ran and were timed (every node of the int8 files on it).
        calibration_samples: the samples both int8 files were calibrated on.
        held_out: the samples they were judged on, which no fit and no calibration saw.
        int8: the separated int8 file's outputs against the fp32 original's (SQNR, top-1 agreement...).
        fp32: the separated fp32 model's, against the same: what separation alone costs.
        dense_int8: the dense int8 model's, against the same: what int8 alone costs.
        original_ms, dense_int8_ms, fp32_ms, int8_ms: median latencies of the fp32 original, the
            dense int8 model, the separated fp32 and int8 files, timed interleaved.
        runs, threads: timed runs of each, and onnxruntime's intra-op threads (None: its default).
    """

    path: str
    form: Int8Form
    int8_convs: int
    float_convs: tuple[str, ...]
    provider: str
    calibration_samples: int
    held_out: int
    int8: Fidelity
    fp32: Fidelity
    dense_int8: Fidelity
    original_ms: float
    dense_int8_ms: float
    fp32_ms: float
    int8_ms: float
    runs: int
    threads: int | None = None

    @property
    def vs_original(self) -> float:
        """The separated int8 file's latency over the fp32 original's (below 1: faster)."""
        return self.int8_ms / self.original_ms

    @property
    def vs_dense_int8(self) -> float:
        """The separated int8 file's latency over the dense int8 model's (below 1: faster): the baseline a deployer has."""
        return self.int8_ms / self.dense_int8_ms


def compare_int8(original: Any, separated: str | os.PathLike, int8: Int8Export, example_inputs: Any, calibration: Any,
                 held_out: Any, *, provider: str = "cpu", runs: int = 20, warmup: int = 3,
                 threads: int | None = None) -> Int8Comparison:
    """Quantize the original as ``int8`` was, judge all three against it on ``held_out``, and time all four, interleaved.

    Args:
        original: the fp32 original: an ``nn.Module`` (exported as :func:`~convtool.export_onnx`
            ships it) or an ONNX file.
        separated: the separated model's fp32 ONNX file; ``int8``: its int8 file's record.
        example_inputs: the inputs the files are timed on (a tensor or tuple, in the graph's order).
        calibration: what ``int8`` was calibrated on; the original is calibrated on the same.
        held_out: samples none of the files was fit or calibrated on, in any form calibration takes.
        provider: short or full onnxruntime name; ``runs``, ``warmup``, ``threads``: of the timing.

    Raises:
        ProviderUnavailableError: the provider cannot run every node of the int8 files.
        InvalidOptionError: held-out data that does not fit the model.
    """
    name = require_provider(provider)
    with tempfile.TemporaryDirectory(prefix="convtool-int8-") as tmp:
        fp32_original = original
        if isinstance(original, nn.Module):
            fp32_original = export_onnx(original, example_inputs, Path(tmp) / "original.onnx").path
        dense = quantize_int8(fp32_original, calibration, Path(tmp) / "original.int8.onnx", form=int8.form)
        checks = [verify_int8(path, original, held_out, provider=name) for path in (int8.path, separated, dense.path)]
        paths = (fp32_original, dense.path, separated, int8.path)
        sessions = [timing_session(path, name, threads, strict=True) for path in paths]
        inputs = tuple(torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in as_inputs(example_inputs))
        times = time_sessions(sessions, feed(sessions[0], inputs), runs, warmup)
    return Int8Comparison(int8.path, int8.form, int8.int8_convs, int8.float_convs, name, int8.calibration_samples,
                          checks[0].samples, checks[0].fidelity, checks[1].fidelity, checks[2].fidelity, *times, runs, threads)
