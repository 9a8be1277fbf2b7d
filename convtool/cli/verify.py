"""``convtool verify``: an ONNX file checked against the PyTorch model it came from, on each provider."""

from __future__ import annotations

import json

import click

from .options import (
    Ui, finish_verification, handles_errors, load, make_inputs, model_options, output_options, parse_providers,
)


@click.command()
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--against", required=True, type=click.Path(dir_okay=False), help="The PyTorch model the file should agree with.")
@model_options
@click.option("--providers", help="onnxruntime providers, comma-separated [cpu,cuda].")
@click.option("--rtol", type=float, help="Relative tolerance [1e-3; 1e-2 for float16, 5e-2 for bfloat16 outputs].")
@click.option("--atol", type=float, help="Absolute tolerance [1e-4; 1e-2 for float16, 5e-2 for bfloat16 outputs].")
@output_options
@handles_errors
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
    provider_names, asked = parse_providers(providers)
    reference = load(against, arch, allow_pickle, device, ui)
    inputs = make_inputs(reference, input_shapes, device, ui)
    with ui.status("verifying on onnxruntime"):
        checks = convtool.verify_onnx(onnx_file, reference, inputs, providers=provider_names, rtol=rtol, atol=atol)
    if as_json and not quiet:
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    finish_verification(checks, asked, ui.line)
