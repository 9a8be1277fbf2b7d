"""Issue 34's trained test models in benchmarks/: the stored weights load and still do their task.

A broken, truncated or retrained-wrong weight file would make every figure of
``benchmarks/task_kept.py`` meaningless; this catches it in a few seconds, on held-out samples
the models never trained on.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ocr():
    return _module("ocr")


@pytest.fixture(scope="module")
def vad():
    return _module("vad")


def test_the_text_reader_reads_held_out_lines(ocr):
    model = ocr.load()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    images, texts = ocr.lines(64, seed=ocr.HELD_OUT_SEED)
    assert ocr.same(ocr.read(model, images), texts) >= 0.8  # 1,000 such lines: see the module's docstring


def test_the_voice_activity_detector_keeps_its_state_and_finds_speech(vad):
    model = vad.load()
    audio, labels = vad.streams(4, seed=vad.HELD_OUT_SEED, seconds=8.0)
    probs = vad.run(model, audio)  # chunk by chunk, the state carried
    assert vad.kept(probs, labels) >= 0.85
    prob, state = model(audio[:2, : vad.CHUNK], vad.zero_state(2))
    assert prob.shape == (2, 1) and state.shape == (1, 2, vad.HIDDEN)
