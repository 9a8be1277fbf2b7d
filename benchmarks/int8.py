"""Separation and int8, composed: issue 37's table on the ResNet-18-like net at 224.

Run: .venv/bin/python benchmarks/int8.py [--threads 2] [--runs 15] [--blocks 3] [--targets 0.5] [--int8-latency-targets 0.6]

The ResNet-18-like net (benchmarks/architectures.py, random weights: latency does not depend
on them) dense; separated at rank 1; at rank 1 with the RGB stem kept dense (its int8 depthwise
conv is slow: benchmarks/int8_forms.py); at rank 1 with each layer kept dense unless its pair is
faster in int8 (``separate(..., int8=True)``); planned in int8 at each latency target (issue 37's
done-when: 0.6 of the dense int8 model's latency, separated int8 at least 1.5x faster than dense
int8); and at each FLOP target. Each is exported with
convtool.export_onnx (fp32) and quantized with convtool's quantize_int8 in its default form
(calibrated on 16 real-ish images, benchmarks/int8_timing.py). Every file is timed in one
interleaved run against the dense fp32 original (batch 1, 2 onnxruntime threads by default, rounds
rotated, medians in blocks); each int8 file is judged against its own fp32 model on 16 other
images by verify_int8 (SQNR, top-1 agreement). Prints a Markdown table and the machine line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import resnet18  # noqa: E402
from int8_timing import images, interleaved, machine  # noqa: E402

import convtool  # noqa: E402
from convtool.deploy.int8 import quantize_int8  # noqa: E402
from convtool.deploy.int8_verify import verify_int8  # noqa: E402
from convtool.measure.onnxrt import timing_session  # noqa: E402


def int8_filtered(model, x):
    """Rank 1 with never-slower judged in int8 (``separate(..., int8=True)``): a layer stays dense unless its pair,
    quantized and timed with 8-bit edges, takes at most 0.9 of its dense conv's int8 time."""
    return convtool.separate(model, x, rank=1, latency_provider="cpu", int8=True).model


def int8_latency_target(model, x, fraction, threads):
    """Planned in int8 at a latency target: ``fraction`` of the dense int8 model's latency, both timed quantized."""
    return convtool.separate(model, x, rank=convtool.LatencyTarget(fraction, threads=threads), int8=True).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--runs", type=int, default=15, help="rounds per block")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--targets", default="0.5", help="FLOP targets, comma-separated")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--no-int8-filter", action="store_true", help="skip the rank-1 model planned on int8 layer timings")
    parser.add_argument("--int8-latency-targets", default="0.6",
                        help="latency targets planned in int8 (of the dense int8 model's latency), comma-separated; '' for none")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}; onnxruntime CPU, {args.threads} threads, batch 1, 1x3x{args.size}x{args.size}")
    torch.manual_seed(0)
    dense = resnet18().eval()
    x = torch.from_numpy(images(1, args.size, seed=99))
    calibration, held_out = images(16, args.size, seed=1), images(16, args.size, seed=2)
    nets = {"dense": dense, "separated rank 1": convtool.separate(dense, x, rank=1).model,
            "separated rank 1, stem dense": convtool.separate(dense, x, rank=1, exclude=["conv1"]).model}
    if not args.no_int8_filter:
        nets["separated rank 1, int8 latency filter"] = int8_filtered(dense, x)
    for target in (float(t) for t in args.int8_latency_targets.split(",") if t):
        nets[f"planned in int8 at LatencyTarget({target:g})"] = int8_latency_target(dense, x, target, args.threads)
    for target in (float(t) for t in args.targets.split(",") if t):
        nets[f"separated at FlopsTarget({target:g})"] = convtool.separate(dense, x, rank=convtool.FlopsTarget(target)).model
    flops = {name: convtool.analyze(model, x).flops for name, model in nets.items()}
    rows, sessions = [], []
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        for i, (name, model) in enumerate(nets.items()):
            fp32 = convtool.export_onnx(model, x, Path(tmp) / f"m{i}.onnx").path
            int8 = quantize_int8(fp32, calibration, Path(tmp) / f"m{i}.int8.onnx")
            check = verify_int8(int8.path, fp32, held_out)
            rows += [(name, "fp32", None), (name, "int8", check)]
            sessions += [timing_session(path, "CPUExecutionProvider", args.threads) for path in (fp32, int8.path)]
        timed = interleaved(sessions, [{"input": x.numpy()}] * len(sessions), args.runs, args.blocks)
    original, dense_int8 = timed[0].median_ms, timed[1].median_ms
    print("\n| model | precision | FLOPs fraction | latency ms (median) | block medians | vs dense fp32 | vs dense int8 "
          "| int8 over its fp32 | SQNR of int8 vs its fp32, dB | top-1 agreement of int8 vs its fp32 |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for i, ((name, precision, check), t) in enumerate(zip(rows, timed)):
        gain = f"{timed[i - 1].median_ms / t.median_ms:.2f}x" if check else "-"
        judged = f"{check.fidelity.sqnr_db:.1f} | {100 * check.fidelity.top1_agreement:.1f}%" if check else "- | -"
        print(f"| {name} | {precision} | {flops[name] / flops['dense']:.3f} | {t.median_ms:.2f} | {t.spread()} "
              f"| {original / t.median_ms:.2f}x | {dense_int8 / t.median_ms:.2f}x | {gain} | {judged} |")
    print(f"\nafter: {machine()}")


if __name__ == "__main__":
    main()
