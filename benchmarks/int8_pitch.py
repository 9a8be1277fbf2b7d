"""Issue 37's pitch row: the trained pitch estimator, the fastest plan keeping 0.99 of its pitches in int8, against dense int8.

Run: .venv/bin/python benchmarks/int8_pitch.py [--frames 1024] [--order auto] [--threads 2] [--runs 50] [--blocks 3]

The half-width CREPE-style estimator of benchmarks/pitch.py (``pitch_net.safetensors``: 392M
multiply-adds, 99.2% raw pitch accuracy) is separated as a user would, through the CLI:

    convtool separate benchmarks/pitch_net.safetensors --arch benchmarks/pitch.py:PitchNet \\
        --min-agreement 0.99 --agreement benchmarks/pitch.py:pitches_kept --order auto --int8 \\
        --calibration frames.npy --onnx pitch.sep.onnx -o pitch.sep.pt --report pitch.sep.json

``--frames`` unlabeled frames (``pitch.tones(n, seed=777)``, as benchmarks/calibration_steps.py
draws them) are the calibration: the CLI holds their last quarter out, the search judges each
trial's int8 file on a quarter of the rest by the task's own measure (frames whose decoded pitch
stays within 50 cents of the original's), and returns the fastest plan, measured in int8, keeping
0.99. The dense original is then exported and quantized here by ``quantize_int8`` in the same
default form, on the same samples the CLI calibrated its int8 file on (``first_samples`` of the
fit part). The four files (dense fp32, dense int8, separated fp32, separated int8) are timed in
one interleaved run (round-robin, order shuffled each round, medians in blocks; onnxruntime CPU,
``--threads`` threads, batch 1: the exported graphs' fixed batch, one 64 ms frame) and judged on
``--held-out`` other frames (``pitch.tones(n, seed=123_456)``, which no fit, search or int8
scale saw): pitches kept against the fp32 PyTorch original, raw pitch accuracy against the true
f0, SQNR of the bin logits. Prints a Markdown table and the machine line before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pitch  # noqa: E402
from int8_timing import interleaved, machine, sqnr  # noqa: E402

import convtool  # noqa: E402
from convtool.deploy.int8 import int8_path, quantize_int8  # noqa: E402
from convtool.deploy.int8_data import first_samples, split_held_out  # noqa: E402
from convtool.measure.onnxrt import timing_session  # noqa: E402


def logits_of(session, frames: torch.Tensor) -> torch.Tensor:
    """An onnxruntime session's bin logits on every frame, in runs of the graph's batch."""
    name, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else 256
    x = frames.numpy()
    return torch.cat([torch.from_numpy(session.run(None, {name: x[i : i + step]})[0]) for i in range(0, len(x), step)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1024, help="unlabeled calibration frames given to --calibration")
    parser.add_argument("--held-out", type=int, default=1000, help="frames the table is judged on")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--order", choices=["dw-pw", "pw-dw", "auto"], default="auto")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for the timing")
    parser.add_argument("--runs", type=int, default=50, help="rounds per block")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the files here instead of a temporary folder")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}", flush=True)
    weights = HERE / "pitch_net.safetensors"
    original = pitch.load(weights)
    frames, _ = pitch.tones(args.frames, seed=777)
    test, f0 = pitch.tones(args.held_out, seed=123_456)
    with tempfile.TemporaryDirectory(prefix="int8-pitch-") as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "frames.npy", frames.numpy())
        command = [sys.executable, "-m", "convtool", "separate", str(weights.relative_to(HERE.parent)),
                   "--arch", "benchmarks/pitch.py:PitchNet", "--min-agreement", f"{args.min_agreement:g}",
                   "--agreement", "benchmarks/pitch.py:pitches_kept", "--order", args.order, "--int8",
                   "--calibration", str(out / "frames.npy"), "--onnx", str(out / "pitch.sep.onnx"),
                   "-o", str(out / "pitch.sep.pt"), "--report", str(out / "pitch.sep.json"), "--force"]
        print(f"\n$ {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        notes = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith((" ", "\x1b"))]
        print("\n".join(f"  {line}" for line in notes[-12:]))
        print(f"exit {done.returncode} after {seconds:.0f} s", flush=True)
        if done.returncode != 0 or not (out / "pitch.sep.json").exists():
            print(done.stdout[-3000:])
            raise SystemExit(f"convtool separate failed (exit {done.returncode})")
        report = json.loads((out / "pitch.sep.json").read_text())
        # The dense original, exported as convtool ships it and quantized in the same default form on
        # the samples the CLI calibrated its int8 file on: the fit part's first 512 frames.
        fit, _ = split_held_out(frames)
        dense = convtool.export_onnx(original, frames[:1], out / "pitch.onnx").path
        dense_int8 = quantize_int8(dense, first_samples(fit), out / "pitch.int8.onnx").path
        paths = {"dense fp32": dense, "dense int8": dense_int8, "separated fp32": out / "pitch.sep.onnx",
                 "separated int8": int8_path(out / "pitch.sep.onnx")}
        sessions = [timing_session(path, "CPUExecutionProvider", args.threads) for path in paths.values()]
        reference = pitch.estimate(original, test)
        with torch.no_grad():
            reference_logits = torch.cat([original(test[i : i + 256]) for i in range(0, len(test), 256)])
        judged = {}
        for name, session in zip(paths, sessions):
            logits = logits_of(session, test)
            cents = pitch.decode(logits)
            judged[name] = (pitch.agreement(cents, reference), pitch.agreement(cents, pitch.to_cents(f0)),
                            sqnr(logits.numpy(), reference_logits.numpy()))
        x = frames[:1].numpy()
        feeds = [{s.get_inputs()[0].name: x} for s in sessions]
        load_start = machine()
        timed = interleaved(sessions, feeds, args.runs, args.blocks)
    dense_fp32_ms, dense_int8_ms = timed[0].median_ms, timed[1].median_ms
    flops = report["totals"]["flops_after"] / report["totals"]["flops_before"]
    search, int8 = report.get("search") or {}, report["int8"]
    layers = ", ".join(f"{layer['name']} {layer['order']} {layer['rank']}" for layer in report["layers"])
    print(f"\nplan: {layers} (FLOPs {flops:.3f}); search: {search.get('goal', '-')}; "
          f"{len(search.get('tried') or [])} plans tried; the CLI's own int8 report on its {int8['held_out']} held-out "
          f"frames: separated int8 {int8['vs_dense_int8']:.3f} of the dense int8 model's latency, "
          f"{int8['vs_original']:.3f} of the fp32 original's")
    print(f"\ntiming started at: {load_start}")
    print(f"\n| model | FLOPs fraction | latency ms (median) | block medians | vs dense fp32 | vs dense int8 "
          f"| pitches kept vs the original ({args.held_out} held-out frames) | raw pitch accuracy | SQNR of logits vs the original, dB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for (name, (kept, rpa, db)), t in zip(judged.items(), timed):
        fraction = 1.0 if name.startswith("dense") else flops
        print(f"| {name} | {fraction:.3f} | {t.median_ms:.3f} | {t.spread()} | {dense_fp32_ms / t.median_ms:.2f}x "
              f"| {dense_int8_ms / t.median_ms:.2f}x | {kept:.2%} | {rpa:.2%} | {db:.1f} |")
    print(f"\nafter: {machine()}")


if __name__ == "__main__":
    main()
