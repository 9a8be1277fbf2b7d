"""A small CNN for scikit-learn's 8x8 digits: the demo's model (weights in digits_cnn.safetensors).

Use it with convtool as ``--arch examples/digits_cnn.py:DigitsCNN``.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """Three 3x3 conv blocks with a residual connection, global pooling, a linear classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = _block(1, width)
        self.conv1 = _block(width, width)
        self.conv2 = _block(width, 2 * width)
        self.conv3 = _block(2 * width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv1(x)
        x = self.conv2(self.pool(x))
        x = x + self.conv3(x)
        return self.head(x.mean((2, 3)))


def load_digits_tensors(seed: int = 0):
    """scikit-learn's digits as (train_x, train_y, test_x, test_y), images scaled to [0, 1].

    The split is fixed by ``seed`` so every script sees the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]
