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
