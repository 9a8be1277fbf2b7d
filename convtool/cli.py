"""The ``convtool`` command: parse, call the library, print.

Exit codes: 0 done (and verified, with --onnx); 1 verification failed; 2 bad usage or bad
input (a one-line message, no traceback; --debug shows it); 3 an internal error.
torch is imported inside the commands so that ``convtool --help`` answers at once.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import ConvtoolError, InvalidOptionError

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


def _command(func: Callable) -> Callable:
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


def _model_options(func: Callable) -> Callable:
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


def _output_options(func: Callable) -> Callable:
    func = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout, for pipelines.")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(func)
    return func


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise InvalidOptionError(f"--input-shape {text!r} should be positive integers separated by commas, like 1,3,224,224")
    return shape


def _load(model_path: str, arch: str | None, allow_pickle: bool, device: str, ui: Ui):
    import torch

    from .io import load_model

    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError("CUDA is not available to PyTorch here; use --device cpu")
    with ui.status(f"loading {model_path}"):
        loaded = load_model(model_path, arch=arch, allow_pickle=allow_pickle)
    return loaded.model.to(device)


def _example_inputs(model, input_shapes: tuple[str, ...], device: str, ui: Ui, data=None, data_path: str | None = None) -> tuple:
    """Seeded random inputs of the given shapes, the first calibration sample, or (1, C, 224, 224)."""
    import torch

    from .core.inputs import default_input_shape, first_conv_channels, model_dtype

    shapes = [_parse_shape(s) for s in input_shapes]
    if not shapes and data is not None:
        data = _first_sample(data)
        tensors = data if isinstance(data, tuple) else (data,)
        sample = tuple(t[:1].to(device) for t in tensors)  # real data
        channels = first_conv_channels(model)
        expected = f"; the model's first conv takes {channels} channels, e.g. (N, {channels}, ...)" if channels else ""
        shown = " and ".join("(N, " + ", ".join(map(str, t.shape[1:])) + ")" for t in tensors)
        return _checked(model, sample, f"--calibration {data_path} holds samples of shape {shown}, which the model does not run on", expected)
    if not shapes:
        shape = default_input_shape(model)
        if shape is None:
            raise InvalidOptionError("the model has no conv to infer an input shape from; pass --input-shape")
        shapes = [shape]
        ui.note(f"note: no --input-shape given; assuming {','.join(map(str, shapes[0]))}")
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=generator, dtype=model_dtype(model)).to(device) for s in shapes)
    shown = " and ".join(",".join(map(str, s)) for s in shapes)
    return _checked(model, inputs, f"the model does not run on inputs of shape {shown}", "; check --input-shape")


def _as_model_dtype(inputs, model):
    """A streamed data set's float samples in the model's float dtype (files hold float32)."""
    import torch

    from .core.inputs import model_dtype
    from .io import CastInputs

    dtype = model_dtype(model)
    return inputs if dtype == torch.float32 else CastInputs(inputs, dtype)


def _first_sample(data):
    """Tensors as they are; a streamed Dataset's first sample, batched (one sample, or a tuple of them)."""
    from torch.utils.data import Dataset

    if not isinstance(data, Dataset):
        return data
    first = data[0]
    return tuple(t[None] for t in first) if isinstance(first, tuple) else first[None]


def _checked(model, inputs: tuple, problem: str, advice: str) -> tuple:
    """The inputs, once the model has run on them; else one line: the problem, the error, the advice."""
    import torch

    from .core.inputs import eval_mode
    from .core.names import describe_error

    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception as error:
        raise InvalidOptionError(f"{problem} ({describe_error(error)}){advice}") from None
    return inputs


def _report_text(path: str, data_json: Callable[[], dict], markdown: Callable[[], str]) -> str:
    """The report for ``path``: JSON or Markdown by its suffix."""
    if Path(path).suffix == ".json":
        return json.dumps(data_json(), indent=2, allow_nan=False) + "\n"
    return markdown()


def _input_files(model: str, arch: str | None, calibration: str | None) -> tuple[str, ...]:
    """Every file a command reads, which no output may replace: the model, an --arch file, --calibration data."""
    files = [model]
    if arch and arch.partition(":")[0].endswith(".py"):
        files.append(arch.partition(":")[0])
    if calibration and Path(calibration).is_file():
        files.append(calibration)
    return tuple(files)


