"""Models separated and saved whole by convtool 0.2 still load and compute the same outputs.

A pickle names each class by its module path (``convtool.core.modules.SeparableConv``, the
tracer ``convtool.core.tracing.Tracer`` of a rewritten GraphModule), so moving those breaks
every file users saved. tests/fixtures/make_v02_models.py wrote the files with 0.2.
"""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["v02_rank1", "v02_rank2_pw_dw", "v02_functional"])
def test_v02_pickles_load_and_compute_the_same(name):
    saved = torch.load(FIXTURES / f"{name}.pt", weights_only=False)
    model = saved["model"]
    assert type(model).__qualname__ == saved["type"]
    with torch.no_grad():
        torch.testing.assert_close(model(saved["input"]), saved["output"])
    assert any(type(m).__name__ == "SeparableConv" for m in model.modules())
