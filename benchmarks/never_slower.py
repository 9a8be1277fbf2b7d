"""Is any separated model slower than its original on onnxruntime CPU? The test zoo at a FLOP target of 0.5.

Run: .venv/bin/python benchmarks/never_slower.py [--target 0.5] [--runs 30]

For every model of tests/zoo.py and the two tall-kernel nets of issue 12 (64x1 kernels on
width-1 signals: 1,024 -> 128 channels, and its 128 -> 16 sibling), separates with
`FlopsTarget(target)` and `order="auto"`, once plainly and once with `latency_provider="cpu"`
(the `--latency cpu` flag), and times each separated model against its original with
`convtool.benchmark`: both exported in the shipped runtime form, onnxruntime CPU, 2 threads,
interleaved, medians; three benchmarks per model, the median speedup shown with the range. The
zoo's inputs (32x32) are run 4x larger, batch 1, where the model allows: at 32x32 a whole model
takes about 0.1 ms and the same pair of models measured 0.8x in one run and 2.2x in another.
A speedup below 1.00 is a separated model slower than its original.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from architectures import TallKernelNet  # noqa: E402
from tests.zoo import ZOO, build  # noqa: E402

import convtool  # noqa: E402


def models(scale: int):
    for entry in ZOO:
        model, inputs = build(entry)
        larger = tuple(torch.randn(1, t.shape[1], t.shape[2] * scale, t.shape[3] * scale) for t in inputs)
        try:
            with torch.no_grad():
                model(*larger)
            inputs = larger
        except Exception:  # a model fixed to its input size keeps it
            pass
        yield entry.name, model, inputs
    for name, channels, width in (("tall-kernel", 1024, 128), ("tall-kernel-small", 128, 16)):
        torch.manual_seed(0)
        yield name, TallKernelNet(channels, width).eval(), (torch.randn(1, channels, 1024, 1),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--scale", type=int, default=4, help="zoo inputs this many times larger in H and W, batch 1")
    parser.add_argument("--repeats", type=int, default=3, help="benchmarks per model; the median speedup is shown")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {platform.machine()}, onnxruntime CPU, 2 threads, FlopsTarget({args.target}), order auto\n")
    print("| model | input | FLOPs after / before | speedup, plain (range) | speedup, --latency cpu (range) | layers separated (plain / latency) |")
    print("|---|---|---:|---:|---:|---|")
    target = convtool.FlopsTarget(args.target)
    for name, model, inputs in models(args.scale):
        cells = []
        counts = []
        ratio = ""
        for latency in (None, "cpu"):
            try:
                result = convtool.separate(model, inputs, rank=target, order="auto", latency_provider=latency)
            except convtool.NothingToSeparateError:
                cells.append("1.00 (all dense)")
                counts.append("0")
                continue
            if latency is None:
                ratio = f"{result.flops_after / result.flops_before:.2f}"
            speedups = sorted(convtool.benchmark(model, result.model, inputs, runs=args.runs, threads=2).speedup
                              for _ in range(args.repeats))
            cells.append(f"{statistics.median(speedups):.2f} ({speedups[0]:.2f}-{speedups[-1]:.2f})")
            counts.append(str(len(result.layers)))
        shape = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        print(f"| {name} | {shape} | {ratio} | {cells[0]} | {cells[1]} | {counts[0]} / {counts[1]} |", flush=True)


if __name__ == "__main__":
    main()