def _check_report_suffix(path: str | None) -> None:
    if path and Path(path).suffix not in (".json", ".md", ".markdown"):
        raise InvalidOptionError(f"--report {path}: use a .json or .md file")


def _provider_lines(checks) -> list[str]:
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


def _finish_verification(checks, asked: bool, emit: Callable[[str], None]) -> None:
    """One line per provider, then exit: 0 verified, 1 failed."""
    for text in _provider_lines(checks):
        emit(text)
    code = _verify_exit(checks, asked)
    if code:
        click.echo("Error: ONNX verification failed", err=True)
    sys.exit(code)


def _verify_exit(checks, asked: bool) -> int:
    """1 when a provider that ran failed, or one the user named explicitly could not run."""
    for c in checks:
        if (c.used and not c.passed) or (asked and not c.passed):
            return EXIT_VERIFY_FAILED
    return 0 if any(c.passed for c in checks) else EXIT_VERIFY_FAILED


def _providers(text: str | None) -> tuple[list[str], bool]:
    from .measure.onnxrt import DEFAULT_PROVIDERS, provider_name

    if not text:
        return list(DEFAULT_PROVIDERS), False
    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        provider_name(name)  # fail before any work on a typo
    return names, True


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convtool")
def main() -> None:
    """convtool: make a trained model's convolutions depthwise-separable, measure it, ship it to ONNX."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to save the separated model [MODEL's stem + .separated.pt].")
@click.option("--rank", help="Separable filters per channel: a positive integer, 'full' (exact) or 'auto' [1; auto with --flops-target or --energy].")
@click.option("--flops-target", type=float, help="With --rank auto: the model's FLOPs after, as a fraction of before (e.g. 0.25).")
@click.option("--energy", type=float, help="With --rank auto: per layer, the smallest rank keeping this share of spectral energy (e.g. 0.9).")
@click.option("--sensitivity", is_flag=True,
              help="With --flops-target and --calibration: spend the budget by each layer's measured effect on the "
                   "model's output, not its own error (a few model runs per layer).")
@click.option("--latency", "latency_provider", metavar="PROVIDER",
              help="Time each layer on this onnxruntime provider (cpu, cuda); layers whose "
                   "separated form is not faster stay dense (also with an explicit --rank).")
@click.option("--include", multiple=True, metavar="GLOB", help="Separate only convs whose qualified name matches; repeatable.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave convs whose qualified name matches dense; repeatable.")
@click.option("--order", type=click.Choice(["dw-pw", "pw-dw", "auto"]), default="dw-pw", show_default=True,
              help="Depthwise then pointwise (MobileNet), pointwise then depthwise (BSConv-U), or per layer the better.")
@click.option("--calibration", type=click.Path(exists=False), metavar="FILE|DIR|synthetic",
              help="Unlabeled inputs (.pt/.npy/.npz tensor, or a folder of images) to fit the separated layers on; "
                   "'synthetic': no data, inputs synthesised from the model's BatchNorm statistics (./synthetic for a path of that name).")
@click.option("--synthetic-samples", type=click.IntRange(min=1), metavar="N",
              help="With --calibration synthetic: how many inputs to synthesise [256].")
@click.option("--image-size", metavar="H,W", help="Size images of a --calibration folder are resized to.")
@click.option("--mean", metavar="R,G,B", help="Per-channel mean subtracted from --calibration images (after scaling to [0, 1]).")
@click.option("--std", metavar="R,G,B", help="Per-channel std dividing --calibration images.")
@click.option("--refit", type=click.Choice(["last", "both"]), default="last", show_default=True,
              help="With --calibration: refit each pair's last conv, or both convs (alternating least squares; "
                   "better fits, slower on large models).")
@click.option("--recalibrate-bn", is_flag=True, help="Also re-estimate BatchNorm statistics on the calibration data.")
@click.option("--distill-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Label-free distillation steps from the original model on the --calibration data.")
@_model_options
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), help="Also export the separated model to this ONNX file and verify it.")
@click.option("--providers", help="onnxruntime providers to verify on, comma-separated [cpu,cuda].")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report to FILE.json or FILE.md.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@_output_options
@_command
def separate(model, output, rank, flops_target, energy, sensitivity, latency_provider, include, exclude, order, calibration, synthetic_samples,
             image_size, mean, std, refit, recalibrate_bn, distill_steps, input_shapes, arch, allow_pickle, device, onnx_path, providers, report_path,
             force, quiet, as_json):
    """Rewrite every standard conv of MODEL (PyTorch, or an .onnx file) into a depthwise + pointwise pair.

    Prints the before/after report, writes the separated model and, with --onnx, exports and
    verifies it on onnxruntime. With --calibration (unlabeled inputs) the separated layers are
    refit to reproduce the original's outputs, and --distill-steps fine-tunes the result
    against the original, without labels. With no data at hand, --calibration synthetic makes
    the inputs from the model itself (matching its BatchNorm statistics).

    \b
    Examples:
      convtool separate resnet.pt --arch mymodels:resnet18 --rank 2 --onnx resnet.sep.onnx
      convtool separate net.pt --allow-pickle --rank auto --flops-target 0.25 \\
          --calibration images/ --image-size 224,224 --distill-steps 300
      convtool separate net.pt --allow-pickle --rank auto --flops-target 0.25 \\
          --calibration synthetic --input-shape 1,3,32,32 --distill-steps 300
      convtool separate vendor.onnx --rank 2 --input-shape 1,3,224,224
    """
    import convtool

    from .io import Staging, check_output, write_model
    from .report.render import to_dict, to_markdown, to_rich

    ui = Ui(quiet, as_json)
    rank_value = _parse_rank(rank, flops_target, energy, sensitivity)
    if _is_onnx(model):
        unsupported = [flag for flag, value in (
            ("--latency", latency_provider), ("--sensitivity", sensitivity), ("--distill-steps", distill_steps), ("--recalibrate-bn", recalibrate_bn),
            ("--refit both", refit == "both"), ("--calibration synthetic", calibration == "synthetic"),
            ("--synthetic-samples", synthetic_samples),
            ("--onnx", onnx_path), ("--arch", arch), ("--allow-pickle", allow_pickle)) if value]
        if unsupported:
            raise InvalidOptionError(f"{', '.join(unsupported)}: not available for ONNX input yet; "
                                     "separate the PyTorch model for those, or drop them")
        _check_report_suffix(report_path)
        data = None
        if calibration:
            from .io import load_calibration

            size, mean_values, std_values = _data_options(image_size, mean, std)
            data = load_calibration(calibration, image_size=size, mean=mean_values, std=std_values)
        return _separate_onnx(model, output, rank_value, order, include, exclude, input_shapes, force, ui, data, calibration,
                              _providers(providers)[0], report_path, as_json)
    synthetic = calibration == "synthetic"  # the word, not a path: ./synthetic names a path so called
    _needs("--synthetic-samples", synthetic_samples is not None, "--calibration synthetic", synthetic)
    for option, value in (("--image-size", image_size), ("--mean", mean), ("--std", std)):
        if synthetic and value:
            raise InvalidOptionError(f"{option} describes a --calibration folder of images; --calibration synthetic makes "
                                     "model-ready inputs of --input-shape: drop it")
    _needs("--distill-steps", bool(distill_steps), "--calibration FILE|DIR|synthetic (the unlabeled inputs to distil on)", calibration)
    for option, value in (("--recalibrate-bn", recalibrate_bn), ("--image-size", image_size), ("--mean", mean), ("--std", std),
                          ("--refit both", refit == "both"), ("--sensitivity", sensitivity)):
        _needs(option, bool(value), "--calibration FILE|DIR", calibration)
    _needs("--providers", bool(providers), "--onnx OUT.onnx (the file to verify)", onnx_path)
    if latency_provider:
        from .measure.onnxrt import require_provider

        require_provider(latency_provider)  # refuse before any work: nothing is timed on a provider that cannot run
    output = output or str(Path(model).with_name(Path(model).stem + ".separated.pt"))
    _check_report_suffix(report_path)
    provider_names, asked = _providers(providers)
    outputs = [p for p in (output, onnx_path, report_path) if p]
    if len({Path(p).resolve() for p in outputs}) < len(outputs):
        raise InvalidOptionError("-o, --onnx and --report must name different files")
    sources = _input_files(model, arch, calibration)
    for path in outputs:
        check_output(path, force=force, inputs=sources)
    data_options = _data_options(image_size, mean, std)

    original = _load(model, arch, allow_pickle, device, ui)
    if synthetic:
        if Path(calibration).exists():
            ui.note("note: --calibration synthetic synthesises inputs; for the path 'synthetic' here, write ./synthetic")
        inputs = _example_inputs(original, input_shapes, device, ui)
        data = _synthesize(original, inputs, synthetic_samples, ui)
    else:
        data = _calibration(calibration, original, *data_options) if calibration else None
        inputs = _example_inputs(original, input_shapes, device, ui, data, calibration)
    with ui.status("tracing and separating" + (" and calibrating" if data is not None else "")):
        result = convtool.separate(
            original, inputs, rank=rank_value, include=include, exclude=exclude, order=order,
            calibration=data, recalibrate_bn=recalibrate_bn, latency_provider=latency_provider, refit=refit,
        )
    if result.budget_met is False:
        ui.note(f"note: the FLOP target {rank_value.fraction} cannot be met; every separated layer is at its cheapest")
    separated = result.model
    if distill_steps:
        # On synthetic inputs, matching each separated layer's output too lifted digits at 0.25 of
        # the FLOPs from 98.22% to 99.11% (benchmarks/RESULTS.md, "Data-free calibration").
        separated = _distill(separated, original, data, distill_steps, ui, features=synthetic)
    with ui.status("counting parameters and FLOPs"):
        report = convtool.compare(original, separated, inputs, separation=result)
    # Every output is staged and renamed into place only when all were made, so a model that
    # cannot be pickled or exported leaves nothing behind.
    checks = None
    with Staging() as staging:
        portable = staging.write(output, lambda tmp: write_model(separated, tmp, inputs))
        if onnx_path:
            exported = _export(separated, inputs, onnx_path, ui)
            with ui.status("verifying on onnxruntime"):
                checks = convtool.verify_onnx(exported, separated, inputs, providers=provider_names)
            report = _with_latency(report, original, separated, inputs, checks, ui)
        if report_path:
            text = _report_text(report_path, lambda: to_dict(report), lambda: to_markdown(report))
            staging.write(report_path, lambda tmp: tmp.write_text(text))
    ui.show(to_rich(report))
    if as_json and not quiet:
        click.echo(json.dumps(to_dict(report), indent=2, allow_nan=False))
    ui.note(f"wrote {output}" + ("" if portable else " (loading it needs the model's own code importable)"))
    if checks is not None:
        _finish_verification(checks, asked, ui.note)
    return 0


def _analyze_onnx(model: str, input_shapes: tuple[str, ...]):
    """``analyze`` for an ONNX file: fvcore's rules on the shapes onnx infers (one row per node that costs)."""
    from .convert.onnx_graph import example_feeds, load_onnx
    from .measure.onnx_counts import onnx_analysis

    proto = load_onnx(model)
    feeds, why_not = example_feeds(proto, _onnx_inputs(input_shapes))
    if feeds is None:
        raise InvalidOptionError(f"{why_not}")
    return onnx_analysis(proto, feeds)


