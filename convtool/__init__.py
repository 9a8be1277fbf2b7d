"""convtool: depthwise-separable versions of trained PyTorch models, measured and shipped to ONNX.

The package is a stack; each layer imports only the ones below it:

    cli/              a module per command: parse, one library call, render
    report/ io/       renderings (JSON, Markdown, rich tables) / files in and out
    pytorch/ | onnx/  the two front ends: an nn.Module, or an ONNX graph, separated and proven
    plan/             which convs, at which rank and order (shared by both front ends)
    recovery/ deploy/ refit, distill, synthesize, process groups / runtime form, export, verify
    measure/          fvcore counts, conv calls, fidelity, compare, torch -> ONNX writing, onnxruntime timing
    core/             SVD math, the separable modules, the records, names, inputs, the working copy

Example:
    >>> import torch, convtool
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU())
    >>> result = convtool.separate(net, torch.randn(1, 3, 32, 32), rank=1)
    >>> result.layers[0].params_before, result.layers[0].params_after, result.verified
    (896, 155, True)
"""

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use so that `convtool --help` answers without importing torch.
_WHERE = {
    "separable_factors": ".core.decompose",
    "SeparableConv": ".core.modules",
    "SeparableConv2d": ".core.modules",
    "AgreementTarget": ".plan.agreement",
    "Int8Form": ".deploy.int8",
    "verify_int8": ".deploy.int8_verify",
    "Search": ".core.records",
    "Trial": ".core.records",
    "Energy": ".plan.budgets",
    "LatencyTarget": ".plan.latency",
    "separate_onnx": ".search.separate",
    "OnnxSeparation": ".onnx.separate",
    "FlopsTarget": ".plan.budgets",
    "LayerChange": ".core.records",
    "SkippedLayer": ".core.records",
    "Analysis": ".measure.counts",
    "ModuleCost": ".measure.counts",
    "analyze": ".measure.counts",
    "Comparison": ".measure.compare",
    "compare": ".measure.compare",
    "Fidelity": ".measure.fidelity",
    "OutputFidelity": ".measure.fidelity",
    "OnnxExport": ".measure.onnx_file",
    "Distillation": ".recovery.distill",
    "distill": ".recovery.distill",
    "Separation": ".pytorch.separate",
    "separate": ".search.separate",
    "Sweep": ".search.sweep",
    "SweepPoint": ".search.sweep",
    "sweep": ".search.sweep",
    "Synthesis": ".recovery.synthesize",
    "synthesize": ".recovery.synthesize",
    "export_onnx": ".deploy.export",
    "Benchmark": ".core.records",
    "LayerLatency": ".core.records",
    "ProviderCheck": ".deploy.verify",
    "benchmark": ".deploy.verify",
    "layer_latencies": ".deploy.verify",
    "verify_onnx": ".deploy.verify",
}

from .errors import (
    AnalysisError,
    ConvtoolError,
    DistributedError,
    ExportError,
    InvalidOptionError,
    ModelLoadError,
    NothingToSeparateError,
    OnnxFileError,
    OutputExistsError,
    ProviderUnavailableError,
    SeparationError,
    UnsafeModelError,
)

if TYPE_CHECKING:
    from .core.decompose import separable_factors
    from .core.modules import SeparableConv, SeparableConv2d
    from .core.records import Benchmark, LayerChange, LayerLatency, Search, SkippedLayer, Trial
    from .plan.agreement import AgreementTarget
    from .plan.budgets import Energy, FlopsTarget
    from .plan.latency import LatencyTarget
    from .deploy.export import export_onnx
    from .deploy.int8 import Int8Form
    from .deploy.int8_verify import verify_int8
    from .deploy.verify import ProviderCheck, benchmark, layer_latencies, verify_onnx
    from .measure.compare import Comparison, compare
    from .measure.counts import Analysis, ModuleCost, analyze
    from .measure.fidelity import Fidelity, OutputFidelity
    from .measure.onnx_file import OnnxExport
    from .onnx.separate import OnnxSeparation
    from .search.separate import separate_onnx
    from .pytorch.separate import Separation
    from .search.separate import separate
    from .search.sweep import Sweep, SweepPoint, sweep
    from .recovery.distill import Distillation, distill
    from .recovery.synthesize import Synthesis, synthesize


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_WHERE})


__version__ = "0.2.0"

# What a user types: the verbs, the budgets, the pair module, and the errors to catch. The records
# the verbs return (Separation, Comparison, Search, Benchmark...) are read, not typed: they stay
# importable from here (``convtool.Separation``) for annotations, but are not listed.
__all__ = [
    "AgreementTarget",
    "AnalysisError",
    "ConvtoolError",
    "DistributedError",
    "Energy",
    "ExportError",
    "FlopsTarget",
    "Int8Form",
    "InvalidOptionError",
    "LatencyTarget",
    "ModelLoadError",
    "NothingToSeparateError",
    "OnnxFileError",
    "OutputExistsError",
    "ProviderUnavailableError",
    "SeparableConv",
    "SeparationError",
    "UnsafeModelError",
    "analyze",
    "benchmark",
    "compare",
    "distill",
    "export_onnx",
    "layer_latencies",
    "separate",
    "separate_onnx",
    "sweep",
    "synthesize",
    "verify_int8",
    "verify_onnx",
]
