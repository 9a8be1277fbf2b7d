"""Data-free calibration: inputs synthesised from a model's BatchNorm statistics (and its outputs)."""

import functools
import logging

import pytest
import torch
from torch import nn

import convtool
from convtool.recovery.synthesize import synthesis
from convtool.errors import InvalidOptionError
from tests.zoo import ZOO, build, randomize_batchnorm
from tests.zoo_nd import ZOO_ND


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(digits.target)


def _small_cnn(batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(0)  # the same trained model whatever ran before
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _train(model: nn.Module, x, y, epochs: int = 6) -> nn.Module:
    """A few epochs of Adam, on one thread: small tensors train several times faster so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _epochs(model, x, y, epochs)
    finally:
        torch.set_num_threads(threads)


def _epochs(model: nn.Module, x, y, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    """A small BatchNorm CNN trained on scikit-learn's digits (a few seconds), and held-out images."""
    x, y = _digits()
    model = _train(_small_cnn(), x[:1200], y[:1200])
    with torch.no_grad():
        accuracy = float((model(x[1200:]).argmax(1) == y[1200:]).float().mean())
    assert accuracy > 0.9  # a trained model, or the tests below prove nothing
    return model, x[1200:]


def _bn_distance(model: nn.Module, x: torch.Tensor) -> float:
    """Summed distance of every BatchNorm's batch statistics on ``x`` from its running statistics."""
    total = []

    def hook(module, args):
        dims = [0, *range(2, args[0].dim())]
        mean, var = args[0].mean(dims), args[0].var(dims, unbiased=False)
        total.append(float((mean - module.running_mean).norm() + (var - module.running_var).norm()))

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return sum(total)


def test_the_same_seed_gives_the_same_inputs_and_another_seed_others(digits):
    model, x = digits
    first = convtool.synthesize(model, x[:1], 24, seed=0, steps=10, batch_size=16)
    again = convtool.synthesize(model, x[:1], 24, seed=0, steps=10, batch_size=16)
    other = convtool.synthesize(model, x[:1], 24, seed=1, steps=10, batch_size=16)
    assert first.shape == (24, 1, 8, 8) and first.dtype == x.dtype
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_synthetic_batchnorm_statistics_are_far_closer_than_noise(digits):
    model, x = digits
    made = convtool.synthesize(model, x[:1], 64, steps=100)
    noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    synthetic, random = _bn_distance(model, made), _bn_distance(model, noise)
    assert synthetic < 0.2 * random, (synthetic, random)
    # Real images sit between the two: the synthetic ones are not merely a degenerate fit.
    assert _bn_distance(model, x[:64]) < random


def test_the_callers_model_is_untouched(digits):
    model, x = digits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        convtool.synthesize(model, x[:1], 8, steps=3)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_progress_is_reported_every_step(digits):
    model, x = digits
    seen = []
    made = synthesis(model, x[:1], 20, steps=4, batch_size=8, on_step=lambda done, total, loss: seen.append((done, total, loss)))
    assert [s[0] for s in seen] == list(range(1, 13)) and {s[1] for s in seen} == {12}
    assert made.objective == "batchnorm+output" and made.batchnorms == 3 and len(made.losses) == 3
    assert "20 inputs" in made.note and "3 BatchNorms" in made.note


def test_a_model_without_batchnorm_uses_its_outputs_and_says_so(caplog):
    x, y = _digits()
    model = _train(_small_cnn(batchnorm=False), x[:1200], y[:1200])  # about 70% accurate: it responds to inputs
    with caplog.at_level(logging.WARNING, logger="convtool.recovery.synthesize"):
        made = synthesis(model, torch.rand(1, 1, 8, 8), 16, steps=30)
    assert made.objective == "output" and made.batchnorms == 0
    assert "no BatchNorm" in made.note and "no BatchNorm" in caplog.text
    with torch.no_grad():
        predicted = model(made.inputs).argmax(1)
    assert len(set(predicted.tolist())) >= 5  # the classes are spread, not one repeated


@pytest.mark.parametrize("entry", [e for e in ZOO_ND if e.name == "tcn"], ids=lambda e: e.name)
def test_a_model_with_neither_batchnorm_nor_classes_is_refused(entry):
    model, inputs = build(entry)  # a 1-d signal model whose output is a signal
    with pytest.raises(InvalidOptionError, match="no BatchNorm statistics and no .* output.*real unlabeled inputs"):
        convtool.synthesize(model, inputs, 8, steps=2)
    with pytest.raises(InvalidOptionError, match="no BatchNorm statistics"):
        convtool.separate(model, inputs, rank=1, calibration="synthetic")


def test_bad_options_are_refused(digits):
    model, x = digits
    with pytest.raises(InvalidOptionError, match="positive"):
        convtool.synthesize(model, x[:1], 0)
    with pytest.raises(InvalidOptionError, match="float tensors"):
        convtool.synthesize(model, {"x": x[:1]}, 4)
    with pytest.raises(InvalidOptionError, match="'synthetic'"):
        convtool.separate(model, x[:1], rank=1, calibration="synthetc")
    with pytest.raises(InvalidOptionError, match="needs example inputs"):
        convtool.separate(model, rank=1, calibration="synthetic")


def _error(model, reference, x):
    with torch.no_grad():
        out, ref = model(x), reference(x)
    return float((out - ref).norm() / ref.norm())


def _separated_on_synthetic_data_beats_svd_alone(digits, samples):
    model, held_out = digits
    target = convtool.FlopsTarget(0.35)
    plain = convtool.separate(model, held_out[:1], rank=target, order="auto")
    synthetic = convtool.separate(model, held_out[:1], rank=target, order="auto", calibration="synthetic")
    assert plain.synthetic is None
    assert synthetic.synthetic is not None and synthetic.synthetic.objective == "batchnorm+output"
    assert synthetic.synthetic.inputs.shape == (samples, 1, 8, 8)
    assert all(layer.output_error is not None for layer in synthetic.layers)
    # Judged on real images the synthesis never saw.
    assert _error(synthetic.model, model, held_out) < 0.7 * _error(plain.model, model, held_out)
    with torch.no_grad():
        agreement = float((synthetic.model(held_out).argmax(1) == model(held_out).argmax(1)).float().mean())
    assert agreement > 0.95


def test_separating_on_synthetic_data_beats_svd_alone(digits, monkeypatch):
    from convtool.pytorch import separate as module

    # The defaults' wiring, with fewer samples and steps than they take (the slow test runs them).
    monkeypatch.setattr(module, "synthesis", functools.partial(synthesis, n=64, steps=80))
    _separated_on_synthetic_data_beats_svd_alone(digits, 64)


@pytest.mark.slow
def test_separating_on_synthetic_data_with_the_defaults(digits):
    _separated_on_synthetic_data_beats_svd_alone(digits, 256)


class _Speech(nn.Module):
    """Conv1d and BatchNorm1d over feature frames, a (batch, classes) head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(20, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Conv1d(32, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 6)

    def forward(self, x):
        return self.head(self.body(x).mean(2))


class _Stereo(nn.Module):
    """Two image inputs, each through a conv and BatchNorm, fused by a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, rgb, depth):
        return self.fuse(torch.cat([self.left(rgb), self.right(depth)], 1))


