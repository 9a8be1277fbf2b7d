"""Distillation throughput on 1 and N processes (torchrun, gloo on the CPU; NCCL with --cuda), and the scaling efficiency.

Run: .venv/bin/python benchmarks/distill_scaling.py [--processes 1,2] [--repeats 3] [--steps 60] [--cuda]

Strong scaling: the global batch is fixed (``--batch-size``, split evenly over the processes),
so N processes should make N times the steps per second; efficiency = speedup / N. Each
process gets one thread (torchrun's own default); a 1-process run with all the cores' threads
is printed too, since that is the alternative on one CPU machine. Runs are interleaved and
repeated, and the median is reported, because a shared machine drifts between runs. Steps
are timed from the end of the warm-up steps to the last, on the first process.
Two models: the digits example (8x8 inputs, width 32: communication-bound, the worst case)
and the same network at width 64 on 16x16 inputs (8 times the compute per sample). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {examples!r})
from digits_cnn import DigitsCNN
import convtool
from convtool.recovery.distributed import process_group
width, size, steps, warmup, batch, cuda = {width}, {size}, {steps}, {warmup}, {batch}, {cuda}
torch.manual_seed(0)
teacher = DigitsCNN(width=width).eval()
data = torch.randn(2048, 1, size, size, generator=torch.Generator().manual_seed(0))
if cuda:
    teacher = teacher.cuda()
student = convtool.separate(teacher, data[:2].to(next(teacher.parameters()).device), rank=1).model
with process_group(cuda=cuda) as world:
    if cuda:
        teacher, student = teacher.cuda(), student.cuda()
    times = {{}}
    def tick(step, loss):
        if cuda:
            torch.cuda.synchronize()
        times[step] = time.perf_counter()
    convtool.distill(student, teacher, data, steps=steps, batch_size=batch, on_step=tick)
    if world.main:
        rate = (steps - warmup) / (times[steps] - times[warmup])
        print(json.dumps(dict(steps_per_s=rate, samples_per_s=rate * batch, processes=world.size)))
"""

MODELS = {"digits (w32, 8x8)": (32, 8), "digits-wide (w64, 16x16)": (64, 16)}


def measure(model: str, processes: int, threads: int, args: argparse.Namespace) -> dict:
    width, size = MODELS[model]
    code = CHILD.format(examples=str(ROOT / "examples"), width=width, size=size, steps=args.steps, warmup=args.warmup,
                        batch=args.batch_size, cuda=args.cuda)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(code)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if processes == 1:
        command = [sys.executable, file.name]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", file.name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    finally:
        os.unlink(file.name)
    if done.returncode != 0:
        raise SystemExit(f"{model} on {processes} processes failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="process counts to compare, comma-separated [1,2]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch [64]")
    parser.add_argument("--cuda", action="store_true", help="one GPU per process, NCCL (needs as many GPUs)")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    cores = os.cpu_count() or 1
    configs = [(n, 1) for n in counts] + ([] if args.cuda else [(1, cores)])
    results: dict = {}
    for _ in range(args.repeats):  # interleaved: each repeat runs every configuration once
        for model in MODELS:
            for n, threads in configs:
                results.setdefault((model, n, threads), []).append(measure(model, n, threads, args))
    print(f"Machine: {platform.machine()}, {cores} cores, {'CUDA, NCCL' if args.cuda else 'CPU, gloo'}; "
          f"global batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up), median of {args.repeats}\n")
    print("| model | processes | threads each | steps/s | samples/s | speedup | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for model in MODELS:
        base = statistics.median(r["steps_per_s"] for r in results[(model, 1, 1)]) if (model, 1, 1) in results else None
        for n, threads in configs:
            rate = statistics.median(r["steps_per_s"] for r in results[(model, n, threads)])
            speedup = rate / base if base else float("nan")
            efficiency = f"{speedup / n:.0%}" if threads == 1 else "-"
            print(f"| {model} | {n} | {threads} | {rate:.1f} | {rate * args.batch_size:,.0f} | {speedup:.2f}x | {efficiency} |")


if __name__ == "__main__":
    main()
