"""ONNX in, ONNX out: separate_onnx on exported zoo models and on hand-built graphs, checked in onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import convtool
from convtool import NothingToSeparateError

from ..zoo import ZOO, build
from ..zoo_nd import ZOO_ND

# Every zoo model torch exports (a lazy one has no weights to export).
ENTRIES = [e for e in ZOO + ZOO_ND if e.name != "lazy"]


def _run(model: onnx.ModelProto, feeds: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: f for i, f in zip(session.get_inputs(), feeds)})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    found = {}
    for entry in ENTRIES:
        model, inputs = build(entry)
        path = tmp_path_factory.mktemp("onnx") / f"{entry.name}.onnx"
        # BatchNorm left unfolded: the torch path separates the conv's own weight, not one scaled by it
        found[entry.name] = (model, inputs, convtool.export_onnx(model, inputs, path, fold_bn=False).path)
    return found


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_full_rank_is_exact_in_onnxruntime_and_the_file_is_untouched(exported, entry, order):
    model, inputs, path = exported[entry.name]
    before = path.read_bytes()
    result = convtool.separate_onnx(path, inputs, rank="full", order=order)
    assert path.read_bytes() == before
    assert result.verified and result.relative_error < 1e-5, result.verification
    names = [n.name for n in result.model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    for layer in result.layers:
        assert f"{layer.name}/pointwise" in names and any(n.startswith(f"{layer.name}/depthwise") for n in names)
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.name in ("vgg", "tcn")], ids=lambda e: e.name)
def test_rank_one_from_onnx_matches_the_torch_path(exported, entry, tmp_path):
    """Models whose exported convs are their own (torch's exporter folds a following BatchNorm into the conv)."""
    model, inputs, path = exported[entry.name]
    from_onnx = convtool.separate_onnx(path, inputs, rank=1)
    from_torch = convtool.separate(model, inputs, rank=1)
    torch_onnx = onnx.load(str(convtool.export_onnx(from_torch.model, inputs, tmp_path / "t.onnx", fold_bn=False).path))
    feeds = [x.numpy() for x in inputs]
    for a, b in zip(_run(from_onnx.model, feeds), _run(torch_onnx, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert sorted(l.weight_error for l in from_onnx.layers) == pytest.approx(sorted(l.weight_error for l in from_torch.layers), rel=1e-5)


def _conv_graph(attrs: dict, weight_shape=(6, 4, 3, 3), bias=True, group=1, x_shape=(1, 4, 9, 8), extra_nodes=(),
                extra_inits=(), weight_as_input=False, output="y"):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(weight_shape).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight_shape)))
        inits = []
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(weight_shape[0]).astype(np.float32), "b"))
        conv_inputs.append("b")
    conv_out = "c" if extra_nodes else output
    nodes = [helper.make_node("Conv", conv_inputs, [conv_out], name="conv", group=group, **attrs), *extra_nodes]
    inits += list(extra_inits)
    def model(shape):
        graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    if weight_as_input:
        return model(None)
    # the output's shape, as the checker's full check wants it declared (a symbolic batch stays symbolic)
    feeds = [rng.standard_normal([2 if isinstance(d, str) else d for d in x_shape]).astype(np.float32)]
    shape = list(_run(model(None), feeds)[0].shape)
    return model([x_shape[0] if isinstance(x_shape[0], str) else shape[0], *shape[1:]])


@pytest.mark.parametrize("attrs", [
    dict(pads=[1, 0, 1, 2], strides=[2, 1]), dict(auto_pad="SAME_UPPER", strides=[2, 2]), dict(auto_pad="SAME_LOWER"),
    dict(auto_pad="VALID", dilations=[2, 1]), dict(kernel_shape=[3, 3]),
], ids=["pads", "same-upper", "same-lower", "valid", "kernel-shape"])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_hand_built_convs_of_every_padding_mode(attrs, order):
    model = _conv_graph(attrs)
    result = convtool.separate_onnx(model, rank="full", order=order)
    assert result.verified and result.max_abs_error < 1e-4, result.verification
    assert len(model.graph.node) == 1  # the caller's proto is not modified


@pytest.mark.parametrize("bias,group,shape", [(False, 2, (6, 2, 3, 3)), (True, 2, (4, 2, 3)), (False, 1, (6, 4, 3, 3, 2))])
def test_grouped_biasless_1d_and_3d_nodes(bias, group, shape):
    x_shape = (1, 4, *([7] * (len(shape) - 2)))
    model = _conv_graph({}, weight_shape=shape, bias=bias, group=group, x_shape=x_shape)
    result = convtool.separate_onnx(model, rank="full")
    assert result.verified and result.max_abs_error < 1e-4
    (layer,) = result.layers
    assert layer.groups == group and layer.kernel_size == shape[2:]


