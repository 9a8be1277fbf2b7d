import os

import pytest
import torch
from hypothesis import settings

# Two cores: keep torch from oversubscribing them when pytest-xdist is not in use.
torch.set_num_threads(min(2, os.cpu_count() or 1))

settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    """The example's trained digits CNN (eval mode), its unlabeled training images and the labelled test split."""
    import sys
    from pathlib import Path

    import numpy as np
    from safetensors.torch import load_file

    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    from digits_cnn import DigitsCNN, load_digits_tensors

    model = DigitsCNN()
    model.load_state_dict(load_file(str(examples / "digits_cnn.safetensors")))
    _, _, test_x, test_y = load_digits_tensors()
    images = torch.from_numpy(np.load(examples / "digits_train_images.npy"))
    return model.eval(), images, test_x, test_y
