import math

import pytest
import torch
from torch import nn

import convtool
from convtool.measure.fidelity import output_fidelity


def test_identical_outputs():
    x = torch.randn(4, 10)
    f = output_fidelity(x, x.clone())
    assert (f.max_abs_error, f.relative_error, f.sqnr_db, f.top1_agreement) == (0.0, 0.0, None, 1.0)
    assert f.cosine_similarity == pytest.approx(1.0)


def test_known_error():
    ref = torch.tensor([[3.0, 4.0]])
    f = output_fidelity(ref + torch.tensor([[0.3, 0.4]]), ref)
    assert f.relative_error == pytest.approx(0.1)
    assert f.sqnr_db == pytest.approx(20.0)
    assert f.max_abs_error == pytest.approx(0.4)


def test_top1_agreement_counts_rows():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    actual = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert output_fidelity(actual, ref).top1_agreement == 0.75


def test_nested_outputs_are_compared_leaf_by_leaf():
    ref = {"logits": [torch.ones(2, 3), torch.zeros(2, 3)], "boxes": (torch.ones(2, 4),)}
    actual = {"logits": [torch.ones(2, 3), torch.zeros(2, 3) + 0.5], "boxes": (torch.ones(2, 4),)}
    f = output_fidelity(actual, ref)
    assert [o.name for o in f.outputs] == ["['logits'][0]", "['logits'][1]", "['boxes'][0]"]
    assert f.outputs[1].max_abs_error == 0.5 and math.isinf(f.outputs[1].relative_error)
    assert f.max_abs_error == 0.5 and f.top1_agreement is None


def test_structure_mismatch_is_an_error():
    with pytest.raises(ValueError, match="structure"):
        output_fidelity((torch.ones(1),), [torch.ones(1)])


def test_compare_full_rank_is_faithful_and_rank_one_is_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(10))
    x = torch.randn(8, 3, 12, 12)
    model(x)
    full = convtool.separate(model, x, rank="full").report(x)
    one = convtool.separate(model, x, rank=1).report(x)
    assert full.fidelity.sqnr_db > 100 and full.fidelity.top1_agreement == 1.0
    assert one.fidelity.relative_error > full.fidelity.relative_error
    assert one.fidelity.sqnr_db < 40
