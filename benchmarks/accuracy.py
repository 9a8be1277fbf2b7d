"""Accuracy after separation on scikit-learn's digits: SVD only, + calibration, + both halves, + distillation.

Run: .venv/bin/python benchmarks/accuracy.py [--weights examples/digits_cnn.safetensors]

Trains the digits CNN of examples/digits_cnn.py (unless --weights is given), then for rank 1 and
for FLOP targets 0.15 / 0.25 / 0.35 / 0.5 reports test accuracy after the SVD initialisation alone,
after calibration (least-squares refit on 256 unlabeled training images; in brackets, with
BatchNorm statistics re-estimated on them too), after calibration with ``refit="both"`` (both
halves of each pair, alternating least squares; in brackets with BatchNorm re-estimation; and
its separation's seconds) and after label-free distillation from the original on the unlabeled training images;
FLOPs (fvcore, whole model); onnxruntime CPU latency against the original (2 threads,
interleaved, medians, batch 1); and the wall time of convtool's steps (training excluded).
No label is used after training the original. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from digits_cnn import DigitsCNN, load_digits_tensors  # noqa: E402

import convtool  # noqa: E402


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def conv_flops(model, x) -> float:
    from convtool.measure.conv_calls import record

    return sum(call.flops for call in record(model, (x,)).calls)


def train(seed: int) -> DigitsCNN:
    sys.path.insert(0, str(ROOT / "examples"))
    import train_digits

    return train_digits.train(epochs=40, seed=seed, log=lambda *_: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="use these weights instead of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--calibration-size", type=int, default=256)
    parser.add_argument("--latency-runs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)

    train_x, train_y, test_x, test_y = load_digits_tensors()
    if args.weights:
        from safetensors.torch import load_file

        model = DigitsCNN()
        model.load_state_dict(load_file(str(args.weights)))
    else:
        model = train(args.seed)
    model.eval()
    base = accuracy(model, test_x, test_y)
    x1 = test_x[:1]
    base_flops = convtool.analyze(model, x1).flops
    calibration = train_x[: args.calibration_size]  # unlabeled: images only
    print(f"machine: {platform.machine()}, torch threads 2; original test accuracy {base:.2%}, {base_flops} FLOPs\n")
    print("| setting | FLOPs | FLOP ratio (model / convs) | SVD only | + calibration | (with BN re-estimation) "
          "| + both halves | (with BN re-estimation) | both halves s | + distillation | ORT CPU latency (orig / sep) | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_conv = conv_flops(model, x1)
    settings = [("rank 1", dict(rank=1)), *((f"target {t}", dict(rank=convtool.FlopsTarget(t), order="auto")) for t in (0.15, 0.25, 0.35, 0.5))]
    for label, options in settings:
        start = time.perf_counter()
        svd = convtool.separate(model, x1, **options)
        calibrated = convtool.separate(model, x1, calibration=calibration, **options)
        distilled = convtool.distill(calibrated.model, model, train_x, steps=args.distill_steps, seed=args.seed)
        wall = time.perf_counter() - start  # convtool's steps: two separations and the distillation
        with_bn = convtool.separate(model, x1, calibration=calibration, recalibrate_bn=True, **options)
        started = time.perf_counter()
        both = convtool.separate(model, x1, calibration=calibration, refit="both", **options)
        both_s = time.perf_counter() - started
        both_bn = convtool.separate(model, x1, calibration=calibration, refit="both", recalibrate_bn=True, **options)
        flops = convtool.analyze(distilled.model, x1).flops
        timing = convtool.benchmark(model, distilled.model, x1, runs=args.latency_runs, threads=2)
        print(
            f"| {label} | {flops} | {flops / base_flops:.3f} / {conv_flops(distilled.model, x1) / base_conv:.3f} "
            f"| {accuracy(svd.model, test_x, test_y):.2%} "
            f"| {accuracy(calibrated.model, test_x, test_y):.2%} | ({accuracy(with_bn.model, test_x, test_y):.2%}) "
            f"| {accuracy(both.model, test_x, test_y):.2%} | ({accuracy(both_bn.model, test_x, test_y):.2%}) | {both_s:.1f} "
            f"| {accuracy(distilled.model, test_x, test_y):.2%} "
            f"| {timing.original_ms:.3f} / {timing.separated_ms:.3f} ms ({timing.speedup:.2f}x) | {wall:.1f} |"
        )


if __name__ == "__main__":
    main()
