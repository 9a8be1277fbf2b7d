"""onnxruntime latency of separated models: end to end and per layer, against the FLOP ratio.

Run: .venv/bin/python benchmarks/latency.py [--provider cpu] [--threads 2] [--runs 30]

For a ResNet-18-like and a VGG-like net (benchmarks/architectures.py) at 1x3x224x224, and
(``--models jasper c3d``) a Jasper-like 1-d speech encoder on 1x64x1000 mel frames and a
C3D-like 3-d net on 1x3x16x56x56 clips:
  * end to end: the original, rank 1, rank 2 with a channel multiplier, rank 2 as multiplier-1
    branches (convtool's export form), all exported and timed round-robin in one run;
  * per layer: each distinct separable conv shape alone, dense against its rank-1 and rank-2
    pairs (both layouts), timed round-robin.
Speedup = original median / separated median; FLOP ratio from fvcore; efficiency = speedup /
FLOP ratio. Every ONNX model is exported with BatchNorm folded (onnxruntime folds it too).
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import c3d_like, jasper_like, resnet18, vgg11_narrow  # noqa: E402

import convtool  # noqa: E402
from convtool.deploy.runtime_form import branch_layout, for_runtime, measured_layout  # noqa: E402
from convtool.measure.onnxrt import time_modules  # noqa: E402


def flops(model: nn.Module, x: torch.Tensor) -> int:
    return convtool.analyze(model, x).flops


def variants(model: nn.Module, x: torch.Tensor, provider: str) -> dict[str, nn.Module]:
    rank1 = convtool.separate(model, x, rank=1).model
    rank2 = convtool.separate(model, x, rank=2).model
    # Where it pays: layers not faster than dense on the provider stay dense, and each rank-2
    # pair takes the layout measured faster at its shape.
    paying1 = convtool.separate(model, x, rank=1, latency_provider=provider).model
    paying2 = convtool.separate(model, x, rank=2, latency_provider=provider).model
    return {
        "original": model,
        "rank 1": rank1,
        "rank 1, export form": branch_layout(rank1, x)[0],
        "rank 1, where faster": paying1,
        "rank 2, multiplier": rank2,
        "rank 2, branches": branch_layout(rank2)[0],
        "rank 2, branches + export form": branch_layout(rank2, x)[0],
        "rank 2, measured layout": measured_layout(rank2, x, provider)[0],
        "rank 2, where faster, measured layout": measured_layout(paying2, x, provider)[0],
    }


def end_to_end(name: str, model: nn.Module, x: torch.Tensor, args) -> None:
    models = variants(model, x, args.provider)
    # BatchNorm folded, pairs left in the layout each row names; time_modules exports them as they
    # are, and refuses a provider that does not run here rather than time the CPU.
    shipped = [for_runtime(m, x, fold_bn=True, layout="multiplier")[0] for m in models.values()]
    times = time_modules(shipped, x, provider=args.provider, runs=args.runs, warmup=3, threads=args.threads, exporter="torchscript")
    base_flops, base_ms = flops(model, x), times[0]
    print(f"\n### {name}, end to end ({args.provider}, {args.threads} threads, {args.runs} runs)\n")
    print("| variant | latency ms (median) | speedup | FLOPs | FLOP ratio | efficiency |")
    print("|---|---:|---:|---:|---:|---:|")
    for (label, variant), ms in zip(models.items(), times):
        f = flops(_counted(variant), x)
        speedup, ratio = base_ms / ms, base_flops / f
        print(f"| {label} | {ms:.2f} | {speedup:.2f}x | {f / 1e9:.3f}G | {ratio:.2f}x | {speedup / ratio:.2f} |")


def _counted(model: nn.Module) -> nn.Module:
    """Branched pairs compute what their multiplier form does; fvcore counts Concat as free."""
    return model


def layer_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Each distinct separable conv (channels, kernel, stride, input size) with its input shape."""
    seen, found = set(), []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and set(m.kernel_size) != {1} and m.groups == 1 and m.in_channels > 1:
            def hook(module, inputs, output, name=name):
                key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, tuple(inputs[0].shape))
                if key not in seen:
                    seen.add(key)
                    found.append((name, module, tuple(inputs[0].shape)))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return found


def per_layer(name: str, model: nn.Module, x: torch.Tensor, args) -> None:
    print(f"\n### {name}, per layer ({args.provider}, {args.threads} threads, {args.runs} runs)\n")
    print("| layer | shape | input | dense ms | rank 1 ms (speedup / FLOP ratio / eff.) "
          "| rank 2 multiplier ms (speedup / eff.) | rank 2 branches ms (speedup / eff.) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for layer, conv, shape in layer_shapes(model, x):
        conv = nn.Sequential(conv).eval()
        xi = torch.randn(shape)
        r1 = convtool.separate(conv, xi, rank=1).model
        r2 = convtool.separate(conv, xi, rank=2).model
        r2b = branch_layout(r2)[0]
        times = time_modules(
            [conv, r1, r2, r2b], xi, provider=args.provider, runs=args.runs, warmup=3, threads=args.threads,
            exporter="torchscript",
        )
        f = [flops(m, xi) for m in (conv, r1, r2)]
        eff = lambda i, fi: (times[0] / times[i]) / (f[0] / f[fi])  # noqa: E731
        k = "x".join(map(str, conv[0].kernel_size))
        print(
            f"| {layer} | {conv[0].in_channels}->{conv[0].out_channels} {k} /{conv[0].stride[0]} | {'x'.join(map(str, shape[2:]))} "
            f"| {times[0]:.3f} | {times[1]:.3f} ({times[0] / times[1]:.2f}x / {f[0] / f[1]:.2f}x / {eff(1, 1):.2f}) "
            f"| {times[2]:.3f} ({times[0] / times[2]:.2f}x / {eff(2, 2):.2f}) "
            f"| {times[3]:.3f} ({times[0] / times[3]:.2f}x / {eff(3, 2):.2f}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", nargs="*", default=["resnet18", "vgg"])
    parser.add_argument("--skip-layers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, onnxruntime provider {args.provider}, {args.threads} threads")
    image = (1, 3, 224, 224)
    builders = {
        "resnet18": ("ResNet-18-like", resnet18, image), "vgg": ("VGG-11-like (half width)", vgg11_narrow, image),
        "jasper": ("Jasper-like 1-d speech encoder", jasper_like, (1, 64, 1000)),
        "c3d": ("C3D-like 3-d net", c3d_like, (1, 3, 16, 56, 56)),
    }
    for key in args.models:
        name, build, shape = builders[key]
        model, x = build().eval(), torch.randn(shape)
        end_to_end(name, model, x, args)
        if not args.skip_layers:
            per_layer(name, model, x, args)


if __name__ == "__main__":
    main()
