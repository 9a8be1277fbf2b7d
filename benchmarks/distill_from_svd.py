"""`convtool distill` from an SVD-only (uncalibrated) separation against the calibrated pipeline, on 1 and 2 processes.

Run: .venv/bin/python benchmarks/distill_from_svd.py [--steps 300] [--out /tmp/distill_from_svd]

The digits example at rank 1, through the command line as a user runs it:
(a) `separate --rank 1 --calibration images.npy --distill-steps N` (calibrate, then distil);
(b) `separate --rank 1` (no data), then `distill --data images.npy --steps N` on 1 process (it
refits first);
(c) the same distil on 2 processes (torchrun, gloo, one thread each);
(d) (b) with `--no-refit` (what `distill` did before issue 23).
Each cell: test accuracy on the 450 held-out digits, and wall seconds of the command(s).
No label is used after training the original.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from digits_cnn import load_digits_tensors  # noqa: E402

WEIGHTS = ["examples/digits_cnn.safetensors", "--arch", "examples/digits_cnn.py:DigitsCNN"]
IMAGES = "examples/digits_train_images.npy"


def convtool(*args: str, processes: int = 0) -> float:
    """Run a convtool command (under torchrun with ``processes``), return its wall seconds."""
    head = [sys.executable, "-m", "convtool"] if not processes else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "convtool"]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if processes else {})}
    start = time.perf_counter()
    subprocess.run([*head, *args, "-q", "--force"], check=True, cwd=ROOT, env=env)
    return time.perf_counter() - start


def accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    model = torch.load(path, weights_only=False).eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("/tmp/distill_from_svd"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    _, _, test_x, test_y = load_digits_tensors()
    steps = str(args.steps)
    out = lambda name: str(args.out / name)  # noqa: E731
    cells = {}
    seconds = convtool("separate", *WEIGHTS, "--rank", "1", "--calibration", IMAGES, "--distill-steps", steps, "-o", out("a.pt"))
    cells["(a) separate --calibration --distill-steps"] = (accuracy(args.out / "a.pt", test_x, test_y), seconds)
    bare = convtool("separate", *WEIGHTS, "--rank", "1", "--input-shape", "1,1,8,8", "-o", out("svd.pt"))
    cells["SVD only (the start of b-d)"] = (accuracy(args.out / "svd.pt", test_x, test_y), bare)
    common = ["distill", out("svd.pt"), "--allow-pickle", "--teacher", *WEIGHTS, "--data", IMAGES, "--steps", steps,
              "--workers", "0"]
    seconds = convtool(*common, "-o", out("b.pt"))
    cells["(b) separate, then distill (1 process)"] = (accuracy(args.out / "b.pt", test_x, test_y), bare + seconds)
    seconds = convtool(*common, "-o", out("c.pt"), processes=2)
    cells["(c) separate, then distill (2 processes)"] = (accuracy(args.out / "c.pt", test_x, test_y), bare + seconds)
    seconds = convtool(*common, "--no-refit", "-o", out("d.pt"))
    cells["(d) separate, then distill --no-refit"] = (accuracy(args.out / "d.pt", test_x, test_y), bare + seconds)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.steps} distillation steps; "
          f"original test accuracy 99.33%\n")
    print("| pipeline | test accuracy | wall s |")
    print("|---|---:|---:|")
    for name, (acc, s) in cells.items():
        print(f"| {name} | {acc:.2%} | {s:.1f} |")


if __name__ == "__main__":
    main()
