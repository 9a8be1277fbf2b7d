"""FLOP budgets with default options on a ResNet-18-like net at 224: never slower than the original? (issue 34)

Run: .venv/bin/python benchmarks/never_slower_budgets.py [--targets 0.75,0.5,0.35] [--runs 100] [--blocks 3]

For each FLOP target the net is separated twice: with default options (layers whose separated
form is not measurably faster than the dense conv on onnxruntime CPU stay dense) and with
``allow_slower=True`` (the FLOPs spent by error alone, as before issue 34). ``convtool.sweep``
exports every model as ``export_onnx`` ships it and times all files, the original's included,
round-robin in one run (medians of ``--runs``, 2 threads). Interleaving many sessions cools
caches, so each ratio is checked with back-to-back blocks too: the original and one separated
file, ``--runs`` each in turn, ``--blocks`` times, the median of the block medians. The weights
are random (latency does not depend on their values). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from architectures import resnet18  # noqa: E402

import convtool  # noqa: E402
from convtool.measure.onnxrt import time_sessions, timing_session  # noqa: E402


def blocks(original: Path, separated: Path, x: torch.Tensor, runs: int, count: int, threads: int) -> float:
    """Separated over original latency from back-to-back blocks: ``runs`` of one file, then of the other, ``count`` times."""
    sessions = [timing_session(p, "CPUExecutionProvider", threads) for p in (original, separated)]
    feeds = {sessions[0].get_inputs()[0].name: x.numpy()}
    ratios = []
    for _ in range(count):
        (a,) = time_sessions([sessions[0]], feeds, runs, warmup=10)
        (b,) = time_sessions([sessions[1]], feeds, runs, warmup=10)
        ratios.append(b / a)
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.75,0.5,0.35")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    targets = tuple(float(t) for t in args.targets.split(","))
    torch.manual_seed(0)
    model, x = resnet18().eval(), torch.randn(1, 3, 224, 224)
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"onnxruntime CPU, {args.threads} threads; {time.strftime('%Y-%m-%d')}\n")
    print("| options | FLOP target | FLOPs reached | layers separated | latency ms | speed-up (interleaved) | "
          "speed-up (back-to-back blocks) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for label, slower in (("default (never slower)", False), ("allow_slower=True", True)):
        began = time.perf_counter()
        sweep = convtool.sweep(model, x, targets=targets, runs=args.runs, threads=args.threads, allow_slower=slower)
        seconds = time.perf_counter() - began
        with tempfile.TemporaryDirectory() as tmp:
            original = convtool.export_onnx(model, x, Path(tmp) / "o.onnx", dynamic_batch=False).path
            for point in sweep.points:
                separated = convtool.separate(model, x, rank=convtool.FlopsTarget(point.target), allow_slower=slower)
                path = convtool.export_onnx(separated.model, x, Path(tmp) / f"{point.target}.onnx", dynamic_batch=False).path
                back = blocks(original, path, x, args.runs, args.blocks, args.threads)
                print(f"| {label} | {point.target:g} | {point.flops_fraction:.3f} | {point.layers} | {point.latency_ms:.2f} "
                      f"(original {sweep.original.latency_ms:.2f}) | {point.speedup:.2f}x | {1 / back:.2f}x | {seconds:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
