"""Files: reading models and data, writing outputs. Used by the CLI; the library takes objects, not paths."""

from .data import load_calibration
from .models import LoadedModel, load_model, resolve_arch
from .outputs import check_output, portable, save_model, write_atomic

__all__ = ["LoadedModel", "check_output", "load_calibration", "load_model", "portable", "resolve_arch", "save_model", "write_atomic"]
