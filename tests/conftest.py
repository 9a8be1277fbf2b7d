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


def _weights(module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if p.dim() > 1)


def stand_in_module_ms(module, shape, provider, runs=15) -> float:
    """A layer's 'milliseconds' for the suite: its conv weights times its input's pixels, plus a fixed cost per conv.

    Budgets time their layers by default (never slower); on onnxruntime those timings vary from
    run to run and machine to machine, so a plan would too. This stand-in keeps every plan of
    the suite deterministic and ranks pairs as their multiply-adds do; the tests that are about
    timing itself are marked ``real_timing``.
    """
    import math

    convs = sum(1 for m in module.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                                                                torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                                                                torch.nn.ConvTranspose3d)))
    return (_weights(module) * math.prod(shape[2:]) + 200 * convs) / 1e5


def stand_in_graph_ms(path, feeds, provider, key, runs=15) -> float:
    """The same stand-in for a small ONNX graph: its 4-d weights times its input's pixels, plus a fixed cost per node."""
    import math

    import onnx

    model = onnx.load(str(path))
    pixels = math.prod(next(iter(feeds.values())).shape[2:])
    weights = sum(math.prod(i.dims) for i in model.graph.initializer if len(i.dims) >= 3)
    return (weights * pixels + 200 * sum(1 for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose"))) / 1e5


INT8_GAIN = 4  # the stand-in's int8 speed-up of an ungrouped conv; a depthwise conv gains nothing (benchmarks/int8_forms.py)


def stand_in_int8_module_ms(module, shape, provider, *, form=None, runs=15) -> float:
    """The stand-in for a layer quantized to int8: each conv's weights times its input's pixels, divided by
    :data:`INT8_GAIN` unless it is grouped, plus the same fixed cost per conv.

    Int8 speeds up dense and pointwise convs far more than depthwise ones, so a pair whose
    depthwise half dominates is faster than its dense conv in fp32 and slower in int8, as on
    onnxruntime; the suite plans on that deterministically.
    """
    import math

    convs = [m for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    pixels = math.prod(shape[2:])
    return sum(m.weight.numel() * pixels / (INT8_GAIN if m.groups == 1 else 1) + 200 for m in convs) / 1e5


def stand_in_int8_graph_ms(path, feeds, provider, key, *, form=None, calibration=None, runs=15) -> float:
    """The int8 stand-in for a small ONNX graph: as :func:`stand_in_int8_module_ms`, from its Conv nodes."""
    import math

    import onnx

    model = onnx.load(str(path))
    pixels = math.prod(next(iter(feeds.values())).shape[2:])
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            total += math.prod(shapes.get(node.input[1], (0,))) * pixels / (INT8_GAIN if group == 1 else 1) + 200
    return total / 1e5


@pytest.fixture(autouse=True)
def deterministic_layer_timing(request, monkeypatch):
    if request.node.get_closest_marker("real_timing"):
        return
    from convtool.onnx import dense as onnx_dense
    from convtool.plan import costing
    from convtool.pytorch import dense as pytorch_dense

    monkeypatch.setattr(costing, "CLOSE_CALL", (1.0, 1.0))  # the stand-in's figures are the truth: no close call re-timed
    monkeypatch.setattr(pytorch_dense, "module_latency", stand_in_module_ms)
    monkeypatch.setattr(onnx_dense, "graph_latency", stand_in_graph_ms)
    monkeypatch.setattr(pytorch_dense, "int8_module_latency", stand_in_int8_module_ms)
    monkeypatch.setattr(onnx_dense, "int8_graph_latency", stand_in_int8_graph_ms)
