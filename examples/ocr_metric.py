"""Exact strings read by the CTC text reader, as a metric for ``convtool sweep --metric``.

    convtool sweep benchmarks/ocr_net.safetensors --arch benchmarks/ocr.py:TextReader \
        --calibration examples/out/ocr/calibration.npy \
        --metric examples/ocr_metric.py:exact_strings --metric-data examples/out/ocr/test.npz -o sweep/

``examples/ocr_data.py`` writes both files: 256 unlabeled calibration lines and 500 held-out
test lines with their true strings, rendered by ``benchmarks/ocr.py`` from seeds that training
never drew. A reading is greedy CTC (each column's top class, repeats merged, blanks dropped).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ocr  # noqa: E402  the reader's alphabet and its greedy CTC decoding


def exact_strings(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The share of test lines read exactly as written (convtool calls it in eval mode, without gradients).

    ``data``: the lines (N, 1, 32, 128) and their strings as class numbers (N, 10), 0-padded.
    """
    images, labels = data
    read = [text for i in range(0, len(images), 100) for text in ocr.decode(model(images[i : i + 100]))]
    truth = ["".join(ocr.ALPHABET[c - 1] for c in row if c > 0) for row in labels.tolist()]
    return ocr.same(read, truth)