def test_an_unfused_batchnorm_after_the_conv_is_folded_or_kept():
    rng = np.random.default_rng(1)
    stats = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
             (("s", rng.random(6) + 0.5), ("o", rng.standard_normal(6)), ("m", rng.standard_normal(6)), ("v", rng.random(6) + 0.5))]
    bn = helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["y"], name="bn")
    model = _conv_graph({"pads": [1, 1, 1, 1]}, extra_nodes=[bn], extra_inits=stats)
    kept = convtool.separate_onnx(model, rank="full", layout="multiplier", fold_bn=False)
    assert kept.verified and kept.max_abs_error < 1e-4
    assert [n.op_type for n in kept.model.graph.node] == ["Conv", "Conv", "BatchNormalization"]
    folded = convtool.separate_onnx(model, rank="full", layout="multiplier")
    assert folded.verified and folded.max_abs_error < 1e-4 and folded.folded_batchnorms == ("bn",)
    assert [n.op_type for n in folded.model.graph.node] == ["Conv", "Conv"]
    assert {"s", "o", "m", "v", "b"}.isdisjoint(i.name for i in folded.model.graph.initializer)  # nothing left unread
    assert folded.layers[0].flops_after == kept.layers[0].flops_after


def test_non_constant_weights_are_skipped_with_a_reason():
    model = _conv_graph({}, weight_as_input=True)
    with pytest.raises(NothingToSeparateError, match="computed in the graph"):
        convtool.separate_onnx(model)
    rng = np.random.default_rng(0)
    q = helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dq")
    graph = helper.make_graph(
        [q, helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.integers(-5, 5, (6, 4, 3, 3)).astype(np.int8), "wq"),
         numpy_helper.from_array(np.float32(0.1), "ws")],
    )
    with pytest.raises(NothingToSeparateError, match="DequantizeLinear"):
        convtool.separate_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_dynamic_dimensions_need_example_inputs(tmp_path):
    model = _conv_graph({}, x_shape=("batch", 4, 9, 8))
    unrun = convtool.separate_onnx(model, rank=1)
    assert not unrun.verified and "dynamic dimension" in unrun.verification
    run = convtool.separate_onnx(model, np.random.randn(2, 4, 9, 8).astype(np.float32), rank=1)
    assert run.verified


def test_external_data_models_are_read(tmp_path):
    model = _conv_graph({"pads": [1, 1, 1, 1]})
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    result = convtool.separate_onnx(path, rank="full")
    assert result.verified and result.max_abs_error < 1e-4


def test_layer_flops_agree_with_the_torch_path(exported):
    """Counted as fvcore counts a conv, from the shapes onnx infers for the given inputs."""
    model, inputs, path = exported["tcn"]
    from_onnx = convtool.separate_onnx(path, inputs, rank=2)
    from_torch = convtool.separate(model, inputs, rank=2)
    assert sorted((l.flops_before, l.flops_after) for l in from_onnx.layers) == sorted((l.flops_before, l.flops_after) for l in from_torch.layers)


def test_counts_survive_unnamed_and_colliding_nodes_and_old_ir_initializer_inputs():
    model = _conv_graph({"pads": [1, 1, 1, 1]})
    model.graph.node[0].name = ""  # unnamed: the layer takes its output's name
    result = convtool.separate_onnx(model, rank=1)
    (layer,) = result.layers
    assert layer.name == "y" and layer.flops_before and layer.flops_after
    old = _conv_graph({"pads": [1, 1, 1, 1]})
    old.ir_version = 3
    old.graph.input.extend([helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in old.graph.initializer])
    separated = convtool.separate_onnx(old, rank="full")
    assert separated.verified and separated.max_abs_error < 1e-4
    assert "w" not in {i.name for i in separated.model.graph.input}  # the replaced weight leaves the inputs too


