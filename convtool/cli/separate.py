"""``convtool separate``: a model (PyTorch or ONNX) in, its separated version out, with a report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InvalidOptionError
from .options import (
    Ui, calibration_data, check_report_suffix, export_line, finish_verification, handles_errors, input_files, is_onnx,
    load, make_inputs, model_options, needs_option, onnx_input_options, onnx_inputs, output_options, parse_data_options,
    parse_providers, report_text,
)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to save the separated model [MODEL's stem + .separated.pt].")
@click.option("--rank", help="Separable filters per channel: a positive integer, 'full' (exact) or 'auto' [1; auto with --flops-target or --energy].")
@click.option("--flops-target", type=float, help="With --rank auto: the model's FLOPs after, as a fraction of before (e.g. 0.25).")
@click.option("--energy", type=float, help="With --rank auto: per layer, the smallest rank keeping this share of spectral energy (e.g. 0.9).")
@click.option("--min-agreement", type=float, metavar="SHARE",
              help="With --calibration: the fewest FLOPs whose top-1 agreement with the original on a held-out quarter "
                   "of the calibration data is at least SHARE (e.g. 0.99; classifiers).")
@click.option("--min-sqnr", type=float, metavar="DB",
              help="With --calibration: the fewest FLOPs whose output SQNR against the original on a held-out quarter "
                   "of the calibration data is at least DB (any output).")
@click.option("--sensitivity", is_flag=True,
              help="With --flops-target (or --min-agreement / --min-sqnr) and --calibration: spend the budget by each layer's measured effect on the "
                   "model's output, not its own error (a few model runs per layer).")
@click.option("--latency", "latency_provider", metavar="PROVIDER",
              help="Time each layer on this onnxruntime provider (cpu, cuda); layers whose "
                   "separated form is not faster stay dense (also with an explicit --rank). With --latency-target: "
                   "the provider the target is timed on [cpu].")
@click.option("--latency-target", type=float, metavar="F",
              help="The separated model's latency on onnxruntime (--latency, cpu by default) as a fraction of the "
                   "original's, measured end to end (e.g. 0.5); chooses the ranks itself.")
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
@model_options
@onnx_input_options
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), help="Also export the separated model to this ONNX file and verify it.")
@click.option("--providers", help="onnxruntime providers to verify on, comma-separated [cpu,cuda].")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report to FILE.json or FILE.md.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@output_options
@handles_errors
def separate(model, output, rank, flops_target, energy, min_agreement, min_sqnr, sensitivity, latency_provider, latency_target, include, exclude, order, calibration, synthetic_samples,
             image_size, mean, std, refit, recalibrate_bn, distill_steps, input_shapes, arch, allow_pickle, device, input_values, onnx_path, providers, report_path,
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
      convtool separate net.pt --allow-pickle --min-agreement 0.99 --calibration images.npy
      convtool separate net.pt --allow-pickle --latency-target 0.5 --input-shape 1,3,224,224
      convtool separate net.pt --allow-pickle --rank auto --flops-target 0.25 \\
          --calibration synthetic --input-shape 1,3,32,32 --distill-steps 300
      convtool separate vendor.onnx --rank 2 --input-shape 1,3,224,224
    """
    import convtool

    from ..io import Staging, check_output, write_model
    from ..report.render import latency_search_line, search_line, to_dict, to_markdown, to_rich

    ui = Ui(quiet, as_json)
    rank_value = _parse_rank(rank, flops_target, energy, sensitivity, min_agreement, min_sqnr, latency_target, latency_provider)
    if is_onnx(model):
        unsupported = [flag for flag, value in (
            ("--min-agreement", min_agreement is not None), ("--min-sqnr", min_sqnr is not None),
            ("--latency-target", latency_target is not None),
            ("--latency", latency_provider), ("--sensitivity", sensitivity), ("--distill-steps", distill_steps), ("--recalibrate-bn", recalibrate_bn),
            ("--refit both", refit == "both"), ("--calibration synthetic", calibration == "synthetic"),
            ("--synthetic-samples", synthetic_samples),
            ("--onnx", onnx_path), ("--arch", arch), ("--allow-pickle", allow_pickle)) if value]
        if unsupported:
            raise InvalidOptionError(f"{', '.join(unsupported)}: not available for ONNX input yet; "
                                     "separate the PyTorch model for those, or drop them")
        check_report_suffix(report_path)
        data = None
        if calibration:
            from ..io import load_calibration

            size, mean_values, std_values = parse_data_options(image_size, mean, std)
            data = load_calibration(calibration, image_size=size, mean=mean_values, std=std_values, by_name=True)
        return _separate_onnx(model, output, rank_value, order, include, exclude, onnx_inputs(input_shapes, input_values), force, ui,
                              data, calibration, parse_providers(providers)[0], report_path, as_json)
    if input_values:
        raise InvalidOptionError("--input-value names an ONNX model's input; a PyTorch model takes --input-shape")
    synthetic = calibration == "synthetic"  # the word, not a path: ./synthetic names a path so called
    needs_option("--synthetic-samples", synthetic_samples is not None, "--calibration synthetic", synthetic)
    for option, value in (("--image-size", image_size), ("--mean", mean), ("--std", std)):
        if synthetic and value:
            raise InvalidOptionError(f"{option} describes a --calibration folder of images; --calibration synthetic makes "
                                     "model-ready inputs of --input-shape: drop it")
    needs_option("--distill-steps", bool(distill_steps), "--calibration FILE|DIR|synthetic (the unlabeled inputs to distil on)", calibration)
    for option, value in (("--recalibrate-bn", recalibrate_bn), ("--image-size", image_size), ("--mean", mean), ("--std", std),
                          ("--refit both", refit == "both"), ("--sensitivity", sensitivity),
                          ("--min-agreement", min_agreement is not None), ("--min-sqnr", min_sqnr is not None)):
        needs_option(option, bool(value), "--calibration FILE|DIR", calibration)
    needs_option("--providers", bool(providers), "--onnx OUT.onnx (the file to verify)", onnx_path)
    if latency_provider or latency_target is not None:
        from ..measure.onnxrt import require_provider

        require_provider(latency_provider or "cpu")  # refuse before any work: nothing is timed on a provider that cannot run
        if latency_target is not None:
            latency_provider = None  # the target carries it
    output = output or str(Path(model).with_name(Path(model).stem + ".separated.pt"))
    check_report_suffix(report_path)
    provider_names, asked = parse_providers(providers)
    outputs = [p for p in (output, onnx_path, report_path) if p]
    if len({Path(p).resolve() for p in outputs}) < len(outputs):
        raise InvalidOptionError("-o, --onnx and --report must name different files")
    sources = input_files(model, arch, calibration)
    for path in outputs:
        check_output(path, force=force, inputs=sources)
    data_options = parse_data_options(image_size, mean, std)

    original = load(model, arch, allow_pickle, device, ui)
    if synthetic:
        if Path(calibration).exists():
            ui.note("note: --calibration synthetic synthesises inputs; for the path 'synthetic' here, write ./synthetic")
        inputs = make_inputs(original, input_shapes, device, ui)
        data = _synthesize(original, inputs, synthetic_samples, ui)
    else:
        data = calibration_data(calibration, original, *data_options) if calibration else None
        inputs = make_inputs(original, input_shapes, device, ui, data, calibration)
    with ui.status("tracing and separating" + (" and calibrating" if data is not None else "")):
        result = convtool.separate(
            original, inputs, rank=rank_value, include=include, exclude=exclude, order=order,
            calibration=data, recalibrate_bn=recalibrate_bn, latency_provider=latency_provider, refit=refit,
        )
    if result.budget_met is False:
        ui.note(f"note: the FLOP target {rank_value.fraction} cannot be met; every separated layer is at its cheapest")
    if result.search is not None:
        ui.note(search_line(result.search))
    if result.latency_search is not None:
        ui.note(latency_search_line(result.latency_search))
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
            text = report_text(report_path, lambda: to_dict(report), lambda: to_markdown(report))
            staging.write(report_path, lambda tmp: tmp.write_text(text))
    ui.show(to_rich(report))
    if as_json and not quiet:
        click.echo(json.dumps(to_dict(report), indent=2, allow_nan=False))
    ui.note(f"wrote {output}" + ("" if portable else " (loading it needs the model's own code importable)"))
    if checks is not None:
        finish_verification(checks, asked, ui.note)
    return 0


