"""convtool: depthwise-separable versions of trained PyTorch models, measured and shipped to ONNX.

Example:
    >>> import torch, convtool
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU())
    >>> result = convtool.separate(net, torch.randn(1, 3, 32, 32), rank=1)
    >>> result.layers[0].params_before, result.layers[0].params_after
    (896, 155)
"""

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use so that `convtool --help` answers without importing torch.
_WHERE = {
    "Analysis": ".analysis.counts",
    "ModuleCost": ".analysis.counts",
    "analyze": ".analysis.counts",
    "Comparison": ".analysis.compare",
    "LayerCost": ".analysis.compare",
    "compare": ".analysis.compare",
    "Fidelity": ".analysis.fidelity",
    "OutputFidelity": ".analysis.fidelity",
    "Benchmark": ".analysis.runtime",
    "ProviderCheck": ".analysis.runtime",
    "benchmark": ".analysis.runtime",
    "verify_onnx": ".analysis.runtime",
    "separable_factors": ".convert.decompose",
    "Distillation": ".convert.distill",
    "distill": ".convert.distill",
    "SeparableConv2d": ".convert.modules",
    "OnnxExport": ".convert.onnx",
    "export_onnx": ".convert.onnx",
    "LayerChange": ".convert.separate",
    "Separation": ".convert.separate",
    "SkippedLayer": ".convert.separate",
    "separate": ".convert.separate",
}

from .errors import (  # noqa: E402  (errors import nothing heavy)
    ConvtoolError,
    ExportError,
    InvalidOptionError,
    ModelLoadError,
    NothingToSeparateError,
    OnnxFileError,
    OutputExistsError,
    SeparationError,
    UnsafeModelError,
)

if TYPE_CHECKING:
    from .analysis.compare import Comparison, LayerCost, compare
    from .analysis.counts import Analysis, ModuleCost, analyze
    from .analysis.fidelity import Fidelity, OutputFidelity
    from .analysis.runtime import Benchmark, ProviderCheck, benchmark, verify_onnx
    from .convert.decompose import separable_factors
    from .convert.distill import Distillation, distill
    from .convert.modules import SeparableConv2d
    from .convert.onnx import OnnxExport, export_onnx
    from .convert.separate import LayerChange, Separation, SkippedLayer, separate


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "Benchmark",
    "Comparison",
    "Fidelity",
    "LayerCost",
    "ModuleCost",
    "OnnxExport",
    "OutputFidelity",
    "ProviderCheck",
    "analyze",
    "benchmark",
    "compare",
    "distill",
    "export_onnx",
    "ConvtoolError",
    "Distillation",
    "ExportError",
    "InvalidOptionError",
    "LayerChange",
    "ModelLoadError",
    "NothingToSeparateError",
    "OnnxFileError",
    "OutputExistsError",
    "SeparableConv2d",
    "Separation",
    "SeparationError",
    "SkippedLayer",
    "UnsafeModelError",
    "separable_factors",
    "separate",
    "verify_onnx",
]
