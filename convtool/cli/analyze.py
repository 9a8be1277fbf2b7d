"""``convtool analyze``: a model's FLOPs and parameters per module, PyTorch or ONNX."""

from __future__ import annotations

import json

import click

from ..errors import InvalidOptionError
from .options import (
    Ui, check_report_suffix, handles_errors, input_files, is_onnx, load, make_inputs, model_options, onnx_input_options, onnx_inputs,
    output_options, report_text,
)


def _analyze_onnx(model: str, input_shapes: tuple[str, ...], input_values: tuple[str, ...]):
    """``analyze`` for an ONNX file: fvcore's rules on the shapes onnx infers (one row per node that costs)."""
    from ..onnx.feeds import example_feeds
    from ..onnx.files import load_onnx
    from ..onnx.counts import onnx_analysis

    proto = load_onnx(model)
    feeds, why_not = example_feeds(proto, onnx_inputs(input_shapes, input_values))
    if feeds is None:
        raise InvalidOptionError(f"{why_not}")
    return onnx_analysis(proto, feeds)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@model_options
@onnx_input_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the analysis to FILE.json or FILE.md.")
@click.option("--force", is_flag=True, help="Overwrite an existing report file.")
@output_options
@handles_errors
def analyze(model, input_shapes, arch, allow_pickle, device, input_values, report_path, force, quiet, as_json):
    """Count MODEL's parameters and FLOPs (fvcore: one multiply-add is one flop), per layer.

    \b
    Example:
      convtool analyze model.pt --allow-pickle --input-shape 1,3,224,224 --report costs.md
    """
    import convtool

    from ..io import check_output, write_atomic
    from ..report.render import analysis_markdown, analysis_rich, analysis_to_dict

    ui = Ui(quiet, as_json)
    check_report_suffix(report_path)
    if report_path:
        check_output(report_path, force=force, inputs=input_files(model, arch, None))
    if is_onnx(model):
        analysis = _analyze_onnx(model, input_shapes, input_values)
    else:
        if input_values:
            raise InvalidOptionError("--input-value names an ONNX model's input; a PyTorch model takes --input-shape")
        loaded = load(model, arch, allow_pickle, device, ui)
        inputs = make_inputs(loaded, input_shapes, device, ui)
        with ui.status("counting parameters and FLOPs"):
            analysis = convtool.analyze(loaded, inputs)
    ui.show(analysis_rich(analysis))
    if as_json and not quiet:
        click.echo(json.dumps(analysis_to_dict(analysis), indent=2))
    if report_path:
        text = report_text(report_path, lambda: analysis_to_dict(analysis), lambda: analysis_markdown(analysis))
        write_atomic(report_path, lambda tmp: tmp.write_text(text))
