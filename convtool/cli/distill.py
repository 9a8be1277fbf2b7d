"""``convtool distill``: train a separated model to match the original, on one process or several."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InvalidOptionError
from .options import (
    Ui, as_model_dtype, handles_errors, input_files, load, make_inputs, model_options, needs_option,
    parse_data_options,
)


@click.command()
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
@click.option("--no-refit", is_flag=True,
              help="Start from MODEL as it is: skip the least-squares refit of its separated layers on the first 512 "
                   "samples of --data (done by default: gradient steps from an SVD-only start recover far less).")
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
@model_options
@click.option("--force", is_flag=True, help="Overwrite the output, or start over in a --checkpoint-dir holding checkpoints.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@handles_errors
def distill(model, teacher, data, output, steps, batch_size, lr, seed, features, train_batchnorm, no_refit, image_size, mean, std, workers,
            checkpoint_dir, checkpoint_every, resume, amp, timeout, input_shapes, arch, allow_pickle, device, force, quiet):
    """Fine-tune a separated MODEL to reproduce --teacher on unlabeled --data, on one or many processes.

    MODEL is a file `convtool separate` wrote (a pickled module: needs --allow-pickle); --arch
    builds the teacher from a state_dict. Its separated layers are first refit by least squares
    on the first 512 samples of --data (as `separate --calibration` does; --no-refit skips it).
    Run it under torchrun for several processes (gloo on
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

    from ..recovery.distributed import process_group
    from ..core.inputs import first_conv_channels
    from ..io import Checkpoints, Staging, check_output, open_inputs, write_model
    from ..report.progress import StepProgress

    needs_option("--checkpoint-every", bool(checkpoint_every), "--checkpoint-dir DIR", checkpoint_dir)
    needs_option("--resume", resume, "--checkpoint-dir DIR", checkpoint_dir)
    if amp and device != "cuda":
        raise InvalidOptionError("--amp needs --device cuda (mixed precision on the CPU is not supported)")
    if not Path(data).exists():
        raise InvalidOptionError(f"--data {data} does not exist")
    main_process = os.environ.get("RANK", "0") == "0"  # only the first process writes and prints
    ui = Ui(quiet or not main_process, False)
    sources = input_files(model, arch, data) + (teacher,)
    # Every process on the first machine checks (they share its disk): one refusing alone would
    # leave the others waiting for it in the rendezvous until --timeout.
    if os.environ.get("GROUP_RANK", "0") == "0":
        check_output(output, force=force, inputs=sources)
    size, mean_values, std_values = parse_data_options(image_size, mean, std)
    checkpoints = Checkpoints(checkpoint_dir, every=checkpoint_every or 0, resume=resume, force=force) if checkpoint_dir else None
    with process_group(cuda=device == "cuda", timeout=timeout) as world:
        teacher_model = load(teacher, arch, allow_pickle, device, ui)
        student = load(model, None, allow_pickle, device, ui)
        inputs = open_inputs(data, channels=first_conv_channels(teacher_model), image_size=size, mean=mean_values, std=std_values)
        if isinstance(inputs, Dataset):
            inputs = as_model_dtype(inputs, student)
        example_inputs = make_inputs(teacher_model, input_shapes, device, ui, inputs if not input_shapes else None, data)
        ui.note(f"distilling {steps} steps of {batch_size} samples on {world.size} process{'es' if world.size > 1 else ''}")
        with StepProgress(ui.err, steps, batch_size) as progress:
            result = convtool.distill(
                student, teacher_model, inputs, steps=steps, batch_size=batch_size, lr=lr, seed=seed, features=features,
                freeze_batchnorm=not train_batchnorm, workers=workers, amp=amp, checkpoints=checkpoints,
                on_step=progress if not ui.quiet else None, refit=not no_refit,
            )
        if not world.main:
            return
        with Staging() as staging:
            portable = staging.write(output, lambda tmp: write_model(result.model, tmp, example_inputs))
    if result.refit:
        ui.note(f"refit {len(result.refit)} separated layers on the data before the first step")
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    speed = (steps - result.resumed_from) * batch_size / max(result.seconds, 1e-9)
    ui.note(f"distilled {steps} steps{resumed} on {result.processes} process{'es' if result.processes > 1 else ''} in "
            f"{result.seconds:.1f} s ({speed:,.0f} samples/s): loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    ui.note(f"wrote {output}" + ("" if portable else " (loading it needs the model's own code importable)"))
