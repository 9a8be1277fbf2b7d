"""Train examples/digits_cnn.py on scikit-learn's digits; save digits_cnn.safetensors and the unlabeled training images.

Run: .venv/bin/python examples/train_digits.py   (about half a minute on two cores)
Deterministic for a seed: the checked-in weights came from the default seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from digits_cnn import DigitsCNN, load_digits_tensors  # noqa: E402


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(epochs: int = 40, seed: int = 0, log=print) -> DigitsCNN:
    """A DigitsCNN trained on the digits training split; deterministic for a seed on the CPU."""
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits_tensors()
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(train_y) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            # Shift augmentation: digits move by a pixel, labels do not.
            x = torch.roll(train_x[batch], shifts=tuple(torch.randint(-1, 2, (2,), generator=generator).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(x), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {accuracy(model, test_x, test_y):.2%}")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "digits_cnn.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = train(args.epochs, args.seed)
    _, _, test_x, test_y = load_digits_tensors()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    # The training images without their labels: the demo's calibration and distillation data.
    train_x, _, _, _ = load_digits_tensors()
    np.save(HERE / "digits_train_images.npy", train_x.numpy())
    print(f"saved {args.out} (test accuracy {accuracy(model, test_x, test_y):.2%})")


if __name__ == "__main__":
    main()
