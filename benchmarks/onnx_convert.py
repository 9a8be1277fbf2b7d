"""Separating a model given only as ONNX: conversion time, peak memory, and the result's latency (issue 14).

Run: .venv/bin/python benchmarks/onnx_convert.py [--model resnet50] [--rank 1] [--runs 20] [--phases]

The model (benchmarks/architectures.py, random weights: neither time nor latency depends on
their values) is exported once to ONNX with torch's exporter, outside the measurement. Then, in
a fresh subprocess so that peak memory is the conversion's own: ``separate_onnx(path, x,
rank=...)`` (load, SVD per Conv node, rewrite, onnx.checker full check, both models run in
onnxruntime CPU) and writing the result, wall-clock and peak RSS (VmHWM; in brackets, after
importing torch, onnx and onnxruntime). Finally the original and the
separated file are timed on onnxruntime CPU, 2 threads, interleaved, medians. Prints Markdown.

``--phases`` also samples the conversion's resident memory (VmRSS, from another process every
2 ms: it sees the C++ side too) and prints the highest sample within each step of
``separate_onnx`` (the functions in :data:`PHASES`, each call marked on entry and exit), to
show where the peak is. A step shorter than a sample may be missed; the peak RSS column is
the kernel's own high-water mark.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES  # noqa: E402

import convtool  # noqa: E402
from convtool.measure.onnxrt import open_session, time_sessions  # noqa: E402

SHAPES = {"resnet50": (1, 3, 224, 224), "resnet18": (1, 3, 224, 224), "vgg16": (1, 3, 224, 224), "jasper": (1, 64, 1000),
          "c3d": (1, 3, 16, 56, 56)}

_CONVERT = """
import json, sys, time
import numpy as np


def hwm_mb():  # this process's peak resident memory (ru_maxrss would include the parent's, across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

import convtool
import convtool.onnx.separate as steps
source, target, rank, shape, phases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
import onnx, onnxruntime, torch  # noqa: F401  (imports are not the conversion's)
marks = []
for owner, name in phases:
    host = {"steps": steps, "checker": onnx.checker, "session": onnxruntime.InferenceSession}[owner]
    def marked(*args, _f=getattr(host, name), _name=name, **kwargs):
        marks.append((time.monotonic(), "+" + _name))
        try:
            return _f(*args, **kwargs)
        finally:
            marks.append((time.monotonic(), "-" + _name))
    setattr(host, name, marked)
if phases:
    sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, str(os.getpid())], stdout=subprocess.PIPE, text=True)
    time.sleep(0.2)
before = hwm_mb()
start, start_mark = time.perf_counter(), time.monotonic()
result = convtool.separate_onnx(source, x, rank=rank if rank == "full" else int(rank))
steps.save_onnx(result, target)
seconds = time.perf_counter() - start
samples = []
if phases:
    time.sleep(0.05)
    sampler.send_signal(signal.SIGINT)
    samples = [tuple(map(float, row.split())) for row in sampler.communicate()[0].splitlines() if row]
print(json.dumps(dict(seconds=seconds, peak_mb=hwm_mb(), start_mb=before, layers=len(result.layers), skipped=len(result.skipped),
                      verified=result.verified, relative_error=result.relative_error,
                      params_before=sum(l.params_before for l in result.layers),
                      params_after=sum(l.params_after for l in result.layers),
                      marks=[(t - start_mark, m) for t, m in marks], samples=[(t - start_mark, mb) for t, mb in samples])))
"""
SAMPLER = """
import sys, time
rows = []
try:
    while True:
        with open(f"/proc/{sys.argv[1]}/status") as status:
            rows += [(time.monotonic(), int(line.split()[1]) / 1024) for line in status if line.startswith("VmRSS:")]
        time.sleep(0.002)
except (KeyboardInterrupt, FileNotFoundError):
    print("\\n".join(f"{t} {mb}" for t, mb in rows))