def _onnx_inputs(input_shapes: tuple[str, ...]):
    import numpy as np

    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal(_parse_shape(s)).astype(np.float32) for s in input_shapes) or None


def _is_onnx(path: str) -> bool:
    """An ONNX file, by its suffix: convtool never unpickles a file to find out what it is."""
    return Path(path).suffix.lower() == ".onnx"


def _separate_onnx(model, output, rank, order, include, exclude, input_shapes, force, ui, data=None, data_path=None,
                   providers=("cpu",), report_path=None, as_json=False) -> int:
    """``separate`` for a model given as ONNX: separated (and refit on ``data``), checked in onnxruntime, written atomically.

    The report is the one a PyTorch model gets, counted on the graphs and timed on onnxruntime CPU.
    """
    import dataclasses

    import convtool

    from .convert.onnx_graph import save_onnx
    from .io import Staging, check_output
    from .report.render import to_dict, to_markdown, to_rich

    output = output or str(Path(model).with_name(Path(model).stem + ".separated.onnx"))
    if Path(output).suffix.lower() != ".onnx":
        raise InvalidOptionError(f"-o {output}: an ONNX model is written as .onnx")
    sources = [model, *([data_path] if data_path else [])]
    for path in [p for p in (output, report_path) if p]:
        check_output(path, force=force, inputs=sources)
    inputs = _onnx_inputs(input_shapes)
    if inputs is None and data is not None:  # the first calibration sample, as for PyTorch models
        inputs = tuple(t[:1] for t in data) if isinstance(data, tuple) else (data[:1],)
    with ui.status("separating the ONNX graph" + (", calibrating" if data is not None else "") + " and checking it in onnxruntime"):
        result = convtool.separate_onnx(model, inputs, rank=rank, order=order, include=include, exclude=exclude, calibration=data,
                                        providers=providers)
    report = None
    if result.verified:
        with ui.status("counting, and timing both graphs on onnxruntime CPU"):
            report = dataclasses.replace(result.report(inputs), latency=result.timed(inputs))
    with Staging() as staging:
        staging.write(output, lambda tmp: save_onnx(result, tmp))
        if report_path:
            if report is None:
                raise InvalidOptionError(f"--report needs a verified run: {result.verification}")
            text = _report_text(report_path, lambda: to_dict(report), lambda: to_markdown(report))
            staging.write(report_path, lambda tmp: tmp.write_text(text))
    if report is not None:
        ui.show(to_rich(report))
        if as_json and not ui.quiet:
            click.echo(json.dumps(to_dict(report), indent=2, allow_nan=False))
    else:
        ui.note(f"separated {len(result.layers)} Conv nodes; not verified: {result.verification}")
        for skip in result.skipped:
            ui.note(f"  left as it was: {skip.name}: {skip.reason}")
    if result.budget_met is False:
        ui.note(f"note: the FLOP target {rank.fraction} cannot be met; every separated layer is at its cheapest")
    for run_ in result.runs:
        if run_.ran:
            ui.note(f"{run_.provider}: ran both models; max abs error {run_.max_abs_error:.3g}, relative {run_.relative_error:.3g}")
        else:
            ui.note(f"{run_.provider}: not run: {run_.reason}")
    ui.note(f"wrote {output}")
    return 0


