"""How close does a latency target land, end to end? `LatencyTarget` on four families of nets.

Run: .venv/bin/python benchmarks/latency_target.py [--targets 0.7,0.5,0.35] [--nets resnet18,resnet50,jasper,c3d]
     [--runs 30] [--rounds 5] [--threads 2]

For a ResNet-18-like and a ResNet-50-like net (benchmarks/architectures.py, torchvision's layers,
random weights) at 1x3x112x112, the Jasper-like 1-d encoder at 1x64x400 (4 s of mel frames) and
the C3D-like 3-d net at 1x3x8x56x56, separates with `convtool.LatencyTarget(target,
provider="cpu", threads=THREADS)` for each target and prints, per target: the end-to-end ratio
the returned model measured against the original (its own interleaved benchmark: onnxruntime
CPU, both exported as shipped, medians of RUNS runs each), the FLOPs after over before, the rounds
tried, the seconds `separate` took (per-layer timings, every round's plan, export and benchmark),
and whether the ratio is within 10% of the target or, if not, the floor the search measured (the
fastest plan there is) or why. Weights are random: the errors, not the timings, depend on them.
Per-layer timings are cached across targets of one net (as in one process of a sweep), so the
first target of each net pays for them. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from architectures import c3d_like, jasper_like, resnet18, resnet50  # noqa: E402

import convtool  # noqa: E402

NETS = {
    "resnet18": ("ResNet-18-like", resnet18, (1, 3, 112, 112)),
    "resnet50": ("ResNet-50-like", resnet50, (1, 3, 112, 112)),
    "jasper": ("Jasper-like 1-d", jasper_like, (1, 64, 400)),
    "c3d": ("C3D-like 3-d", c3d_like, (1, 3, 8, 56, 56)),
}


def verdict(search: convtool.LatencySearch) -> str:
    """Within 10% of the target, or the floor measured, or why not."""
    if abs(search.ratio - search.target.fraction) <= 0.1 * search.target.fraction:
        return "yes"
    if search.floor is not None:
        return f"no: floor {search.floor:.3f}"
    return "no: faster than asked" if search.ratio < search.target.fraction else "no: rounds ran out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.7,0.5,0.35")
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    print(f"machine: {platform.machine()}, onnxruntime CPU, {args.threads} threads, {args.runs} interleaved runs a round, "
          f"at most {args.rounds} rounds, tolerance 10%\n")
    print("| net | input | target | measured ratio | FLOPs after / before | rounds | seconds | within 10% (or floor) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for key in args.nets.split(","):
        label, build, shape = NETS[key]
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(shape)
        for target in targets:
            rank = convtool.LatencyTarget(target, provider="cpu", runs=args.runs, threads=args.threads, rounds=args.rounds)
            start = time.perf_counter()
            result = convtool.separate(model, x, rank=rank)
            seconds = time.perf_counter() - start
            s = result.latency_search
            print(f"| {label} | {'x'.join(map(str, shape))} | {target:g} | {s.ratio:.3f} | {s.flops_fraction:.3f} | "
                  f"{len(s.rounds)} | {seconds:.0f} | {verdict(s)} |", flush=True)


if __name__ == "__main__":
    main()
