"""``convtool separate``: a model (PyTorch or ONNX) in, its separated version out, with a report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InvalidOptionError
from . import groups
from .options import (
    EXIT_VERIFY_FAILED, Ui, calibration_data, check_report_suffix, export_line, finish_verification, handles_errors, input_files,
    is_onnx, load, make_inputs, model_options, needs_option, onnx_input_options, onnx_inputs, output_options, parse_data_options,
    parse_providers, report_text,
)


@click.command()
@handles_errors  # outermost: the option groups' parsing errors are the user's too
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to save the separated model [MODEL's stem + .separated.pt, or .separated.onnx for ONNX].")
@groups.ranks
@groups.scope
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
@click.option("--int8", is_flag=True,
              help="Ship in int8: plan with each layer timed quantized (a pair stays only where it beats its dense conv "
                   "in int8; --latency-target is then of the dense int8 model), and write OUT.int8.onnx beside the fp32 "
                   "ONNX file, calibrated on --calibration less a held-out quarter, verified on that quarter against the "
                   "original and timed against it and the dense int8 model. Needs --calibration (and --onnx for PyTorch).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report to FILE.json or FILE.md.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@output_options
def separate(model, output, ranks, scope, calibration, synthetic_samples, image_size, mean, std, refit, recalibrate_bn,
             distill_steps, input_shapes, arch, allow_pickle, device, input_values, onnx_path, providers, int8, report_path, force,
             quiet, as_json):
    """Rewrite every standard conv of MODEL (PyTorch, or an .onnx file) into a depthwise + pointwise pair.

    Prints the before/after report, writes the separated model and, with --onnx, exports and
    verifies it on onnxruntime. With --calibration (unlabeled inputs) the separated layers are
    refit to reproduce the original's outputs, and --distill-steps fine-tunes the result
    against the original, without labels. With no data at hand, --calibration synthetic makes
    the inputs from the model itself (matching its BatchNorm statistics). An .onnx MODEL takes
    every budget a PyTorch one does and is written as .onnx, checked in onnxruntime.

    \b
    Examples:
      convtool separate resnet.pt --arch mymodels:resnet18 --rank 2 --onnx resnet.sep.onnx
      convtool separate net.pt --allow-pickle --flops-target 0.25 \\
          --calibration images/ --image-size 224,224 --distill-steps 300
      convtool separate net.pt --allow-pickle --min-agreement 0.99 --calibration images.npy
      convtool separate net.pt --allow-pickle --latency-target 0.5 --input-shape 1,3,224,224
      convtool separate net.pt --allow-pickle --flops-target 0.25 \\
          --calibration synthetic --input-shape 1,3,32,32 --distill-steps 300
      convtool separate vendor.onnx --min-agreement 0.99 --calibration images.npz
      convtool separate net.pt --allow-pickle --latency-target 0.6 --int8 \
          --calibration images.npy --onnx net.sep.onnx
    """
    from ..deploy.int8 import int8_path  # imported here: `convtool --help` must not import torch
    from ..deploy.int8_data import split_held_out

    ui = Ui(quiet, as_json)
    synthetic = calibration == "synthetic"  # the word, not a path: ./synthetic names a path so called
    needs_option("--synthetic-samples", synthetic_samples is not None, "--calibration synthetic", synthetic)
    for option, value in (("--image-size", image_size), ("--mean", mean), ("--std", std)):
        if synthetic and value:
            raise InvalidOptionError(f"{option} describes a --calibration folder of images; --calibration synthetic makes "
                                     "model-ready inputs of --input-shape: drop it")
        needs_option(option, bool(value), "--calibration DIR (a folder of images)", calibration)
    needs_option("--distill-steps", bool(distill_steps), "--calibration FILE|DIR|synthetic (the unlabeled inputs to distil on)", calibration)
    check_report_suffix(report_path)
    data_options = parse_data_options(image_size, mean, std)
    _check_before_work(ranks, calibration, recalibrate_bn, refit)
    if int8 and not calibration:
        raise InvalidOptionError("--int8 calibrates the int8 file on your data and verifies it on a held-out part: give "
                                 "--calibration FILE|DIR (unlabeled inputs, as the model takes them)")
    if is_onnx(model):
        _pytorch_only(distill_steps=distill_steps, recalibrate_bn=recalibrate_bn, refit=refit, synthetic=synthetic, onnx_path=onnx_path,
                      arch=arch, allow_pickle=allow_pickle)
        return _separate_onnx(model, output, ranks, scope, onnx_inputs(input_shapes, input_values), force, ui, calibration,
                              data_options, parse_providers(providers)[0], report_path, as_json, int8)
    needs_option("--int8", int8, "--onnx OUT.onnx (the fp32 file it quantizes; the int8 file is written beside it)", onnx_path)
    if input_values:
        raise InvalidOptionError("--input-value names an ONNX model's input; a PyTorch model takes --input-shape")
    needs_option("--providers", bool(providers), "--onnx OUT.onnx (the file to verify)", onnx_path)
    from ..io import check_output

    output = output or str(Path(model).with_name(Path(model).stem + ".separated.pt"))
    outputs = [p for p in (output, onnx_path, int8 and str(int8_path(onnx_path)), report_path) if p]
    if len({Path(p).resolve() for p in outputs}) < len(outputs):
        raise InvalidOptionError("-o, --onnx" + (" (and its .int8.onnx)" if int8 else "") + " and --report must name different files")
    for path in outputs:
        check_output(path, force=force, inputs=input_files(model, arch, calibration))
    original = load(model, arch, allow_pickle, device, ui)
    if synthetic:
        if Path(calibration).exists():
            ui.note("note: --calibration synthetic synthesises inputs; for the path 'synthetic' here, write ./synthetic")
        inputs = make_inputs(original, input_shapes, device, ui)
        data = _synthesize(original, inputs, synthetic_samples, ui)
    else:
        data = calibration_data(calibration, original, *data_options) if calibration else None
        inputs = make_inputs(original, input_shapes, device, ui, data, calibration)
    import convtool

    held = None
    if int8:  # a quarter held out: none of the refit, the search or the int8 scales sees the samples it is verified on
        data, held = split_held_out(data)
    with ui.status("tracing and separating" + (" and calibrating" if data is not None else "") + (" (timed in int8)" if int8 else "")):
        result = convtool.separate(original, inputs, **ranks, **scope, calibration=data, recalibrate_bn=recalibrate_bn, refit=refit,
                                   int8=int8)
    _search_notes(result, ui)
    separated = result.model
    if distill_steps:
        # On synthetic inputs, matching each separated layer's output too lifted digits at 0.25 of
        # the FLOPs from 98.22% to 99.11% (benchmarks/RESULTS.md, "Data-free calibration").
        separated = _distill(separated, original, data, distill_steps, ui, features=synthetic)
    with ui.status("counting parameters and FLOPs"):
        report = convtool.compare(original, separated, inputs, separation=result)
    int8_data = (data, held, ranks["rank"]) if int8 else None
    return _write_pytorch(separated, inputs, output, onnx_path, report_path, report, original, providers, ui, as_json, int8_data)


def _check_before_work(ranks: dict, calibration, recalibrate_bn: bool, refit: str) -> None:
    """The library's own checks of the options, made before the model is loaded (the CLI always has inputs)."""
    from ..plan.budgets import as_budget
    from ..pytorch.separate import check_recovery

    as_budget(ranks["rank"]).check(inputs=True, data=bool(calibration))
    check_recovery(recalibrate_bn, refit, bool(calibration))