def _with_latency(report, original, separated, inputs, checks, ui):
    """The report with both models timed on the first provider that verified, and, if slower, the losing layers."""
    import dataclasses

    import convtool

    provider = next((c.provider for c in checks if c.passed), None)
    if provider is None:
        return report
    with ui.status(f"timing both models on {provider}"):
        timing = convtool.benchmark(original, separated, inputs, provider=provider, runs=20, warmup=3)
        losers = ()
        if timing.speedup < 1:
            losers = tuple(layer for layer in convtool.layer_latencies(separated, inputs, provider=provider) if not layer.faster)
    return dataclasses.replace(report, latency=timing, slower_layers=losers)


def _needs(option: str, given: bool, other: str, other_value: Any) -> None:
    """Refuse an option that means nothing without another one."""
    if given and not other_value:
        raise InvalidOptionError(f"{option} needs {other}")


def _data_options(image_size: str | None, mean: str | None, std: str | None) -> tuple:
    """--image-size, --mean and --std parsed and checked before any work."""
    size = _parse_ints(image_size, "--image-size", 2) if image_size else None
    mean_values = _parse_floats(mean, "--mean") if mean else None
    std_values = _parse_floats(std, "--std") if std else None
    if std_values is not None and not all(v > 0 and math.isfinite(v) for v in std_values):
        raise InvalidOptionError(f"--std {std!r}: every value must be a positive number (it divides the images)")
    if mean_values is not None and not all(math.isfinite(v) for v in mean_values):
        raise InvalidOptionError(f"--mean {mean!r}: every value must be a finite number")
    return size, mean_values, std_values


