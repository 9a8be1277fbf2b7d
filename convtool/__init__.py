"""convtool: depthwise-separable versions of trained PyTorch models, measured and shipped to ONNX.

Example:
    >>> import torch, convtool
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU())
    >>> result = convtool.separate(net, torch.randn(1, 3, 32, 32), rank=1)
    >>> result.layers[0].params_before, result.layers[0].params_after
    (896, 155)
"""

from .analysis.compare import Comparison, LayerCost, compare
from .analysis.counts import Analysis, ModuleCost, analyze
from .analysis.fidelity import Fidelity, OutputFidelity
from .analysis.runtime import Benchmark, ProviderCheck, benchmark, verify_onnx
from .convert.decompose import separable_factors
from .convert.modules import SeparableConv2d
from .convert.onnx import OnnxExport, export_onnx
from .convert.separate import LayerChange, Separation, SkippedLayer, separate
from .errors import (
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
    "export_onnx",
    "ConvtoolError",
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