def _pytorch_only(**given) -> None:
    """Refuse, in one line, what an ONNX model cannot do here: it is not trained, nor exported, nor loaded from code."""
    flags = [flag for flag, on in (("--distill-steps", given["distill_steps"]), ("--recalibrate-bn", given["recalibrate_bn"]),
                                   ("--refit both", given["refit"] == "both"), ("--calibration synthetic", given["synthetic"]),
                                   ("--onnx", given["onnx_path"]), ("--arch", given["arch"]),
                                   ("--allow-pickle", given["allow_pickle"])) if on]
    if flags:
        raise InvalidOptionError(f"{', '.join(flags)}: for PyTorch models only (an ONNX graph is separated, refit and checked "
                                 "here, not trained, exported or built from code); drop them")


def _search_notes(result, ui) -> None:
    from ..report.render import search_line

    if result.budget_met is False:
        ui.note("note: the FLOP budget cannot be met; every separated layer is at its cheapest")
    if result.search is not None:
        ui.note(search_line(result.search))


def _write_pytorch(separated, inputs, output, onnx_path, report_path, report, original, providers, ui, as_json, int8_data=None) -> int:
    """Every output staged and renamed into place only when all were made, so a model that cannot be pickled or
    exported leaves nothing behind; then the report, and the verification's exit code.

    ``int8_data``: with --int8, (the data fit on, the held-out part, the budget): the int8 file is
    written beside the ONNX file, calibrated on the first, judged on the second.
    """
    import convtool

    from ..deploy.int8_data import first_samples
    from ..io import Staging, write_model
    from ..report.render import to_dict, to_markdown, to_rich

    provider_names, asked = parse_providers(providers)
    checks = None
    with Staging() as staging:
        portable = staging.write(output, lambda tmp: write_model(separated, tmp, inputs))
        if onnx_path:
            calibration = first_samples(int8_data[0]) if int8_data else None
            exported = _export(separated, inputs, onnx_path, ui, calibration)
            with ui.status("verifying on onnxruntime"):
                checks = convtool.verify_onnx(exported, separated, inputs, providers=provider_names)
            report = _with_latency(report, original, separated, inputs, checks, ui)
            if int8_data:
                provider = next((c.provider for c in checks if c.passed), "CPUExecutionProvider")
                report = _with_int8(report, original, exported.path, exported.int8, inputs, calibration, int8_data[1], provider, ui)
        if report_path:
            text = report_text(report_path, lambda: to_dict(report), lambda: to_markdown(report))
            staging.write(report_path, lambda tmp: tmp.write_text(text))
    ui.show(to_rich(report))
    if as_json and not ui.quiet:
        click.echo(json.dumps(to_dict(report), indent=2, allow_nan=False))
    ui.note(f"wrote {output}" + ("" if portable else " (loading it needs the model's own code importable)"))
    missed = _int8_floor_missed(report.int8, int8_data[2]) if int8_data else None
    if missed:
        ui.note(missed)
    if checks is not None:
        finish_verification(checks, asked, ui.note, failed=bool(missed))
    return 0


