"""The kinds of mistake convtool reports.

Every message says what to do next; the CLI prints it as one line and exits with code 2.
"""

from __future__ import annotations


class ConvtoolError(Exception):
    """Base class: a problem with the user's input or options, not a bug in convtool."""


class InvalidOptionError(ConvtoolError, ValueError):
    """An option has a value convtool cannot use (a rank of 0, a malformed input shape...)."""


class ModelLoadError(ConvtoolError):
    """A model file cannot be read as a model convtool can rewrite."""


class UnsafeModelError(ModelLoadError):
    """Loading the file would run code from it (a pickled module) and the user did not allow it."""


class NothingToSeparateError(ConvtoolError):
    """The model holds no standard convolution that the options allow convtool to separate."""


class SeparationError(ConvtoolError):
    """The separated model does not run; the message names the layer or part to exclude."""


class ExportError(ConvtoolError):
    """Neither ONNX exporter could turn the model into a valid ONNX file."""


class OnnxFileError(ConvtoolError):
    """An ONNX file is missing, corrupted or does not match the reference model."""


class OutputExistsError(ConvtoolError):
    """An output file exists already and overwriting it was not allowed."""


class AnalysisError(ConvtoolError):
    """fvcore cannot count a model's FLOPs (its torch.jit tracing refuses the model)."""


class ProviderUnavailableError(ConvtoolError):
    """An onnxruntime execution provider asked for cannot run here, so nothing can be timed on it."""


class DistributedError(ConvtoolError):
    """The processes torchrun started cannot form their group (or lose it): nothing was trained."""