"""
_CONVERT = _CONVERT.replace("import json, sys, time", "import json, os, signal, subprocess, sys, time\nSAMPLER = " + repr(SAMPLER))
# The steps of separate_onnx whose memory --phases shows: (where the function lives, its name).
PHASES = [("steps", name) for name in ("load_onnx", "write_with_weights_beside", "passes_check", "count_onnx", "find_sites",
                                       "install_pairs", "refit_onnx", "fold_batchnorm", "open_session",
                                       "read_with_weights_beside", "save_onnx")] + [("checker", "check_model"), ("session", "run")]


def phase_table(stats: dict, size_mb: float) -> str:
    """Markdown: per step, the highest RSS sampled inside any of its calls (and outside every step)."""
    highest: dict[str, float] = {}
    calls: dict[str, int] = {}
    open_steps: list[str] = []
    marks = iter(stats["marks"])
    mark = next(marks, None)
    for t, mb in stats["samples"]:
        while mark is not None and mark[0] <= t:
            sign, name = mark[1][0], mark[1][1:]
            if sign == "+":
                open_steps.append(name)
                calls[name] = calls.get(name, 0) + 1
            else:
                open_steps.remove(name)
            mark = next(marks, None)
        step = open_steps[-1] if open_steps else "(between steps)"
        highest[step] = max(highest.get(step, 0.0), mb)
    rows = ["| step (innermost) | calls | highest RSS MB | above imports | x file |", "|---|---:|---:|---:|---:|"]
    for step, mb in highest.items():
        above = mb - stats["start_mb"]
        rows.append(f"| {step} | {calls.get(step, '')} | {mb:.0f} | {above:.0f} | {above / size_mb:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(SHAPES))
    parser.add_argument("--rank", default="1")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--phases", action="store_true", help="Also print the peak memory of each step of the conversion.")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = SHAPES[args.model]
    model, x = ARCHITECTURES[args.model]().eval(), torch.randn(shape)
    with tempfile.TemporaryDirectory(prefix="convtool-onnx-bench-") as tmp:
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "model.separated.onnx"
        convtool.export_onnx(model, x, source, dynamic_batch=False)
        run = subprocess.run([sys.executable, "-c", _CONVERT, str(source), str(target), args.rank, json.dumps(list(shape)),
                              json.dumps(PHASES if args.phases else [])],
                             capture_output=True, text=True, check=True)
        stats = json.loads(run.stdout.strip().splitlines()[-1])
        sessions = [open_session(p, "CPUExecutionProvider", threads=2) for p in (source, target)]
        feeds = {sessions[0].get_inputs()[0].name: x.numpy()}
        original_ms, separated_ms = time_sessions(sessions, feeds, args.runs, warmup=3)
        size_mb = source.stat().st_size / 2**20
    print(f"machine: {platform.machine()}, onnxruntime CPU, 2 threads; {args.model} ONNX ({size_mb:.0f} MB), "
          f"input {'x'.join(map(str, shape))}, rank {args.rank}\n")
    print("| model | Conv nodes separated / left | conversion s | peak RSS MB (after imports) | params of those layers | "
          "relative output error | original ms | separated ms | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.model} | {stats['layers']} / {stats['skipped']} | {stats['seconds']:.1f} | "
          f"{stats['peak_mb']:.0f} ({stats['start_mb']:.0f}) | {stats['params_before'] / 1e6:.2f}M -> {stats['params_after'] / 1e6:.2f}M | "
          f"{stats['relative_error']:.3g} | {original_ms:.1f} | {separated_ms:.1f} | {original_ms / separated_ms:.2f}x |")
    if args.phases:
        print(f"\nPeak above imports {stats['peak_mb'] - stats['start_mb']:.0f} MB, "
              f"{(stats['peak_mb'] - stats['start_mb']) / size_mb:.2f}x the file ({size_mb:.1f} MiB)\n")
        print(phase_table(stats, size_mb))


if __name__ == "__main__":
    main()
