"""How long the accuracy-keeping path takes: a FLOP target with calibration, on two architectures.

Run: .venv/bin/python benchmarks/decision_speed.py [--models tall-kernel resnet50] [--inputs 64 256]

For each model: `separate(model, x, rank=FlopsTarget(0.25), calibration=data)` with random
inputs (timing does not depend on their values), split into the planning step (rank costing on
calibration activations) and the rest (install, proof, refit), from one run, wall-clock, on
torch's 2 threads. Also plain `rank=1` for scale. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES  # noqa: E402

import convtool  # noqa: E402
from convtool.plan import ranks as plan_module  # noqa: E402

SHAPES = {"tall-kernel": (1024, 1024, 1), "resnet50": (3, 224, 224), "resnet18": (3, 224, 224)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["tall-kernel", "resnet50"])
    parser.add_argument("--inputs", nargs="*", type=int, default=[64, 256], help="calibration inputs, one per model")
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--sensitivity", action="store_true", help="FlopsTarget(target, sensitivity=True): the opt-in output-aware allocation")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {platform.machine()}, torch threads 2, FlopsTarget({args.target})\n")
    print("| model | calibration inputs | rank=1 s | target + calibration s | of which planning s | layers (order, rank) |")
    print("|---|---:|---:|---:|---:|---|")
    spent = {"plan": 0.0}
    original_plan = plan_module.make_plan

    def timed_plan(*a, **k):
        start = time.perf_counter()
        try:
            return original_plan(*a, **k)
        finally:
            spent["plan"] += time.perf_counter() - start

    from convtool.pytorch import separate as separate_module

    separate_module.make_plan = timed_plan
    for name, count in zip(args.models, args.inputs):
        torch.manual_seed(0)
        model = ARCHITECTURES[name]().eval()
        data = torch.randn(count, *SHAPES[name])
        start = time.perf_counter()
        convtool.separate(model, data[:1], rank=1)
        plain = time.perf_counter() - start
        spent["plan"] = 0.0
        start = time.perf_counter()
        result = convtool.separate(model, data[:1], rank=convtool.FlopsTarget(args.target, sensitivity=args.sensitivity), calibration=data)
        total = time.perf_counter() - start
        layers = ", ".join(f"{l.name} {l.order} {l.rank}" for l in result.layers)
        print(f"| {name} | {count} | {plain:.1f} | {total:.1f} | {spent['plan']:.1f} | {layers} |")


if __name__ == "__main__":
    main()
