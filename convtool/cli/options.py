"""What the commands share: options, model and input loading, exit codes, and the one-line error handling.

Exit codes: 0 done (and verified, with --onnx); 1 verification failed; 2 bad usage or bad
input (a one-line message, no traceback; --debug shows it); 3 an internal error.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import ConvtoolError, InvalidOptionError


EXIT_VERIFY_FAILED = 1


EXIT_BAD_INPUT = 2


EXIT_INTERNAL = 3


class UserError(click.ClickException):
    exit_code = EXIT_BAD_INPUT


class Ui:
    """Where output goes: reports on stdout, progress and notes on stderr; -q keeps only errors."""

    def __init__(self, quiet: bool, as_json: bool) -> None:
        from rich.console import Console

        self.quiet, self.as_json = quiet, as_json
        # Piped output gets a width that fits the tables rather than rich's 80 columns.
        self.out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120)
        self.err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text, markup=False, highlight=False)

    def status(self, text: str):
        import contextlib

        if self.quiet or not self.err.is_terminal:
            return contextlib.nullcontext()
        return self.err.status(text)

    def show(self, renderables: list[Any]) -> None:
        if not self.quiet and not self.as_json:
            for item in renderables:
                self.out.print(item)

    def line(self, text: str) -> None:
        if not self.quiet and not self.as_json:
            self.out.print(text, markup=False, highlight=False)


def handles_errors(func: Callable) -> Callable:
    """Turn library errors into one line and exit code 2; --debug re-raises with the traceback."""

    @functools.wraps(func)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return func(*args, **kwargs)
        except ConvtoolError as error:
            if debug:
                raise
            raise UserError(str(error)) from None
        except (click.ClickException, click.exceptions.Exit):
            raise
        except Exception as error:
            if debug:
                raise
            click.echo(f"Error: internal error: {type(error).__name__}: {error} (run with --debug for the traceback)", err=True)
            sys.exit(EXIT_INTERNAL)

    return click.option("--debug", is_flag=True, help="Show tracebacks of errors.")(wrapper)


def model_options(func: Callable) -> Callable:
    options = [
        click.option("--input-shape", "input_shapes", multiple=True, metavar="1,3,224,224",
                     help="Shape of an example input; repeat for models with several inputs."),
        click.option("--arch", metavar="MODULE:CALLABLE",
                     help="Callable that builds the model, for files holding only weights (a state_dict)."),
        click.option("--allow-pickle", is_flag=True,
                     help="Allow loading a pickled module (torch.save(model)); this runs code from the file."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where the model runs."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def output_options(func: Callable) -> Callable:
    func = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout, for pipelines.")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(func)
    return func


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise InvalidOptionError(f"--input-shape {text!r} should be positive integers separated by commas, like 1,3,224,224 "
                                 "(an ONNX input may be named: state=2,1,128)")
    return shape


def load(model_path: str, arch: str | None, allow_pickle: bool, device: str, ui: Ui):
    import torch

    from ..io import load_model

    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError("CUDA is not available to PyTorch here; use --device cpu")
    with ui.status(f"loading {model_path}"):
        loaded = load_model(model_path, arch=arch, allow_pickle=allow_pickle)
    return loaded.model.to(device)


def make_inputs(model, input_shapes: tuple[str, ...], device: str, ui: Ui, data=None, data_path: str | None = None) -> tuple:
    """Seeded random inputs of the given shapes, the first calibration sample, or (1, C, 224, 224)."""
    import torch

    from ..core.inputs import default_input_shape, first_conv_channels, model_dtype

    shapes = [parse_shape(s) for s in input_shapes]
    if not shapes and data is not None:
        data = first_sample(data)
        tensors = data if isinstance(data, tuple) else (data,)
        sample = tuple(t[:1].to(device) for t in tensors)  # real data
        channels = first_conv_channels(model)
        expected = f"; the model's first conv takes {channels} channels, e.g. (N, {channels}, ...)" if channels else ""
        shown = " and ".join("(N, " + ", ".join(map(str, t.shape[1:])) + ")" for t in tensors)
        return checked_inputs(model, sample, f"--calibration {data_path} holds samples of shape {shown}, which the model does not run on", expected)
    if not shapes:
        shape = default_input_shape(model)
        if shape is None:
            raise InvalidOptionError("the model has no conv to infer an input shape from; pass --input-shape")
        shapes = [shape]
        ui.note(f"note: no --input-shape given; assuming {','.join(map(str, shapes[0]))}")
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=generator, dtype=model_dtype(model)).to(device) for s in shapes)
    shown = " and ".join(",".join(map(str, s)) for s in shapes)
    return checked_inputs(model, inputs, f"the model does not run on inputs of shape {shown}", "; check --input-shape")


def as_model_dtype(inputs, model):
    """A streamed data set's float samples in the model's float dtype (files hold float32)."""
    import torch

    from ..core.inputs import model_dtype
    from ..io import CastInputs

    dtype = model_dtype(model)
    return inputs if dtype == torch.float32 else CastInputs(inputs, dtype)


def first_sample(data):
    """Tensors as they are; a streamed Dataset's first sample, batched (one sample, or a tuple of them)."""
    from torch.utils.data import Dataset

    if not isinstance(data, Dataset):
        return data
    first = data[0]
    return tuple(t[None] for t in first) if isinstance(first, tuple) else first[None]