def _local(module: type, *shapes):
    def make():
        torch.manual_seed(0)
        return randomize_batchnorm(module()).eval(), tuple(torch.randn(s) for s in shapes)
    return make


CASES = {
    **{e.name: (lambda e=e: build(e)) for e in ZOO if e.name in ("resnet", "mobilenet")},
    **{e.name: (lambda e=e: build(e)) for e in ZOO_ND if e.name in ("unet3d", "dcgan")},
    "speech_1d": _local(_Speech, (2, 20, 40)),
    "stereo_two_inputs": _local(_Stereo, (2, 3, 12, 12), (2, 1, 12, 12)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_synthesis_runs_across_batchnorm_models_of_every_dimensionality(name):
    model, inputs = CASES[name]()
    made = synthesis(model, inputs, 6, steps=3, batch_size=4)
    data = made.inputs if isinstance(made.inputs, tuple) else (made.inputs,)
    assert [t.shape for t in data] == [(6, *x.shape[1:]) for x in inputs]
    assert all(bool(torch.isfinite(t).all()) and t.dtype == x.dtype for t, x in zip(data, inputs))
    assert made.batchnorms == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # Classifiers get the class term too; models whose output is a feature map or an image do not.
    assert made.objective == ("batchnorm+output" if name in ("resnet", "mobilenet", "speech_1d") else "batchnorm")
    with torch.no_grad():
        model(*(t[:2] for t in data))
