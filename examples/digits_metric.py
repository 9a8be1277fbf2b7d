"""Test accuracy of the digits CNN, as a metric for ``convtool sweep --metric``.

    convtool sweep examples/digits_cnn.safetensors --arch examples/digits_cnn.py:DigitsCNN \
        --calibration examples/digits_train_images.npy \
        --metric examples/digits_metric.py:accuracy --metric-data examples/digits_test.npz -o sweep/

``digits_test.npz`` holds the held-out test split of ``digits_cnn.load_digits_tensors()``
(images scaled to [0, 1], and their labels), which the model was never trained on.
"""

from __future__ import annotations

import torch


def accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The share of test images whose top class is their label (convtool calls it in eval mode, without gradients)."""
    images, labels = data
    return float((model(images).argmax(1) == labels).double().mean())