def _separate_onnx(model, output, ranks, scope, inputs, force, ui, calibration, data_options, providers, report_path, as_json,
                   int8=False) -> int:
    """``separate`` for a model given as ONNX: separated (and refit on the data), checked in onnxruntime, written atomically.

    The report is the one a PyTorch model gets, counted on the graphs and timed on onnxruntime CPU;
    with ``int8``, the int8 file is staged beside the output and judged as for a PyTorch model.
    """
    import dataclasses
    import tempfile

    import convtool

    from ..deploy.int8 import int8_path
    from ..deploy.int8_data import split_held_out
    from ..io import Staging, check_output, load_calibration
    from ..measure.onnxrt import release_freed_memory
    from ..onnx.files import load_onnx, write_with_weights_beside
    from ..onnx.separate import save_onnx, time_onnx
    from ..report.render import run_lines, to_dict, to_markdown, to_rich

    output = output or str(Path(model).with_name(Path(model).stem + ".separated.onnx"))
    if Path(output).suffix.lower() != ".onnx":
        raise InvalidOptionError(f"-o {output}: an ONNX model is written as .onnx")
    for path in [p for p in (output, int8 and str(int8_path(output)), report_path) if p]:
        check_output(path, force=force, inputs=[model, *([calibration] if calibration else [])])
    data = load_calibration(calibration, image_size=data_options[0], mean=data_options[1], std=data_options[2],
                            by_name=True) if calibration else None
    if inputs is None and data is not None and not isinstance(data, dict):  # the first calibration sample, as for PyTorch models
        inputs = tuple(t[:1] for t in data) if isinstance(data, tuple) else (data[:1],)
    held = None
    if int8:  # as for a PyTorch model: the held-out quarter is seen by no fit, search or int8 scale
        data, held = split_held_out(data)
    with ui.status("separating the ONNX graph" + (", calibrating" if data is not None else "") + " and checking it in onnxruntime"):
        result = convtool.separate_onnx(model, inputs, **ranks, **scope, calibration=data, providers=providers, int8=int8)
    _search_notes(result, ui)
    report = None
    with Staging() as staging, tempfile.TemporaryDirectory(prefix="convtool-time-") as timing:
        staging.write(output, lambda tmp: save_onnx(result, tmp))
        if result.runs and any(r.ran and r.provider == "CPUExecutionProvider" for r in result.runs):
            with ui.status("counting, and timing both graphs on onnxruntime CPU"):
                report = result.report()
                separated = Path(timing) / "separated.onnx"
                write_with_weights_beside(result.model, separated)
                # Written twice, the proto is let go: two full sessions timed side by side are the peak.
                result = dataclasses.replace(result, model=None)
                release_freed_memory()
                report = dataclasses.replace(report, latency=time_onnx(lambda: load_onnx(model), separated, result.feeds))
            if int8:
                report = _onnx_int8(report, model, separated, int8_path(output), result.feeds, data, held, staging, ui)
        elif int8:
            raise InvalidOptionError(f"--int8 needs the separated graph run on the CPU: {result.verification}")
        if report_path:
            if report is None:
                raise InvalidOptionError(f"--report needs a run on the CPU: {result.verification}")
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
    for line in run_lines(result.runs):
        ui.note(line)
    ui.note(f"wrote {output}" + (f" and {int8_path(output)}" if int8 else ""))
    missed = _int8_floor_missed(report.int8, ranks["rank"]) if int8 else None
    if missed:
        ui.note(missed)
        click.echo("Error: int8 verification failed", err=True)
        return EXIT_VERIFY_FAILED
    return 0


