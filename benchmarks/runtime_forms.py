"""Which exact forms of a separable pair onnxruntime CPU runs fastest (issue 12, item 4).

Run: .venv/bin/python benchmarks/runtime_forms.py [--runs 30]

1. k x 1 depthwise convs: as built, and as convtool's WidthOneConv2d (a 1 x k conv on the
   transposed input; for width 1 the transpose is a reshape), on inputs of width 1 and wider.
2. Pointwise-then-depthwise pairs of rank r > 1 (the depthwise conv takes r channels per
   group): as built, and as r multiplier-1 depthwise branches (BranchedSeparableConv),
   with the dense conv for scale.
Every form of a row is exported alone and timed round-robin in one run (2 threads, batch 1,
medians); each is checked equal to the first before timing. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

from convtool.core.modules import BranchedSeparableConv, SeparableConv, WidthOneConv2d
from convtool.measure.onnxrt import time_modules

DEPTHWISE = [(1024, 1024, 1, 64), (128, 1024, 1, 64), (128, 1024, 1, 9), (64, 4096, 1, 31), (192, 17, 17, 7), (64, 56, 56, 7)]
PW_DW = [(128, 16, 5, (64, 1), (1024, 1)), (1024, 128, 8, (64, 1), (1024, 1)), (64, 64, 2, (3, 3), (56, 56)),
         (128, 128, 4, (3, 3), (28, 28)), (256, 256, 3, (3, 3), (14, 14))]


def timed(forms, x, runs, same=None):
    """Round-robin medians of ``forms``; the first ``same`` (all by default) are checked equal first."""
    with torch.no_grad():
        for form in forms[1:same]:
            torch.testing.assert_close(form(x), forms[0](x), rtol=1e-4, atol=1e-4)
    return time_modules(forms, x, runs=runs, threads=2, exporter="torchscript")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, onnxruntime CPU, 2 threads, batch 1\n")
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


if __name__ == "__main__":
    main()
