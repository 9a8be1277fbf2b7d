"""The ``convtool`` command: a module per subcommand, each parsing its options, making one library call, rendering.

Shared options, loading and error handling are in ``options``. Exit codes: 0 done (and
verified, with --onnx); 1 verification failed; 2 bad usage or bad input (a one-line message, no
traceback; --debug shows it); 3 an internal error. torch is imported inside the commands so that
``convtool --help`` answers at once.
"""

from __future__ import annotations

import click

from .analyze import analyze
from .distill import distill
from .export import export
from .separate import separate
from .sweep import sweep
from .verify import verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convtool")
def main() -> None:
    """convtool: make a trained model's convolutions depthwise-separable, measure it, ship it to ONNX."""


for command in (separate, sweep, analyze, export, verify, distill):
    main.add_command(command)

__all__ = ["main"]
