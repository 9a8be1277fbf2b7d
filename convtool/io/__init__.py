"""Files: reading models and data, writing outputs. Used by the CLI; the library takes objects, not paths."""

from .checkpoints import Checkpoints
from .data import load_calibration, load_tensors
from .datasets import CastInputs, ImageFolderInputs, ShardInputs, open_inputs
from .models import LoadedModel, load_model, resolve_arch
from .outputs import Staging, check_output, portable, save_model, write_atomic, write_model

# A saved GraphModule pickles its tracer class by module path: files written by convtool 0.1
# name convtool.io._StandardLeaves, so it stays importable from here.
from .outputs import _StandardLeaves  # noqa: E402,F401

__all__ = [
    "CastInputs", "Checkpoints", "ImageFolderInputs", "LoadedModel", "ShardInputs", "Staging", "check_output", "load_calibration", "load_tensors",
    "load_model", "open_inputs", "portable", "resolve_arch", "save_model", "write_atomic", "write_model",
]