def checked_inputs(model, inputs: tuple, problem: str, advice: str) -> tuple:
    """The inputs, once the model has run on them; else one line: the problem, the error, the advice."""
    import torch

    from ..core.inputs import eval_mode
    from ..core.names import describe_error

    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception as error:
        raise InvalidOptionError(f"{problem} ({describe_error(error)}){advice}") from None
    return inputs


def report_text(path: str, data_json: Callable[[], dict], markdown: Callable[[], str]) -> str:
    """The report for ``path``: JSON or Markdown by its suffix."""
    if Path(path).suffix == ".json":
        return json.dumps(data_json(), indent=2, allow_nan=False) + "\n"
    return markdown()


def input_files(model: str, arch: str | None, calibration: str | None) -> tuple[str, ...]:
    """Every file a command reads, which no output may replace: the model, an --arch file, --calibration data."""
    files = [model]
    if arch and arch.partition(":")[0].endswith(".py"):
        files.append(arch.partition(":")[0])
    if calibration and Path(calibration).is_file():
        files.append(calibration)
    return tuple(files)


def check_report_suffix(path: str | None) -> None:
    if path and Path(path).suffix not in (".json", ".md", ".markdown"):
        raise InvalidOptionError(f"--report {path}: use a .json or .md file")


def provider_lines(checks) -> list[str]:
    lines = []
    for c in checks:
        if c.passed:
            lines.append(
                f"{c.provider}: passed (max abs error {c.max_abs_error:.3g}, {c.latency_ms:.2f} ms, "
                f"batch sizes {', '.join(map(str, c.batch_sizes))})"
            )
        else:
            state = "unavailable" if not c.available else "not used" if not c.used else "FAILED"
            lines.append(f"{c.provider}: {state}: {c.reason}")
    return lines


def finish_verification(checks, asked: bool, emit: Callable[[str], None], failed: bool = False) -> None:
    """One line per provider, then exit: 0 verified, 1 failed (``failed``: a check of the caller's failed too)."""
    for text in provider_lines(checks):
        emit(text)
    onnx_code = verify_exit(checks, asked)
    code = onnx_code or (EXIT_VERIFY_FAILED if failed else 0)
    if code:
        click.echo("Error: ONNX verification failed" if onnx_code else "Error: int8 verification failed", err=True)
    sys.exit(code)


def verify_exit(checks, asked: bool) -> int:
    """1 when a provider that ran failed, or one the user named explicitly could not run."""
    for c in checks:
        if (c.used and not c.passed) or (asked and not c.passed):
            return EXIT_VERIFY_FAILED
    return 0 if any(c.passed for c in checks) else EXIT_VERIFY_FAILED


def parse_providers(text: str | None) -> tuple[list[str], bool]:
    from ..measure.onnxrt import DEFAULT_PROVIDERS, provider_name

    if not text:
        return list(DEFAULT_PROVIDERS), False
    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        provider_name(name)  # fail before any work on a typo
    return names, True


def onnx_input_options(func: Callable) -> Callable:
    """--input-value, for the ONNX inputs no shape describes (an int64 sample rate)."""
    return click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE",
                        help="ONNX models: the value of input NAME (a number, or numbers separated by commas), "
                             "e.g. sr=16000; repeatable. Integer inputs have no default.")(func)


