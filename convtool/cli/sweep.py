"""``convtool sweep``: the trade-off over FLOP budgets, as sweep.json, sweep.md and sweep.png in a folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InvalidOptionError
from . import groups
from .options import (Ui, calibration_data, handles_errors, input_files, load, make_inputs, model_options, needs_option,
                      parse_data_options)

FILES = ("sweep.json", "sweep.md", "sweep.png")


@click.command()
@handles_errors  # outermost: the option groups' parsing errors are the user's too
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(), metavar="DIR",
              help="Folder for sweep.json, sweep.md and sweep.png (made if missing; its parent must exist).")
@click.option("--targets", default="0.75,0.5,0.35,0.25", show_default=True, metavar="F,F,...",
              help="FLOP fractions to separate the model at, each in (0, 1].")
@click.option("--calibration", type=click.Path(exists=False), metavar="FILE|DIR|synthetic",
              help="Unlabeled inputs (.pt/.npy/.npz, or a folder of images): a quarter judges top-1 agreement and SQNR, "
                   "the rest refits the separated layers; 'synthetic': inputs made from the model's BatchNorm statistics.")
@click.option("--image-size", metavar="H,W", help="Size images of a --calibration folder are resized to.")
@click.option("--mean", metavar="R,G,B", help="Per-channel mean subtracted from --calibration images (after scaling to [0, 1]).")
@click.option("--std", metavar="R,G,B", help="Per-channel std dividing --calibration images.")
@click.option("--metric", metavar="MODULE:FN",
              help="Your measure, fn(model, data) -> float (e.g. accuracy on a labelled test set), plotted instead of agreement.")
@click.option("--metric-data", type=click.Path(dir_okay=False), metavar="FILE",
              help="What --metric receives: the tensors of a .pt/.npy/.npz file, dtypes kept (e.g. images and labels) "
                   "[the held-out calibration inputs].")
@click.option("--sensitivity/--no-sensitivity", default=None,
              help="Each budget's layers weighed by their measured effect on the model's output (the default with "
                   "--calibration), or by their own output's error.")
@click.option("--allow-slower", is_flag=True,
              help="Keep layers whose separated form is not faster than the dense conv on --provider (by default they stay "
                   "dense: each point spends its FLOPs only where they buy time).")
@groups.scope
@click.option("--refit", type=click.Choice(["last", "both"]), default="last", show_default=True,
              help="With --calibration: refit each pair's last conv, or both convs.")
@model_options
@click.option("--provider", default="cpu", show_default=True, help="onnxruntime provider every file is timed on.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Timed runs of each ONNX file (all files in turn, after 10 warm-up runs each).")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads [onnxruntime's default].")
@click.option("--exporter", type=click.Choice(["auto", "torch.export", "torchscript"]), default="auto", show_default=True,
              help="The ONNX exporter (auto: torch.export, then TorchScript if it refuses).")
@click.option("--force", is_flag=True, help="Overwrite existing sweep files in the folder.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def sweep(model, output_dir, targets, calibration, image_size, mean, std, metric, metric_data, sensitivity, allow_slower, scope, refit, input_shapes, arch, allow_pickle, device, provider, runs, threads, exporter, force, quiet):
    """Separate MODEL at several FLOP budgets and measure each: speed on onnxruntime, fidelity, your metric.

    For each target the model is separated (the layers costed once for all targets), exported to
    ONNX and timed against the original, all files in one interleaved run; top-1 agreement and
    SQNR are measured against the original on held-out calibration data, and --metric on
    --metric-data. Writes sweep.json, sweep.md and sweep.png (with matplotlib:
    pip install 'convtool[plot]') to the -o folder, and prints the table.

    \b
    Examples:
      convtool sweep examples/digits_cnn.safetensors --arch examples/digits_cnn.py:DigitsCNN \\
          --calibration examples/digits_train_images.npy -o sweep/
      convtool sweep net.pt --allow-pickle --targets 0.5,0.25 --calibration images/ --image-size 224,224 \\
          --metric mymetrics.py:top1_accuracy --metric-data test.npz -o sweep/
    """
    import convtool

    from ..io import Staging, check_output, load_tensors, resolve_arch
    from ..report.sweep import PLOT_HINT, plot_available, sweep_to_dict, sweep_to_markdown, write_sweep_png

    ui = Ui(quiet, False)
    fractions = parse_targets(targets)
    synthetic = calibration == "synthetic"
    for option, value in (("--image-size", image_size), ("--mean", mean), ("--std", std)):
        needs_option(option, bool(value), "--calibration DIR (a folder of images)", calibration and not synthetic)
    needs_option("--metric-data", bool(metric_data), "--metric MODULE:FN", metric)
    data_options = parse_data_options(image_size, mean, std)
    from ..plan.budgets import FlopsTarget
    from ..pytorch.separate import check_recovery

    FlopsTarget(fractions[0], sensitivity).check(inputs=True, data=bool(calibration))  # the library's checks, before any work
    check_recovery(False, refit, bool(calibration))
    from ..measure.onnxrt import require_provider

    require_provider(provider)  # refuse before any work: nothing is timed on a provider that cannot run
    fn = resolve_arch(metric, "--metric") if metric else None
    folder = _output_folder(output_dir)
    drawn = plot_available()
    names = [f for f in FILES if drawn or f != "sweep.png"]
    sources = input_files(model, arch, None if synthetic else calibration) + tuple(p for p in (metric_data,) if p)
    for name in names:
        check_output(folder / name, force=force, inputs=sources)

    original = load(model, arch, allow_pickle, device, ui)
    if synthetic:
        inputs = make_inputs(original, input_shapes, device, ui)
        data = "synthetic"
    else:

        data = calibration_data(calibration, original, *data_options) if calibration else None
        inputs = make_inputs(original, input_shapes, device, ui, data, calibration)
    scored = load_tensors(metric_data) if metric_data else None
    result = _run(ui, lambda on_step: convtool.sweep(
        original, inputs, targets=fractions, calibration=data, metric=fn, metric_data=scored, sensitivity=sensitivity, allow_slower=allow_slower, **scope,
        refit=refit, provider=provider, runs=runs, threads=threads, exporter=exporter,
        on_step=on_step))
    title = Path(model).name
    markdown = sweep_to_markdown(result, title=title)
    with Staging() as staging:
        staging.write(folder / "sweep.json", lambda tmp: tmp.write_text(json.dumps(sweep_to_dict(result), indent=2, allow_nan=False) + "\n"))
        staging.write(folder / "sweep.md", lambda tmp: tmp.write_text(markdown))
        if drawn:
            staging.write(folder / "sweep.png", lambda tmp: write_sweep_png(result, tmp, title=title))
    if not quiet:
        click.echo(markdown, nl=False)  # as written to sweep.md: rich would wrap its long lines
    ui.note(f"wrote {', '.join(str(folder / n) for n in names)}")
    if not drawn:
        stale = "; the sweep.png there is from an earlier run" if (folder / "sweep.png").exists() else ""
        ui.note(f"sweep.png not drawn: matplotlib is not installed ({PLOT_HINT}){stale}")
    return 0


def parse_targets(text: str) -> list[float]:
    """--targets as FLOP fractions, each in (0, 1], none repeated; a one-line error otherwise."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= 1 for v in values):
        raise InvalidOptionError(f"--targets {text!r} should be FLOP fractions in (0, 1] separated by commas, like 0.75,0.5,0.25")
    if len(set(values)) < len(values):
        raise InvalidOptionError(f"--targets {text!r} repeats a target")
    return values


def _output_folder(path: str) -> Path:
    """The -o folder, made if missing (its parent must exist); a file there is refused."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidOptionError(f"-o {folder} is a file; give a folder for the sweep's files")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise InvalidOptionError(f"-o {folder}: directory {folder.parent} does not exist; create it first")
        try:
            folder.mkdir()
        except OSError as error:
            raise InvalidOptionError(f"cannot make {folder}: {error.strerror or error}") from None
    return folder


def _run(ui: Ui, call):
    """The library call with a bar on stderr, a step per target then the timing; plain lines off a terminal."""
    if ui.quiet:
        return call(None)
    if not ui.err.is_terminal:
        return call(lambda done, total, what: done < total and ui.note(f"sweep: step {done + 1}/{total}: {what}"))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"), TimeElapsedColumn())
    with Progress(*columns, console=ui.err) as progress:
        task = progress.add_task("sweep", total=None, what="")
        return call(lambda done, total, what: progress.update(task, completed=done, total=total, what=what))