def _separate_onnx(model, output, rank, order, include, exclude, inputs, force, ui, data=None, data_path=None,
                   providers=("cpu",), report_path=None, as_json=False) -> int:
    """``separate`` for a model given as ONNX: separated (and refit on ``data``), checked in onnxruntime, written atomically.

    The report is the one a PyTorch model gets, counted on the graphs and timed on onnxruntime CPU.
    """
    import dataclasses
    import tempfile

    import convtool

    from ..io import Staging, check_output
    from ..measure.onnxrt import release_freed_memory
    from ..onnx.files import load_onnx, write_with_weights_beside
    from ..onnx.separate import save_onnx, time_onnx
    from ..report.render import to_dict, to_markdown, to_rich

    output = output or str(Path(model).with_name(Path(model).stem + ".separated.onnx"))
    if Path(output).suffix.lower() != ".onnx":
        raise InvalidOptionError(f"-o {output}: an ONNX model is written as .onnx")
    sources = [model, *([data_path] if data_path else [])]
    for path in [p for p in (output, report_path) if p]:
        check_output(path, force=force, inputs=sources)
    if inputs is None and data is not None and not isinstance(data, dict):  # the first calibration sample, as for PyTorch models
        inputs = tuple(t[:1] for t in data) if isinstance(data, tuple) else (data[:1],)
    with ui.status("separating the ONNX graph" + (", calibrating" if data is not None else "") + " and checking it in onnxruntime"):
        result = convtool.separate_onnx(model, inputs, rank=rank, order=order, include=include, exclude=exclude, calibration=data,
                                        providers=providers)
    report = None
    with Staging() as staging, tempfile.TemporaryDirectory(prefix="convtool-time-") as timing:
        staging.write(output, lambda tmp: save_onnx(result, tmp))
        if result.verified:
            with ui.status("counting, and timing both graphs on onnxruntime CPU"):
                report = result.report()
                separated = Path(timing) / "separated.onnx"
                write_with_weights_beside(result.model, separated)
                # Written twice, the proto is let go: two full sessions timed side by side are the peak.
                result = dataclasses.replace(result, model=None)
                release_freed_memory()
                latency = time_onnx(lambda: load_onnx(model), separated, result.feeds)  # on the inputs it ran on
                report = dataclasses.replace(report, latency=latency)
        if report_path:
            if report is None:
                raise InvalidOptionError(f"--report needs a verified run: {result.verification}")
            text = report_text(report_path, lambda: to_dict(report), lambda: to_markdown(report))
            staging.write(report_path, lambda tmp: tmp.write_text(text))
    if report is not None:
        ui.show(to_rich(report))
        if as_json and not ui.quiet:
            click.echo(json.dumps(to_dict(report), indent=2, allow_nan=False))
    else:
        ui.note(f"separated {len(result.layers)} Conv nodes; not verified: {result.verification}")
        for skip in result.skipped:
            ui.note(f"  left as it was: {skip.name}: {skip.reason}")
    for branch in result.branches:
        ui.note(f"counted: {branch}")
    if result.not_run:
        ui.note(f"not run by the check (a branch its inputs did not take; give inputs that take it to check it): {', '.join(result.not_run)}")
    for skip in result.not_refit:
        ui.note(f"not refit (kept as its SVD factors): {skip.name}: {skip.reason}")
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