def onnx_inputs(input_shapes: tuple[str, ...], input_values: tuple[str, ...] = ()):
    """The ONNX graph's example inputs from the command line: shapes by position or name, values by name.

    Unnamed shapes alone give a tuple of shapes (the inputs in order); with any name, a dict
    whose integer keys are positions among the inputs not named (see convtool.onnx.feeds).
    """
    import numpy as np

    named: dict = {}
    unnamed = []
    for text in input_shapes:
        name, sep, dims = text.rpartition("=")
        if sep and not name:
            raise InvalidOptionError(f"--input-shape {text!r}: give NAME=dims or dims")
        if name:
            named[name] = parse_shape(dims)
        else:
            unnamed.append(parse_shape(dims))
    for text in input_values:
        name, sep, value = text.partition("=")
        try:
            numbers = [int(v) if v.strip().lstrip("+-").isdigit() else float(v) for v in value.split(",")] if sep and name else []
        except ValueError:
            numbers = []
        if not numbers:
            raise InvalidOptionError(f"--input-value {text!r} should be NAME=number (or numbers separated by commas), like sr=16000")
        if name in named:
            raise InvalidOptionError(f"input {name!r} is given both a shape and a value; give one")
        named[name] = np.array(numbers[0] if len(numbers) == 1 else numbers)
    if not named:
        return tuple(unnamed) or None
    return named | dict(enumerate(unnamed))


def is_onnx(path: str) -> bool:
    """An ONNX file, by its suffix: convtool never unpickles a file to find out what it is."""
    return Path(path).suffix.lower() == ".onnx"


def needs_option(option: str, given: bool, other: str, other_value: Any) -> None:
    """Refuse an option that means nothing without another one."""
    if given and not other_value:
        raise InvalidOptionError(f"{option} needs {other}")


def parse_data_options(image_size: str | None, mean: str | None, std: str | None) -> tuple:
    """--image-size, --mean and --std parsed and checked before any work."""
    size = parse_ints(image_size, "--image-size", 2) if image_size else None
    mean_values = parse_floats(mean, "--mean") if mean else None
    std_values = parse_floats(std, "--std") if std else None
    if std_values is not None and not all(v > 0 and math.isfinite(v) for v in std_values):
        raise InvalidOptionError(f"--std {std!r}: every value must be a positive number (it divides the images)")
    if mean_values is not None and not all(math.isfinite(v) for v in mean_values):
        raise InvalidOptionError(f"--mean {mean!r}: every value must be a finite number")
    return size, mean_values, std_values


def parse_ints(text: str, option: str, count: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * count
    if len(values) != count or any(v < 1 for v in values):
        raise InvalidOptionError(f"{option} {text!r} should be {count} positive integers separated by commas")
    return values


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InvalidOptionError(f"{option} {text!r} should be numbers separated by commas") from None


def export_line(exported) -> str:
    text = f"wrote {exported.path} (opset {exported.opset}, {exported.exporter} exporter"
    if exported.folded_batchnorms:
        text += f", {len(exported.folded_batchnorms)} BatchNorms folded"
    if exported.branched_layers:
        text += f", {len(exported.branched_layers)} pairs in faster runtime forms"
    text += ")"
    if exported.fixed_batch_reason:
        text += f"; fixed batch: {exported.fixed_batch_reason}"
    if exported.fallback_reason:
        text += f"; torch.export refused the model: {exported.fallback_reason}"
    for warning in exported.warnings[:3]:
        text += f"\nwarning: the trace may not fit other inputs: {warning}"
    return text


def calibration_data(path, model, image_size, mean, std):
    """The --calibration data: a file read into memory, a folder of images or shards streamed (a Dataset)."""
    from torch.utils.data import Dataset

    from ..core.inputs import first_conv_channels
    from ..io import open_inputs

    param = next(model.parameters(), None)
    data = open_inputs(path, channels=first_conv_channels(model), image_size=image_size, mean=mean, std=std, option="--calibration")
    if param is None:
        return data
    if isinstance(data, Dataset):  # a folder is read batch by batch
        return as_model_dtype(data, model)
    cast = lambda t: t.to(param.dtype) if t.is_floating_point() else t  # noqa: E731
    return tuple(map(cast, data)) if isinstance(data, tuple) else cast(data)