def _calibration(path, model, image_size, mean, std):
    """The --calibration data: a file read into memory, a folder of images or shards streamed (a Dataset)."""
    from torch.utils.data import Dataset

    from .core.inputs import first_conv_channels
    from .io import open_inputs

    param = next(model.parameters(), None)
    data = open_inputs(path, channels=first_conv_channels(model), image_size=image_size, mean=mean, std=std, option="--calibration")
    if param is None:
        return data
    if isinstance(data, Dataset):  # a folder is read batch by batch
        return _as_model_dtype(data, model)
    cast = lambda t: t.to(param.dtype) if t.is_floating_point() else t  # noqa: E731
    return tuple(map(cast, data)) if isinstance(data, tuple) else cast(data)


def _synthesize(model, inputs, samples, ui):
    """Calibration inputs made from the model alone, with a progress bar on stderr."""
    from .convert.synthesize import SAMPLES, synthesis

    samples = samples or SAMPLES
    if ui.quiet:
        return synthesis(model, inputs, samples).inputs
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("synthesising inputs"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=ui.err, transient=not ui.err.is_terminal) as progress:
        task = progress.add_task("synthesise", total=None, loss="-")
        made = synthesis(model, inputs, samples,
                         on_step=lambda done, total, loss: progress.update(task, completed=done, total=total, loss=f"{loss:.3f}"))
    ui.note(made.note)
    return made.inputs