def _synthesize(model, inputs, samples, ui):
    """Calibration inputs made from the model alone, with a progress bar on stderr."""
    from ..recovery.synthesize import SAMPLES, synthesis

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
        return convtool.distill(student, teacher, data, steps=steps, features=features, refit=False).model
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=ui.err, transient=not ui.err.is_terminal) as progress:
        task = progress.add_task("distill", total=steps, loss="-")
        result = convtool.distill(
            student, teacher, data, steps=steps, features=features, refit=False,  # separate has just refit on this data
            on_step=lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.4f}"),
        )
    ui.note(f"distilled {steps} steps in {result.seconds:.1f} s: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    return result.model


def _parse_rank(text: str | None, flops_target: float | None, energy: float | None, sensitivity: bool = False,
                min_agreement: float | None = None, min_sqnr: float | None = None, latency_target: float | None = None,
                latency_provider: str | None = None):
    """The flags as one typed rank: an int, "full", FlopsTarget, Energy, AgreementTarget or LatencyTarget (auto alone: a quarter of the FLOPs)."""
    from ..core.records import AgreementTarget, Energy, FlopsTarget, LatencyTarget

    if latency_target is not None:
        clash = [flag for flag, value in (("--flops-target", flops_target), ("--energy", energy), ("--min-agreement", min_agreement),
                                          ("--min-sqnr", min_sqnr)) if value is not None]
        if clash or text not in (None, "auto"):
            clash += [f"--rank {text}"] if text not in (None, "auto") else []
            raise InvalidOptionError(f"--latency-target chooses the ranks itself: drop {', '.join(clash)}")
        return LatencyTarget(latency_target, provider=latency_provider or "cpu", sensitivity=sensitivity)

    if min_agreement is not None or min_sqnr is not None:
        clash = [flag for flag, value in (("--flops-target", flops_target), ("--energy", energy), ("--rank", text)) if value is not None]
        if clash:
            raise InvalidOptionError(f"--min-agreement / --min-sqnr choose the budget themselves: drop {', '.join(clash)}")
        return AgreementTarget(min_agreement, min_sqnr, sensitivity)

    if flops_target is not None and energy is not None:
        raise InvalidOptionError("give --flops-target or --energy, not both")
    if sensitivity and (energy is not None or text not in (None, "auto") or (flops_target is None and text is None)):
        raise InvalidOptionError("--sensitivity weighs the layers of a FLOP budget: use it with --rank auto --flops-target F "
                                 "or --min-agreement / --min-sqnr")
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
    ui.note(export_line(exported))
    return exported
