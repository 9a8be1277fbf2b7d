"""Which exact forms of a separable pair onnxruntime CPU runs fastest (issue 12, item 4).

Run: .venv/bin/python benchmarks/runtime_forms.py [--runs 30]

1. k x 1 depthwise convs: as built, and as convtool's WidthOneConv2d (a 1 x k conv on the
   transposed input; for width 1 the transpose is a reshape), on inputs of width 1 and wider.
2. Pointwise-then-depthwise pairs of rank r > 1 (the depthwise conv takes r channels per
   group): as built, and as r multiplier-1 depthwise branches (BranchedSeparableConv),
   with the dense conv for scale.
3. 1-d depthwise convs: as built (Conv1d), and as convtool's Conv1dAs2d (a 1 x k Conv2d on
   the input seen as one row); 3-d depthwise convs against their dense and pointwise convs
   (``--nd``, only these two tables).
Every form of a row is exported alone and timed round-robin in one run (2 threads, batch 1,
medians); each is checked equal to the first before timing. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

from convtool.core.modules import BranchedSeparableConv, Conv1dAs2d, SeparableConv, WidthOneConv2d
from convtool.measure.onnxrt import time_modules

DEPTHWISE = [(1024, 1024, 1, 64), (128, 1024, 1, 64), (128, 1024, 1, 9), (64, 4096, 1, 31), (192, 17, 17, 7), (64, 56, 56, 7)]
PW_DW = [(128, 16, 5, (64, 1), (1024, 1)), (1024, 128, 8, (64, 1), (1024, 1)), (64, 64, 2, (3, 3), (56, 56)),
         (128, 128, 4, (3, 3), (28, 28)), (256, 256, 3, (3, 3), (14, 14))]
DEPTHWISE_1D = [(256, 500, 13), (256, 500, 21), (512, 500, 29), (512, 250, 29), (256, 1000, 29), (384, 500, 25),
                (1024, 200, 5), (64, 16000, 11), (128, 4000, 3)]
DEPTHWISE_3D = [(32, (16, 28, 28)), (64, (8, 28, 28)), (128, (4, 14, 14)), (128, (8, 14, 14))]


def timed(forms, x, runs, same=None):
    """Round-robin medians of ``forms``; the first ``same`` (all by default) are checked equal first."""
    with torch.no_grad():
        for form in forms[1:same]:
            torch.testing.assert_close(form(x), forms[0](x), rtol=1e-4, atol=1e-4)
    return time_modules(forms, x, runs=runs, threads=2, exporter="torchscript")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--nd", action="store_true", help="only the 1-d and 3-d tables")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, onnxruntime CPU, 2 threads, batch 1\n")
    if args.nd:
        return nd(args.runs)
    print("| depthwise conv | input C x H x W | k x 1 ms | as 1 x k ms | ratio |")
    print("|---|---|---:|---:|---:|")
    for c, h, w, k in DEPTHWISE:
        conv = nn.Conv2d(c, c, (k, 1), groups=c, padding=(k // 2, 0), bias=False).eval()
        ms = timed([conv, WidthOneConv2d(conv).eval()], torch.randn(1, c, h, w), args.runs)
        print(f"| {k}x1 | {c} x {h} x {w} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.2f}x |", flush=True)
    print("\n| pw-dw pair M -> N, rank r, kernel | input H x W | r-input groups ms | branches ms | dense ms | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for m, n, r, k, hw in PW_DW:
        dense = nn.Conv2d(m, n, k, padding=(k[0] // 2, k[1] // 2), bias=False).eval()
        pair = SeparableConv.from_conv(dense, rank=r, order="pw-dw").eval()
        ms = timed([pair, BranchedSeparableConv(pair).eval(), dense], torch.randn(1, m, *hw), args.runs, same=2)
        print(f"| {m} -> {n}, r={r}, {k[0]}x{k[1]} | {hw[0]} x {hw[1]} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} | {ms[0] / ms[1]:.2f}x |", flush=True)


def nd(runs: int) -> None:
    print("| 1-d depthwise conv | input C x L | Conv1d ms | as 1 x k Conv2d ms | ratio |")
    print("|---|---|---:|---:|---:|")
    for c, length, k in DEPTHWISE_1D:
        conv = nn.Conv1d(c, c, k, groups=c, padding=k // 2, bias=False).eval()
        ms = timed([conv, Conv1dAs2d(conv).eval()], torch.randn(1, c, length), runs)
        print(f"| k={k} | {c} x {length} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.2f}x |", flush=True)
    print("\n| 3-d conv C -> C, 3x3x3 | input T x H x W | dense ms | depthwise ms | pointwise ms | speedup of the rank-1 pair | FLOP ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for c, shape in DEPTHWISE_3D:
        dense = nn.Conv3d(c, c, 3, padding=1, bias=False).eval()
        dw = nn.Conv3d(c, c, 3, padding=1, groups=c, bias=False).eval()
        pw = nn.Conv3d(c, c, 1, bias=False).eval()
        ms = timed([dense, dw, pw], torch.randn(1, c, *shape), runs, same=1)
        flop_ratio = (27 * c * c) / (27 * c + c * c)
        print(f"| {c} | {' x '.join(map(str, shape))} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} "
              f"| {ms[0] / (ms[1] + ms[2]):.2f}x | {flop_ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
