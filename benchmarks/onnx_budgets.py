"""Every budget on a model held only as ONNX, through the library and the CLI (issue 33).

Run: .venv/bin/python benchmarks/onnx_budgets.py [--runs 100]

1. The digits CNN of examples/, exported to ONNX: ``separate_onnx`` with ``AgreementTarget(0.99)``
   (minimizing FLOPs, as the issue's done-when compares FLOPs, and minimizing measured latency,
   the default) and with ``FlopsTarget(0.5)``, all calibrated on the 1,280 unlabeled training
   images; each separated graph scored in onnxruntime on the 450-image test split: top-1
   agreement with the original, accuracy, FLOPs. The same through ``convtool separate
   digits.onnx --min-agreement 0.99 --calibration ...``.
2. A ResNet-18-like net at 224 exported to ONNX (random weights: latency does not depend on
   them): ``separate_onnx`` with ``LatencyTarget(0.6)``: the ratio its own end-to-end benchmark
   measured, then both files timed again interleaved (``--runs`` each) and back to back; and the
   same through ``convtool separate r18.onnx --latency-target 0.6``.
Prints Markdown tables, with the machine and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import convtool  # noqa: E402
from convtool.measure.onnxrt import time_sessions, timing_session  # noqa: E402
from convtool.onnx.separate import save_onnx  # noqa: E402


def _scores(path: Path, test_x: torch.Tensor, test_y: torch.Tensor, reference: np.ndarray) -> tuple[float, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    top = np.concatenate([session.run(None, {name: test_x[i:i + 1].numpy()})[0].argmax(1) for i in range(len(test_x))])
    return float((top == reference).mean()), float((top == test_y.numpy()).mean())


def digits(folder: Path) -> None:
    from digits_cnn import DigitsCNN, load_digits_tensors
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(ROOT / "examples" / "digits_cnn.safetensors")))
    model.eval()
    _, _, test_x, test_y = load_digits_tensors()
    images = torch.from_numpy(np.load(ROOT / "examples" / "digits_train_images.npy"))
    path = convtool.export_onnx(model, images[:1], folder / "digits.onnx").path
    with torch.no_grad():
        reference = model(test_x).argmax(1).numpy()
    print("| budget (digits CNN as ONNX) | FLOPs fraction | held-out agreement (search) | test-split agreement | accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    _, accuracy = _scores(path, test_x, test_y, reference)
    print(f"| original | 1.000 | - | 100.00% | {accuracy:.2%} | - |")
    for label, rank in (("AgreementTarget(0.99, minimize='flops')", convtool.AgreementTarget(0.99, minimize="flops")),
                        ("AgreementTarget(0.99) (fastest measured)", convtool.AgreementTarget(0.99)),
                        ("FlopsTarget(0.5)", convtool.FlopsTarget(0.5))):
        began = time.perf_counter()
        result = convtool.separate_onnx(path, (images[:1].numpy(),), rank=rank, order="auto", calibration=images)
        seconds = time.perf_counter() - began
        out = save_onnx(result, folder / "separated.onnx")
        agree, accuracy = _scores(out, test_x, test_y, reference)
        held = f"{result.search.top1_agreement:.2%} on {result.search.samples}" if result.search else "-"
        print(f"| {label} | {result.flops_after / result.flops_before:.3f} | {held} | {agree:.2%} | {accuracy:.2%} | {seconds:.0f} |",
              flush=True)
    np.save(folder / "images.npy", images.numpy())
    cli = subprocess.run([sys.executable, "-m", "convtool", "separate", str(path), "--min-agreement", "0.99", "--order", "auto",
                          "--calibration", str(folder / "images.npy"), "-o", str(folder / "cli.onnx"), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    report = json.loads(cli.stdout)
    agree, accuracy = _scores(folder / "cli.onnx", test_x, test_y, reference)
    print(f"| CLI `--min-agreement 0.99` | {report['search']['flops_fraction']:.3f} | "
          f"{report['search']['top1_agreement']:.2%} on {report['search']['held_out_samples']} | {agree:.2%} | {accuracy:.2%} | - |\n")


def resnet(folder: Path, runs: int) -> None:
    from architectures import resnet18

    torch.manual_seed(0)
    model, x = resnet18().eval(), torch.randn(1, 3, 224, 224)
    path = convtool.export_onnx(model, x, folder / "r18.onnx", dynamic_batch=False).path
    print("| LatencyTarget(0.6), ResNet-18-like at 224 as ONNX | rounds | FLOPs fraction | search's own ratio | re-timed interleaved | "
          "re-timed back to back | seconds |")
    print("|---|---|---|---|---|---|---|")
    began = time.perf_counter()
    result = convtool.separate_onnx(path, (x.numpy(),), rank=convtool.LatencyTarget(0.6))
    seconds = time.perf_counter() - began
    out = save_onnx(result, folder / "r18.separated.onnx")
    interleaved, blocks = _retimed(path, out, x, runs)
    search = result.search
    print(f"| library | {len(search.tried)} | {search.flops_fraction:.3f} | {search.ratio:.3f} | {interleaved:.3f} | {blocks:.3f} | "
          f"{seconds:.0f} |", flush=True)
    began = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "convtool", "separate", str(path), "--latency-target", "0.6", "--input-shape",
                          "1,3,224,224", "-o", str(folder / "r18.cli.onnx"), "--json"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - began
    report = json.loads(cli.stdout)["search"]
    interleaved, blocks = _retimed(path, folder / "r18.cli.onnx", x, runs)
    print(f"| CLI `--latency-target 0.6` | {len(report['tried'])} | {report['flops_fraction']:.3f} | {report['latency']['ratio']:.3f} | "
          f"{interleaved:.3f} | {blocks:.3f} | {seconds:.0f} |\n")


def _retimed(original: Path, separated: Path, x: torch.Tensor, runs: int) -> tuple[float, float]:
    sessions = [timing_session(p, "CPUExecutionProvider", 2) for p in (original, separated)]
    feeds = {sessions[0].get_inputs()[0].name: x.numpy()}
    a, b = time_sessions(sessions, feeds, runs, warmup=10)
    ratios = []
    for _ in range(3):
        (c,) = time_sessions([sessions[0]], feeds, runs, warmup=5)
        (d,) = time_sessions([sessions[1]], feeds, runs, warmup=5)
        ratios.append(d / c)
    return b / a, statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--only", choices=["digits", "resnet"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d')}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "digits"):
            digits(Path(tmp))
        if args.only in (None, "resnet"):
            resnet(Path(tmp), args.runs)


if __name__ == "__main__":
    main()
