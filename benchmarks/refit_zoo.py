"""Output SQNR of every zoo model at FLOP target 0.5, calibrated with refit="last" and refit="both", with and without sensitivity (issue 15).

Run: .venv/bin/python benchmarks/refit_zoo.py

The zoo's models (tests/zoo.py, tests/zoo_nd.py; random weights with trained-looking BatchNorm),
calibrated on 16 noisy copies of their example inputs (noise 0.1), judged on 4 other noisy
copies: the SQNR (dB) of the separated model's outputs against the original's, from
``convtool.compare``. "sensitivity" columns allocate the budget by each layer's measured effect
on the model's output (``FlopsTarget(0.5, sensitivity=True)``). Prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.zoo import ZOO, build  # noqa: E402
from tests.zoo_nd import ZOO_ND  # noqa: E402

import convtool  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    print("| model | refit last dB | refit both dB | sensitivity, last dB | sensitivity, both dB | best gain dB |")
    print("|---|---:|---:|---:|---:|---:|")
    for entry in ZOO + ZOO_ND:
        if entry.name == "lazy":  # no trained weights to keep
            continue
        model, inputs = build(entry)
        noisy = lambda copies: tuple(torch.cat([x + 0.1 * torch.randn_like(x) for _ in range(copies)]) for x in inputs)  # noqa: E731
        cal, test = noisy(16), noisy(4)
        sqnr = []
        for sensitivity in (False, True):
            for refit in ("last", "both"):
                result = convtool.separate(model, inputs, rank=convtool.FlopsTarget(0.5, sensitivity=sensitivity),
                                           calibration=cal if len(cal) > 1 else cal[0], refit=refit)
                sqnr.append(convtool.compare(model, result.model, test).fidelity.sqnr_db)
        cells = " | ".join(f"{v:.2f}" for v in sqnr)
        print(f"| {entry.name} | {cells} | {max(sqnr[1:]) - sqnr[0]:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