def test_flop_targets_cost_the_graph_as_the_torch_path_does(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 5, padding=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()
    x = torch.randn(2, 3, 24, 24)
    path = convtool.export_onnx(model, x, tmp_path / "m.onnx").path
    from convtool.onnx.counts import count_onnx

    assert count_onnx(onnx.load(str(path)), [x.numpy()]).flops == convtool.analyze(model, x).flops
    for target in (0.2, 0.5):
        from_onnx = convtool.separate_onnx(path, x, rank=convtool.FlopsTarget(target), order="auto")
        from_torch = convtool.separate(model, x, rank=convtool.FlopsTarget(target), order="auto")
        assert [(l.order, l.rank) for l in from_onnx.layers] == [(l.order, l.rank) for l in from_torch.layers]
        assert from_onnx.budget_met == from_torch.budget_met
        assert (from_onnx.flops_before, from_onnx.flops_after) == (from_torch.flops_before, from_torch.flops_after)
    with pytest.raises(convtool.InvalidOptionError, match="FLOP target needs"):
        convtool.separate_onnx(path, rank=convtool.FlopsTarget(0.5))  # dynamic batch, no inputs


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_calibration_refits_in_onnxruntime_as_the_torch_path_does(tmp_path, order):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(12, 12, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(12, 8, 5, padding=2),
    ).eval()
    data = torch.randn(64, 3, 16, 16)
    path = convtool.export_onnx(model, data[:1], tmp_path / "m.onnx").path
    plain = convtool.separate_onnx(path, data[:2], rank=1, order=order)
    refit = convtool.separate_onnx(path, data[:2], rank=1, order=order, calibration=data)
    from_torch = convtool.separate(model, data[:1], rank=1, order=order, calibration=data)
    feeds = [data.numpy()]
    ref = _run(onnx.load(str(path)), feeds)[0]
    error = lambda m: float(np.linalg.norm(_run(m, feeds)[0] - ref) / np.linalg.norm(ref))  # noqa: E731
    assert error(refit.model) < 0.8 * error(plain.model)
    with torch.no_grad():
        torch_error = float((from_torch.model(data) - model(data)).norm() / model(data).norm())
    assert error(refit.model) == pytest.approx(torch_error, rel=0.05)
    assert all(layer.output_error is not None for layer in refit.layers)
    assert refit.verified


def test_the_onnx_refit_is_judged_on_held_out_samples_as_the_torch_path_is(tmp_path):
    # 8 samples at 3x3 output positions for 128 features per output: plain least squares fit them
    # exactly and generalise worse than the SVD pair (convtool 0.2's ONNX refit did).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3), torch.nn.ReLU()).eval()
    calibration, fresh = torch.randn(8, 64, 5, 5), torch.randn(64, 64, 5, 5)
    path = convtool.export_onnx(model, calibration[:1], tmp_path / "m.onnx").path
    svd = convtool.separate_onnx(path, calibration[:1], rank=2)
    refit = convtool.separate_onnx(path, calibration[:1], rank=2, calibration=calibration)
    from_torch = convtool.separate(model, calibration[:1], rank=2, calibration=calibration)
    ref = model(fresh).detach().numpy()
    error = lambda m: float(np.linalg.norm(_run(m, [fresh.numpy()])[0] - ref) / np.linalg.norm(ref))  # noqa: E731
    assert error(refit.model) <= error(svd.model) * 1.01
    with torch.no_grad():
        torch_error = float((from_torch.model(fresh) - model(fresh)).norm() / model(fresh).norm())
    assert error(refit.model) == pytest.approx(torch_error, rel=0.02)


def test_a_provider_that_cannot_run_is_reported_not_run():
    result = convtool.separate_onnx(_conv_graph({"pads": [1, 1, 1, 1]}), rank="full", providers=("cpu", "cuda"))
    runs = {r.provider: r for r in result.runs}
    assert runs["CPUExecutionProvider"].ran and runs["CPUExecutionProvider"].max_abs_error < 1e-4
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert not runs["CUDAExecutionProvider"].ran and runs["CUDAExecutionProvider"].reason
        assert "CUDAExecutionProvider" not in result.verification
    else:  # a GPU machine: it ran, and matched
        assert runs["CUDAExecutionProvider"].ran and runs["CUDAExecutionProvider"].max_abs_error < 1e-3


def test_rank_two_ships_as_branches_with_the_same_outputs_and_flops():
    model = _conv_graph({"pads": [1, 1, 1, 1]}, weight_shape=(8, 6, 3, 3), x_shape=(2, 6, 10, 10))
    branched = convtool.separate_onnx(model, rank=2)
    plain = convtool.separate_onnx(model, rank=2, layout="multiplier")
    ops = [n.op_type for n in branched.model.graph.node]
    assert ops == ["Conv", "Conv", "Concat", "Conv"] and [n.op_type for n in plain.model.graph.node] == ["Conv", "Conv"]
    feeds = [np.random.default_rng(1).standard_normal((2, 6, 10, 10)).astype(np.float32)]
    np.testing.assert_allclose(_run(branched.model, feeds)[0], _run(plain.model, feeds)[0], rtol=1e-4, atol=1e-5)
    assert branched.layers[0].flops_after == plain.layers[0].flops_after
    data = np.random.default_rng(2).standard_normal((40, 6, 10, 10)).astype(np.float32)
    refit = [convtool.separate_onnx(model, rank=2, layout=layout, calibration=data) for layout in ("branches", "multiplier")]
    assert refit[0].layers[0].output_error == pytest.approx(refit[1].layers[0].output_error, rel=1e-4)


def test_transposed_convs_from_onnx_are_counted_as_the_torch_path_counts_them(exported):
    """DCGAN's generator: every conv transposed. torch's exporter folds each BatchNorm into the
    transposed conv before it, so only the last one (no BatchNorm) has the module's own weight."""
    model, inputs, path = exported["dcgan"]
    from_onnx = convtool.separate_onnx(path, inputs, rank=2)
    from_torch = convtool.separate(model, inputs, rank=2)
    assert len(from_onnx.layers) == len(from_torch.layers) == 4 and all(l.transposed for l in from_onnx.layers)
    flops = lambda result: sorted((l.flops_before, l.flops_after) for l in result.layers)  # noqa: E731
    assert flops(from_onnx) == flops(from_torch)
    assert from_onnx.flops_after < from_onnx.flops_before and from_onnx.verified
    assert from_onnx.layers[-1].weight_error == pytest.approx(from_torch.layers[-1].weight_error, rel=1e-6)


def test_shared_biases_float16_calibration_and_old_ir_folding():
    """Found in review: a bias shared by two convs was rewritten for both; fp16 calibration and IR 3 folding failed."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((6, 4, 3, 3)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["x", "w2", "b"], ["y2"], name="c2", pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, [2, 6, 8, 8]) for v in ("y1", "y2")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = rng.standard_normal((40, 4, 8, 8)).astype(np.float32)
    one = convtool.separate_onnx(model, rank=1, exclude=["c2"], calibration=data)
    feeds = [data[:2]]
    np.testing.assert_array_equal(_run(one.model, feeds)[1], _run(model, feeds)[1])  # c2, left as it was, is unchanged
    both = convtool.separate_onnx(model, rank=1, calibration=data)
    ref = _run(model, feeds)
    for layer, out, r in zip(both.layers, _run(both.model, feeds), ref):
        actual = float(np.linalg.norm(out - r) / np.linalg.norm(r))
        assert layer.output_error == pytest.approx(actual, rel=0.3)  # on the calibration data vs two samples of it

    half = onnx.ModelProto()
    half.CopyFrom(model)
    for init in half.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in (*half.graph.input, *half.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    assert convtool.separate_onnx(half, rank=2, calibration=data).verified

    bn_stats = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
                (("s", rng.random(6) + 0.5), ("o", rng.standard_normal(6)), ("m", rng.standard_normal(6)), ("v", rng.random(6) + 0.5))]
    old = _conv_graph({"pads": [1, 1, 1, 1]}, extra_nodes=[helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["y"], name="bn")],
                      extra_inits=bn_stats)
    old.ir_version = 3
    old.opset_import[0].version = 8
    old.graph.input.extend([helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in old.graph.initializer])
    folded = convtool.separate_onnx(old, rank="full")
    assert folded.verified and folded.folded_batchnorms == ("bn",) and folded.max_abs_error < 1e-4


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_the_refit_pads_as_auto_pad_does(auto_pad, order):
    """The refit reads the last conv's input padded as the node pads it: its reported error is the true one."""
    model = _conv_graph({"auto_pad": auto_pad, "strides": [2, 2]}, x_shape=(40, 4, 9, 8))
    data = np.random.default_rng(3).standard_normal((40, 4, 9, 8)).astype(np.float32)
    result = convtool.separate_onnx(model, data, rank=1, order=order, calibration=data)
    out, ref = _run(result.model, [data])[0], _run(model, [data])[0]
    actual = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert result.layers[0].output_error == pytest.approx(actual, rel=1e-3)


@pytest.mark.parametrize("attrs", [{}, {"pads": [2, 1], "strides": [2]}, {"dilations": [2]}, {"auto_pad": "SAME_UPPER"}])
@pytest.mark.parametrize("rank", [1, 2, "full"])
@pytest.mark.parametrize("layout", ["branches", "multiplier"])
def test_a_1d_pair_runs_its_depthwise_conv_in_2d_and_stays_exact(attrs, rank, layout):
    # onnxruntime runs a 1-d depthwise conv far slower than the same filter as a 1 x k 2-d conv:
    # in the plain form no 1-d pair of the streaming VAD (benchmarks/vad.py) was faster than its dense conv.
    model = _conv_graph(attrs, weight_shape=(6, 4, 3), x_shape=(2, 4, 11))
    result = convtool.separate_onnx(model, rank=rank, layout=layout)
    assert result.verified
    kernels = [list(a.ints) for n in result.model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "kernel_shape"]
    assert [1, 3] in kernels and [3] not in kernels and [1] in kernels  # the depthwise in 2-d, the pointwise as it was
    if rank == "full":
        assert result.max_abs_error < 1e-4
    x = [np.random.default_rng(1).standard_normal((2, 4, 11)).astype(np.float32)]
    assert _run(result.model, x)[0].shape == _run(model, x)[0].shape
