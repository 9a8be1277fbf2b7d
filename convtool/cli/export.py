"""``convtool export``: a PyTorch model to an ONNX file, in its runtime form."""

from __future__ import annotations

import click

from .options import Ui, export_line, handles_errors, input_files, load, make_inputs, model_options


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write.")
@model_options
@click.option("--opset", type=int, help="ONNX opset [the exporter's default].")
@click.option("--static-batch", is_flag=True, help="Keep the batch dimension fixed instead of dynamic.")
@click.option("--no-fold-bn", is_flag=True, help="Keep BatchNorm layers instead of folding them into the conv before.")
@click.option("--layout", type=click.Choice(["branches", "multiplier", "measured"]), default="branches", show_default=True,
              help="How rank > 1 pairs are written: multiplier-1 depthwise branches (faster on onnxruntime), one conv, "
                   "or per pair whichever is measured faster on the CPU provider.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@handles_errors
def export(model, output, input_shapes, arch, allow_pickle, device, opset, static_batch, no_fold_bn, layout, force, quiet):
    """Export MODEL to ONNX (torch.export, with the TorchScript exporter as fallback).

    \b
    Example:
      convtool export resnet.separated.pt --allow-pickle -o resnet.onnx --input-shape 1,3,224,224
    """
    import convtool

    from ..io import check_output

    from ..measure.onnx_file import check_opset

    ui = Ui(quiet, False)
    check_opset(opset)
    check_output(output, force=force, inputs=input_files(model, arch, None))
    loaded = load(model, arch, allow_pickle, device, ui)
    inputs = make_inputs(loaded, input_shapes, device, ui)
    with ui.status("exporting ONNX"):
        exported = convtool.export_onnx(
            loaded, inputs, output, opset=opset, dynamic_batch=not static_batch, fold_bn=not no_fold_bn, layout=layout
        )
    ui.note(export_line(exported))
