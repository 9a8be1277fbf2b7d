"""Which int8 form onnxruntime CPU runs fastest, for dense and for separated convs (issue 37, item 1).

Run: .venv/bin/python benchmarks/int8_forms.py [--threads 2] [--runs 15] [--blocks 3] [--skip-layers] [--skip-models]

1. Layers (the ResNet-18 shapes, its 7x7 stride-2 stem on 3 channels included): a dense conv,
   its depthwise conv, a pointwise 1x1 and the rank-1 pair (depthwise then pointwise) alone,
   in fp32 and in int8 (the default form), the
   int8 file timed with float edges (quantize the input, dequantize the output, as a file
   quantized alone runs) and with 8-bit edges (as the layer runs inside an int8 model, which
   convtool's per-layer int8 timing measures). All of one shape interleaved in one run.
2. Whole models: the ResNet-18-like net at 1x3x224x224 (random weights), dense and separated at
   rank 1, exported with convtool.export_onnx; each fp32 file and its int8 files in every form
   below, all interleaved in one run (rounds rotated, medians, in blocks). Calibrated on 16
   real-ish images (benchmarks/int8_timing.py), SQNR and top-1 agreement against the form's own
   fp32 model on 16 others.
Prints Markdown tables and the machine line (CPU, int8 instructions, load).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import resnet18  # noqa: E402
from int8_timing import images, interleaved, machine, sqnr, top1  # noqa: E402

import convtool  # noqa: E402
from convtool.core.modules import SeparableConv  # noqa: E402
from convtool.deploy.int8 import Int8Form, quantize_int8  # noqa: E402
from convtool.deploy.int8_latency import eight_bit_edges  # noqa: E402
from convtool.measure.onnx_file import write_onnx  # noqa: E402
from convtool.measure.onnxrt import timing_session  # noqa: E402

SHAPES = [(3, 64, 7, 2, 224), (64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7)]  # M, N, k, stride, H
FORMS = {
    "QDQ, per-channel, u8 act / s8 wt": Int8Form(),
    "QDQ, per-tensor, u8/s8": Int8Form(per_channel=False),
    "QDQ, per-channel, s8/s8": Int8Form(activations="int8"),
    "QDQ, per-channel, u8/u8": Int8Form(weights="uint8"),
    "QDQ, per-channel, u8/s8, reduce_range": Int8Form(reduce_range=True),
    "QDQ, per-channel, u8/s8, no pre-processing": Int8Form(preprocess=False),
    "QOperator, per-channel, u8/s8": Int8Form(format="qoperator"),
    "QOperator, per-tensor, u8/s8": Int8Form(format="qoperator", per_channel=False),
    "QOperator, per-channel, u8/s8, depthwise in fp32": Int8Form(format="qoperator", float_depthwise=True),
}


def layers(args, folder: Path) -> None:
    print("\n| layer | input C x H x W | fp32 ms | int8 ms, float edges | int8 ms, 8-bit edges | int8 speed-up (8-bit edges) |")
    print("|---|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for m, n, k, stride, h in SHAPES:
        dense = nn.Conv2d(m, n, k, stride, k // 2).eval()
        out = (h + 2 * (k // 2) - k) // stride + 1
        kinds = {  # each layer at its input: the pointwise conv of the pair reads the depthwise conv's output
            f"dense {k}x{k}/{stride}, {m}->{n}": (dense, (m, h)),
            f"depthwise {k}x{k}/{stride}, {m}": (nn.Conv2d(m, m, k, stride, k // 2, groups=m).eval(), (m, h)),
            f"pointwise 1x1, {m}->{n}": (nn.Conv2d(m, n, 1).eval(), (m, out)),
            "rank-1 pair": (SeparableConv.from_conv(dense, rank=1).eval(), (m, h)),
        }
        sessions, feeds = [], []
        for i, (module, (c, size)) in enumerate(kinds.values()):
            x = rng.standard_normal((1, c, size, size)).astype(np.float32)
            calibration = rng.standard_normal((8, c, size, size)).astype(np.float32)
            fp32 = write_onnx(module, (torch.from_numpy(x),), folder / f"l{m}_{i}.onnx", dynamic_batch=False, exporter="torchscript").path
            int8 = quantize_int8(fp32, calibration, folder / f"l{m}_{i}.int8.onnx").path
            inner, inner_feeds = eight_bit_edges(int8, {"input": x}, folder / f"l{m}_{i}.inner.onnx")
            for path, feed in ((fp32, {"input": x}), (int8, {"input": x}), (inner, inner_feeds)):
                sessions.append(timing_session(path, "CPUExecutionProvider", args.threads))
                feeds.append(feed)
        ms = [t.median_ms for t in interleaved(sessions, feeds, args.layer_runs, args.blocks)]
        for i, (kind, (_, (c, size))) in enumerate(kinds.items()):
            fp32_ms, float_edges, eight_bit = ms[3 * i: 3 * i + 3]
            print(f"| {kind} | {c} x {size} x {size} | {fp32_ms:.3f} | {float_edges:.3f} | {eight_bit:.3f} | {fp32_ms / eight_bit:.2f}x |",
                  flush=True)
        print(f"| *rank-1 pair's speed-up over dense* | {m} x {h} x {h} | {ms[0] / ms[9]:.2f}x | {ms[1] / ms[10]:.2f}x "
              f"| {ms[2] / ms[11]:.2f}x | |", flush=True)


def models(args, folder: Path) -> None:
    torch.manual_seed(0)
    dense = resnet18().eval()
    x = torch.from_numpy(images(1, seed=99))
    calibration, held_out = images(16, seed=1), images(16, seed=2)
    nets = {"dense": dense, "rank 1": convtool.separate(dense, x, rank=1).model,
            # what a plan timed in int8 does with the RGB stem, whose int8 depthwise conv is slow (the layer table)
            "rank 1, stem dense": convtool.separate(dense, x, rank=1, exclude=["conv1"]).model}
    rows, sessions, feeds = [], [], []
    for net, model in nets.items():
        fp32 = convtool.export_onnx(model, x, folder / f"{net}.onnx").path
        reference = timing_session(fp32, "CPUExecutionProvider", args.threads)
        expected = reference.run(None, {"input": held_out})[0]
        rows.append((net, "fp32", None, None, None))
        sessions.append(reference)
        for name, form in FORMS.items():
            if form.float_depthwise and net == "dense":
                continue
            start = time.perf_counter()
            int8 = quantize_int8(fp32, calibration, folder / f"{net}.{len(sessions)}.onnx", form=form)
            seconds = time.perf_counter() - start
            session = timing_session(int8.path, "CPUExecutionProvider", args.threads)
            out = session.run(None, {"input": held_out})[0]
            rows.append((net, name, seconds, sqnr(out, expected), top1(out, expected)))
            sessions.append(session)
    feeds = [{"input": x.numpy()}] * len(sessions)
    timed = interleaved(sessions, feeds, args.runs, args.blocks)
    base = {net: timed[i].median_ms for i, (net, form, *_) in enumerate(rows) if form == "fp32"}
    print("\n| model | form | latency ms (median) | block medians | vs its fp32 | vs dense fp32 | SQNR dB | top-1 agreement | quantize s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for (net, form, seconds, db, agree), t in zip(rows, timed):
        extra = "| - | - | - |" if seconds is None else f"| {db:.1f} | {100 * agree:.1f}% | {seconds:.1f} |"
        print(f"| {net} | {form} | {t.median_ms:.2f} | {t.spread()} | {base[net] / t.median_ms:.2f}x | "
              f"{base['dense'] / t.median_ms:.2f}x {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--runs", type=int, default=15, help="rounds per block, whole models")
    parser.add_argument("--layer-runs", type=int, default=100, help="rounds per block, layers")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}; onnxruntime CPU, {args.threads} threads, batch 1")
    with tempfile.TemporaryDirectory(prefix="int8-forms-") as tmp:
        if not args.skip_layers:
            layers(args, Path(tmp))
        if not args.skip_models:
            models(args, Path(tmp))
    print(f"\nafter: {machine()}")


if __name__ == "__main__":
    main()
