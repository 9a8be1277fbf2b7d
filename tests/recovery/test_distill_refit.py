"""``distill`` starts from a refit (issue 23, item 3): an SVD-only separation distils as well as a calibrated one."""

import pytest
import torch
from torch import nn

import convtool


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_an_unfitted_separation_distils_as_well_as_a_calibrated_one(digits):
    model, images, test_x, test_y = digits
    steps = dict(steps=150, seed=0)
    bare = convtool.separate(model, images[:1], rank=1).model
    calibrated = convtool.separate(model, images[:1], rank=1, calibration=images).model
    from_bare = convtool.distill(bare, model, images, **steps)
    pipeline = convtool.distill(calibrated, model, images, refit=False, **steps)
    unfitted = convtool.distill(bare, model, images, refit=False, **steps)
    one_image = 1 / len(test_y)
    assert accuracy(from_bare.model, test_x, test_y) >= accuracy(pipeline.model, test_x, test_y) - 2 * one_image
    # what the refit is for: without it the same steps recover far less
    assert accuracy(unfitted.model, test_x, test_y) < accuracy(from_bare.model, test_x, test_y) - 0.02
    assert [name for name, _ in from_bare.refit] == ["conv1.0", "conv2.0", "conv3.0"]
    assert all(error is not None and error < 1 for _, error in from_bare.refit) and unfitted.refit == ()


def test_the_refit_reads_only_the_first_samples_and_leaves_the_student_alone(digits):
    model, images, _, _ = digits
    bare = convtool.separate(model, images[:1], rank=1).model
    snapshot = {k: v.clone() for k, v in bare.state_dict().items()}
    from convtool.recovery import distill as module

    first = convtool.distill(bare, model, images[: module.REFIT_SAMPLES], steps=1, lr=1e-12)
    whole = convtool.distill(bare, model, images, steps=1, lr=1e-12)
    for key, value in first.model.state_dict().items():  # the refit saw the same samples in both
        torch.testing.assert_close(value, whole.model.state_dict()[key])
    assert all(torch.equal(v, bare.state_dict()[k]) for k, v in snapshot.items())
    # bias correction: the no-bias layers gained a bias the refit fitted
    assert "conv1.0.pointwise.bias" in first.model.state_dict() and "conv1.0.pointwise.bias" not in snapshot


def test_layers_without_a_dense_twin_are_distilled_as_they_are():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(16, 3, 8, 8)
    student = convtool.separate(teacher, x[:1], rank=1).model
    renamed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()  # "2" has another shape
    result = convtool.distill(student, renamed, x, steps=1, batch_size=8)
    assert [name for name, _ in result.refit] == ["0"]
