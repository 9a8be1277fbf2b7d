"""Conversion time and peak memory of `convtool.separate` on full-size architectures.

Run: .venv/bin/python benchmarks/convert_speed.py [--repeats 5]

Each measurement runs in a fresh subprocess so that peak RSS (ru_maxrss) belongs to one
conversion. Reported: median wall time of `separate(model, x, rank=1)` with a 1x3x224x224
example input (which includes tracing, the SVDs, the module swaps and the proof: one recorded
forward pass of the dense copy and one of the separated model), the same without example
inputs (convtool then guesses a (1, 3, 224, 224) input), and the peak RSS growth over the
process's RSS with the model built. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads({threads})
from architectures import ARCHITECTURES
import convtool
model = ARCHITECTURES[{arch!r}]().eval()
x = torch.randn(1, 3, 224, 224) if {with_inputs} else None
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = convtool.separate(model, x, rank=1)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(seconds=elapsed, peak_growth_mb=(peak - rss_before) / 1024, layers=len(result.layers),
                      params=sum(p.numel() for p in model.parameters()))))
"""


def measure(arch: str, with_inputs: bool, threads: int) -> dict:
    code = CHILD.format(here=str(HERE), arch=arch, with_inputs=with_inputs, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", nargs="*", default=["resnet50", "vgg16"])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch threads {args.threads}\n")
    print("| model | params | layers separated | separate(x) median s | separate() median s | peak RSS growth MB |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs:
        runs = {True: [], False: []}
        for _ in range(args.repeats):  # interleave the two variants
            for with_inputs in (True, False):
                runs[with_inputs].append(measure(arch, with_inputs, args.threads))
        first = runs[True][0]
        print(
            f"| {arch} | {first['params'] / 1e6:.1f}M | {first['layers']} "
            f"| {statistics.median(r['seconds'] for r in runs[True]):.2f} "
            f"| {statistics.median(r['seconds'] for r in runs[False]):.2f} "
            f"| {statistics.median(r['peak_growth_mb'] for r in runs[True]):.0f} |"
        )


if __name__ == "__main__":
    main()