def _distill(student, teacher, data, steps, ui, features=False):
    import convtool

    if ui.quiet:
        return convtool.distill(student, teacher, data, steps=steps, features=features).model
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=ui.err, transient=not ui.err.is_terminal) as progress:
        task = progress.add_task("distill", total=steps, loss="-")
        result = convtool.distill(
            student, teacher, data, steps=steps, features=features,
            on_step=lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.4f}"),
        )
    ui.note(f"distilled {steps} steps in {result.seconds:.1f} s: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    return result.model


def _parse_ints(text: str, option: str, count: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * count
    if len(values) != count or any(v < 1 for v in values):
        raise InvalidOptionError(f"{option} {text!r} should be {count} positive integers separated by commas")
    return values


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InvalidOptionError(f"{option} {text!r} should be numbers separated by commas") from None


def _parse_rank(text: str | None, flops_target: float | None, energy: float | None, sensitivity: bool = False):
    """The flags as one typed rank: an int, "full", FlopsTarget or Energy (auto alone means a quarter of the FLOPs)."""
    from .core.records import Energy, FlopsTarget

    if flops_target is not None and energy is not None:
        raise InvalidOptionError("give --flops-target or --energy, not both")
    if sensitivity and (energy is not None or text not in (None, "auto") or (flops_target is None and text is None)):
        raise InvalidOptionError("--sensitivity weighs the layers of a FLOP budget: use it with --rank auto --flops-target F")
    chosen = FlopsTarget(flops_target, sensitivity) if flops_target is not None else Energy(energy) if energy is not None else None
    if text is None or text == "auto":
        return chosen or (FlopsTarget(0.25, sensitivity) if text == "auto" else 1)
    if chosen is not None:
        raise InvalidOptionError(f"--{'flops-target' if flops_target is not None else 'energy'} chooses the ranks: use it with --rank auto, not --rank {text}")
    if text == "full":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidOptionError(f"--rank {text!r} should be a positive integer, 'full' or 'auto'")
    return value


def _export(model, inputs, onnx_path, ui):
    import convtool

    with ui.status("exporting ONNX"):
        exported = convtool.export_onnx(model, inputs, onnx_path)
    ui.note(_export_line(exported))
    return exported


def _export_line(exported) -> str:
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


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_model_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the analysis to FILE.json or FILE.md.")
@click.option("--force", is_flag=True, help="Overwrite an existing report file.")
@_output_options
@_command
def analyze(model, input_shapes, arch, allow_pickle, device, report_path, force, quiet, as_json):
    """Count MODEL's parameters and FLOPs (fvcore: one multiply-add is one flop), per layer.

    \b
    Example:
      convtool analyze model.pt --allow-pickle --input-shape 1,3,224,224 --report costs.md
    """
    import convtool

    from .io import check_output, write_atomic
    from .report.render import analysis_markdown, analysis_rich, analysis_to_dict

    ui = Ui(quiet, as_json)
    _check_report_suffix(report_path)
    if report_path:
        check_output(report_path, force=force, inputs=_input_files(model, arch, None))
    if _is_onnx(model):
        analysis = _analyze_onnx(model, input_shapes)
    else:
        loaded = _load(model, arch, allow_pickle, device, ui)
        inputs = _example_inputs(loaded, input_shapes, device, ui)
        with ui.status("counting parameters and FLOPs"):
            analysis = convtool.analyze(loaded, inputs)
    ui.show(analysis_rich(analysis))
    if as_json and not quiet:
        click.echo(json.dumps(analysis_to_dict(analysis), indent=2))
    if report_path:
        text = _report_text(report_path, lambda: analysis_to_dict(analysis), lambda: analysis_markdown(analysis))
        write_atomic(report_path, lambda tmp: tmp.write_text(text))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write.")
@_model_options
@click.option("--opset", type=int, help="ONNX opset [the exporter's default].")
@click.option("--static-batch", is_flag=True, help="Keep the batch dimension fixed instead of dynamic.")
@click.option("--no-fold-bn", is_flag=True, help="Keep BatchNorm layers instead of folding them into the conv before.")
@click.option("--layout", type=click.Choice(["branches", "multiplier", "measured"]), default="branches", show_default=True,
              help="How rank > 1 pairs are written: multiplier-1 depthwise branches (faster on onnxruntime), one conv, "
                   "or per pair whichever is measured faster on the CPU provider.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_command
def export(model, output, input_shapes, arch, allow_pickle, device, opset, static_batch, no_fold_bn, layout, force, quiet):
    """Export MODEL to ONNX (torch.export, with the TorchScript exporter as fallback).

    \b
    Example:
      convtool export resnet.separated.pt --allow-pickle -o resnet.onnx --input-shape 1,3,224,224
    """
    import convtool

    from .io import check_output

    from .measure.onnx_file import check_opset

    ui = Ui(quiet, False)
    check_opset(opset)
    check_output(output, force=force, inputs=_input_files(model, arch, None))
    loaded = _load(model, arch, allow_pickle, device, ui)
    inputs = _example_inputs(loaded, input_shapes, device, ui)
    with ui.status("exporting ONNX"):
        exported = convtool.export_onnx(
            loaded, inputs, output, opset=opset, dynamic_batch=not static_batch, fold_bn=not no_fold_bn, layout=layout
        )
    ui.note(_export_line(exported))


@main.command()
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--against", required=True, type=click.Path(dir_okay=False), help="The PyTorch model the file should agree with.")
@_model_options
@click.option("--providers", help="onnxruntime providers, comma-separated [cpu,cuda].")
@click.option("--rtol", type=float, help="Relative tolerance [1e-3; 1e-2 for float16, 5e-2 for bfloat16 outputs].")
@click.option("--atol", type=float, help="Absolute tolerance [1e-4; 1e-2 for float16, 5e-2 for bfloat16 outputs].")
@_output_options
@_command
def verify(onnx_file, against, input_shapes, arch, allow_pickle, device, providers, rtol, atol, quiet, as_json):
    """Check that ONNX_FILE gives the same outputs as the model --against, on each provider.

    Exits with 1 when a provider that ran disagrees, or one named in --providers cannot run.

    \b
    Example:
      convtool verify resnet.onnx --against resnet.separated.pt --allow-pickle --providers cpu,cuda
    """
    import dataclasses

    import convtool

    ui = Ui(quiet, as_json)
    provider_names, asked = _providers(providers)
    reference = _load(against, arch, allow_pickle, device, ui)
    inputs = _example_inputs(reference, input_shapes, device, ui)
    with ui.status("verifying on onnxruntime"):
        checks = convtool.verify_onnx(onnx_file, reference, inputs, providers=provider_names, rtol=rtol, atol=atol)
    if as_json and not quiet:
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    _finish_verification(checks, asked, ui.line)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--teacher", required=True, type=click.Path(dir_okay=False), help="The original model the separated one learns from.")
@click.option("--data", required=True, type=click.Path(), metavar="DIR|FILE",
              help="Unlabeled inputs: a folder of images or of .npy/.pt shards (streamed), or one tensor file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to save the distilled model.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Global batch, split evenly over the processes torchrun starts.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate (cosine schedule to 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling and any randomness in the model.")
@click.option("--features", is_flag=True, help="Also match each separated layer's output to the dense layer it replaced.")
@click.option("--train-batchnorm", is_flag=True, help="Update BatchNorm statistics too (frozen by default).")
@click.option("--image-size", metavar="H,W", help="Size images of a --data folder are resized to.")
@click.option("--mean", metavar="R,G,B", help="Per-channel mean subtracted from --data images (after scaling to [0, 1]).")
@click.option("--std", metavar="R,G,B", help="Per-channel std dividing --data images.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader worker processes reading a --data folder, per process.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), help="Folder for checkpoints (created if missing).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Save a checkpoint every K steps (and after the last).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --checkpoint-dir (from step 0 if none).")
@click.option("--amp", is_flag=True, help="Mixed precision (float16 autocast), CUDA only.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Seconds to wait for every torchrun process to join (and for any one step's exchange).")
@_model_options
@click.option("--force", is_flag=True, help="Overwrite the output, or start over in a --checkpoint-dir holding checkpoints.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_command
def distill(model, teacher, data, output, steps, batch_size, lr, seed, features, train_batchnorm, image_size, mean, std, workers,
            checkpoint_dir, checkpoint_every, resume, amp, timeout, input_shapes, arch, allow_pickle, device, force, quiet):
    """Fine-tune a separated MODEL to reproduce --teacher on unlabeled --data, on one or many processes.

    MODEL is a file `convtool separate` wrote (a pickled module: needs --allow-pickle); --arch
    builds the teacher from a state_dict. Run it under torchrun for several processes (gloo on
    the CPU, NCCL on CUDA): each takes its share of every batch, and only the first writes and
    prints. A killed run continues with --resume, bit for bit.

    \b
    Examples:
      convtool distill net.separated.pt --allow-pickle --teacher net.pt --arch nets:resnet18 \\
          --data shards/ --steps 3000 -o net.distilled.pt
      torchrun --nproc_per_node=8 -m convtool distill net.separated.pt --allow-pickle --teacher net.pt \\
          --arch nets:resnet18 --data images/ --image-size 224,224 --device cuda --amp \\
          --checkpoint-dir ckpt/ --checkpoint-every 500 --resume -o net.distilled.pt
    """
    import os

    from torch.utils.data import Dataset

    import convtool

    from .convert.distributed import process_group
    from .core.inputs import first_conv_channels
    from .io import Checkpoints, Staging, check_output, open_inputs, write_model
    from .report.progress import StepProgress

    _needs("--checkpoint-every", bool(checkpoint_every), "--checkpoint-dir DIR", checkpoint_dir)
    _needs("--resume", resume, "--checkpoint-dir DIR", checkpoint_dir)
    if amp and device != "cuda":
        raise InvalidOptionError("--amp needs --device cuda (mixed precision on the CPU is not supported)")
    if not Path(data).exists():
        raise InvalidOptionError(f"--data {data} does not exist")
    main_process = os.environ.get("RANK", "0") == "0"  # only the first process writes and prints
    ui = Ui(quiet or not main_process, False)
    sources = _input_files(model, arch, data) + (teacher,)
    # Every process on the first machine checks (they share its disk): one refusing alone would
    # leave the others waiting for it in the rendezvous until --timeout.
    if os.environ.get("GROUP_RANK", "0") == "0":
        check_output(output, force=force, inputs=sources)
    size, mean_values, std_values = _data_options(image_size, mean, std)
    checkpoints = Checkpoints(checkpoint_dir, every=checkpoint_every or 0, resume=resume, force=force) if checkpoint_dir else None
    with process_group(cuda=device == "cuda", timeout=timeout) as world:
        teacher_model = _load(teacher, arch, allow_pickle, device, ui)
        student = _load(model, None, allow_pickle, device, ui)
        inputs = open_inputs(data, channels=first_conv_channels(teacher_model), image_size=size, mean=mean_values, std=std_values)
        if isinstance(inputs, Dataset):
            inputs = _as_model_dtype(inputs, student)
        example_inputs = _example_inputs(teacher_model, input_shapes, device, ui, inputs if not input_shapes else None, data)
        ui.note(f"distilling {steps} steps of {batch_size} samples on {world.size} process{'es' if world.size > 1 else ''}")
        with StepProgress(ui.err, steps, batch_size) as progress:
            result = convtool.distill(
                student, teacher_model, inputs, steps=steps, batch_size=batch_size, lr=lr, seed=seed, features=features,
                freeze_batchnorm=not train_batchnorm, workers=workers, amp=amp, checkpoints=checkpoints,
                on_step=progress if not ui.quiet else None,
            )
        if not world.main:
            return
        with Staging() as staging:
            portable = staging.write(output, lambda tmp: write_model(result.model, tmp, example_inputs))
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    speed = (steps - result.resumed_from) * batch_size / max(result.seconds, 1e-9)
    ui.note(f"distilled {steps} steps{resumed} on {result.processes} process{'es' if result.processes > 1 else ''} in "
            f"{result.seconds:.1f} s ({speed:,.0f} samples/s): loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    ui.note(f"wrote {output}" + ("" if portable else " (loading it needs the model's own code importable)"))


if __name__ == "__main__":
    main()
