"""Write the text reader's sweep data: 256 unlabeled calibration lines and 500 labelled test lines.

Run: .venv/bin/python examples/ocr_data.py [OUT_DIR]   (``make sweep`` runs it; default examples/out/ocr)

The lines are rendered by ``benchmarks/ocr.py`` (PIL, matplotlib's fonts) from its calibration and
held-out seeds, which no training step drew; rendering them here rather than storing them keeps
8 MB of pixels out of every clone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ocr  # noqa: E402

CALIBRATION, TEST, LONGEST = 256, 500, 10


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    calibration, _ = ocr.lines(CALIBRATION, seed=ocr.CALIBRATION_SEED)  # the strings are thrown away
    np.save(out / "calibration.npy", calibration.numpy())
    images, texts = ocr.lines(TEST, seed=ocr.HELD_OUT_SEED)
    labels = np.zeros((TEST, LONGEST), np.int64)
    for row, text in zip(labels, texts):
        row[: len(text)] = [ocr.ALPHABET.index(c) + 1 for c in text]
    np.savez(out / "test.npz", images=images.numpy(), labels=labels)
    print(f"wrote {out / 'calibration.npy'} ({CALIBRATION} lines) and {out / 'test.npz'} ({TEST} lines with their strings)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "out" / "ocr")