def _onnx_int8(report, original, separated, out, feeds, data, held, staging, ui):
    """The report with the separated graph's int8 file (staged for ``out``) judged and timed as :func:`_with_int8` does."""
    import dataclasses

    from ..deploy.int8 import quantize_int8
    from ..deploy.int8_data import first_samples

    calibration = first_samples(data)
    with ui.status("quantizing the separated graph to int8"):
        made = staging.write(out, lambda tmp: quantize_int8(separated, calibration, tmp))
    report = _with_int8(report, original, separated, made, feeds, calibration, held, "CPUExecutionProvider", ui)
    return dataclasses.replace(report, int8=dataclasses.replace(report.int8, path=str(out)))


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


def _export(model, inputs, onnx_path, ui, int8_calibration=None):
    import convtool

    with ui.status("exporting ONNX" + (" and quantizing it to int8" if int8_calibration is not None else "")):
        exported = convtool.export_onnx(model, inputs, onnx_path, int8=int8_calibration is not None, calibration=int8_calibration)
    ui.note(export_line(exported))
    return exported


def _with_int8(report, original, fp32, int8, inputs, calibration, held, provider, ui):
    """The report with the int8 file judged on the held-out data and timed against the fp32 original and the dense int8 model."""
    import dataclasses

    from ..deploy.int8_compare import compare_int8

    with ui.status(f"quantizing the original the same way; judging and timing the int8 files on {provider}"):
        return dataclasses.replace(report, int8=compare_int8(original, fp32, int8, inputs, calibration, held, provider=provider))


def _int8_floor_missed(int8, budget) -> str | None:
    """Why the int8 file misses the agreement floor asked for, on the held-out data (None: it keeps it, or none was asked).

    The search judged its trials' int8 files on a part of the data it fit on; this is the check
    on samples nothing saw. A task's own --agreement measure is the search's alone: not judged here.
    """
    from ..plan.agreement import AgreementTarget

    if int8 is None or not isinstance(budget, AgreementTarget) or budget.agreement is not None:
        return None
    f = int8.int8
    if budget.met(f.top1_agreement, f.sqnr_db):
        return None
    kept = "; ".join(part for part in (f.top1_agreement is not None and f"top-1 agreement {f.top1_agreement:.1%}",
                                       f.sqnr_db is not None and f"SQNR {f.sqnr_db:.1f} dB") if part)
    return (f"the int8 file keeps {kept} on {int8.held_out} held-out samples, short of {budget.floors()}: give more "
            "calibration data, or a higher floor")
    f = int8.int8
    if budget.min_agreement is not None and f.top1_agreement is not None and f.top1_agreement < budget.min_agreement:
        return (f"the int8 file keeps {f.top1_agreement:.1%} top-1 agreement on {int8.held_out} held-out samples, below "
                f"--min-agreement {budget.min_agreement:g}: give more calibration data, or a higher floor")
    if budget.min_sqnr is not None and f.sqnr_db is not None and f.sqnr_db < budget.min_sqnr:
        return (f"the int8 file's SQNR is {f.sqnr_db:.1f} dB on {int8.held_out} held-out samples, below --min-sqnr "
                f"{budget.min_sqnr:g}: give more calibration data, or a higher floor")
    return None
