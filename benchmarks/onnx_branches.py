"""A trained model whose convs sit in the branches of an ONNX ``If``: does calibration recover its accuracy
as it does for the same model without the ``If``? (issue 24)

Run: .venv/bin/python benchmarks/onnx_branches.py [--ranks 1,2] [--calibration-size 256]

The demo's digits CNN (examples/digits_cnn.safetensors, trained on scikit-learn's digits) is
exported by ``torch.onnx`` twice: as it is ("flat"), and wrapped in ``torch.cond`` ("If"): an
image batch whose mean intensity is over one half is taken for an inverted scan and inverted
before the network, so the whole network sits in both branches of an ``If``. Each file is
separated by ``convtool.separate_onnx`` at each rank, with no data (SVD only) and with
calibration on unlabeled training images, batches of 32 (the If model gets each batch twice,
as it is and inverted, so that each branch is refit on the same images as the flat model). Test
accuracy is read in onnxruntime on the 450 test images, as they are and inverted (which the If
model routes to its other branch). Prints Markdown.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from digits_cnn import DigitsCNN, load_digits_tensors  # noqa: E402

import convtool  # noqa: E402
from convtool.onnx.probes import all_graphs  # noqa: E402


class InvertedScans(torch.nn.Module):
    """The network, after inverting a batch that looks like a negative (mean intensity over one half)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.cond(x.mean() > 0.5, lambda x: self.net(1 - x), lambda x: self.net(x), (x,))


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString() if not isinstance(model, (str, Path)) else str(model), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), 50):  # one branch per batch: a batch is all plain or all inverted
        logits = session.run(None, {name: x[start:start + 50].numpy()})[0]
        correct += int((logits.argmax(1) == y[start:start + 50].numpy()).sum())
    return correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--calibration-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from safetensors.torch import load_file

    net = DigitsCNN()
    net.load_state_dict(load_file(str(ROOT / "examples" / "digits_cnn.safetensors")))
    net.eval()
    train_x, _, test_x, test_y = load_digits_tensors()
    images = train_x[: args.calibration_size]
    batches = [images[i:i + 32] for i in range(0, len(images), 32)]
    mixed = [b for pair in zip(batches, batches) for b in (pair[0], 1 - pair[1])]  # every batch, plain then inverted
    tests = {"plain": test_x, "inverted": 1 - test_x}
    print(f"machine: {platform.machine()}, {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"calibration: {len(images)} unlabeled training images in batches of 32\n")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        batch = torch.export.Dim("batch", min=2)
        for label, model in (("flat", net), ("If", InvertedScans(net).eval())):
            path = Path(tmp) / f"{label}.onnx"
            torch.onnx.export(model, (test_x[:2],), str(path), dynamo=True, dynamic_shapes=({0: batch},))
            ops = [n.op_type for g in all_graphs(onnx.load(str(path)).graph) for n in g.node]
            print(f"{label}: {ops.count('Conv')} Conv, {ops.count('BatchNormalization')} BatchNormalization, {ops.count('If')} If nodes")
            files[label] = path
        print("| model | rank | test set | original | SVD only | + calibration | layers refit | separation s |")
        print("|---|---:|---|---:|---:|---:|---|---:|")
        for rank in (int(r) for r in args.ranks.split(",")):
            for label, path in files.items():
                svd = convtool.separate_onnx(path, [test_x[:32].numpy()], rank=rank)
                start = time.perf_counter()
                refit = convtool.separate_onnx(path, [test_x[:32].numpy()], rank=rank, calibration=mixed if label == "If" else batches)
                seconds = time.perf_counter() - start
                refit_count = f"{len(refit.layers) - len(refit.not_refit)} of {len(refit.layers)}"
                for test, x in tests.items():
                    if label == "flat" and test == "inverted":
                        continue  # the flat network was never meant for negatives
                    row = [accuracy(path, x, test_y), accuracy(svd.model, x, test_y), accuracy(refit.model, x, test_y)]
                    print(f"| {label} | {rank} | {test} | " + " | ".join(f"{a:.2%}" for a in row) + f" | {refit_count} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
