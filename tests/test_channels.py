"""Channel-pruning export (mpsearch.export.channels): the smaller model gives the masked
original's outputs, weights and MACs shrink as the route says, refused routes say why."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import images, mbconv, toy_profile
from onnx import TensorProto, helper, numpy_helper

from mpsearch.core.errors import UsageError
from mpsearch.export.channels import mask_channels, shrink_channels
from mpsearch.graph.flow import ChannelRefusal, ChannelRoute, channel_route
from mpsearch.graph.layer_graph import build_layer_graph

KEEP8 = [0, 2, 3, 5, 7, 8, 11, 15]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _model(nodes, x_shape, y_shape, inits) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    tensors = [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n)
               if isinstance(s, tuple) else numpy_helper.from_array(s, n)
               for n, s in inits.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def conv_head() -> onnx.ModelProto:
    """Conv -> Add per-channel constant -> Relu -> Mul per-channel scale -> conv (swish) ->
    GlobalAveragePool -> Reshape [0, -1] -> Gemm: the channels pass through every kind of op."""
    n = helper.make_node
    return _model([
        n("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        n("Add", ["a", "shift"], ["a1"], name="shift_add"),
        n("Relu", ["a1"], ["a2"], name="relu"),
        n("Mul", ["a2", "scale"], ["a3"], name="scale_mul"),
        n("Conv", ["a3", "w2", "b2"], ["b"], name="c2"),
        n("Sigmoid", ["b"], ["bs"], name="sig"),
        n("Mul", ["b", "bs"], ["bw"], name="swish"),
        n("GlobalAveragePool", ["bw"], ["p"], name="gap"),
        n("Reshape", ["p", "shape"], ["f"], name="flat"),
        n("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ], [2, 3, 8, 8], [2, 5], {
        "w1": (12, 3, 3, 3), "shift": (1, 12, 1, 1), "scale": (12, 1, 1),
        "w2": (10, 12, 1, 1), "b2": (10,), "fc_w": (5, 10), "fc_b": (5,),
        "shape": np.array([0, -1], np.int64)})


def mlp() -> onnx.ModelProto:
    """MatMul + bias Add -> Tanh -> MatMul on [N, T, D] tokens."""
    n = helper.make_node
    return _model([
        n("MatMul", ["x", "w1"], ["h"], name="up"),
        n("Add", ["h", "b1"], ["h1"], name="up_bias"),
        n("Tanh", ["h1"], ["h2"], name="act"),
        n("MatMul", ["h2", "w2"], ["y"], name="down"),
    ], [2, 4, 6], [2, 4, 6], {"w1": (6, 16), "b1": (16,), "w2": (16, 6)})


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name.split(".ch.")[0]: tuple(t.dims) for t in model.graph.initializer}


def test_mbconv_expand_shrinks_with_its_depthwise_and_matches_the_masked_original() -> None:
    lg = build_layer_graph(mbconv())
    route = channel_route(lg, "expand")
    assert isinstance(route, ChannelRoute)
    assert route.depthwise == ("depthwise",) and route.consumers == ("project",)
    shrunk = shrink_channels(lg, {"expand": KEEP8})
    x = images(4)
    ref = _run(mask_channels(lg, {"expand": KEEP8}), x)
    np.testing.assert_allclose(_run(shrunk.model, x), ref, atol=1e-5)
    assert np.abs(_run(lg.model, x) - ref).max() > 1e-2  # the masking did something
    shapes = _shapes(shrunk.model)
    assert shapes["exp_w"] == (8, 8, 1, 1) and shapes["exp_b"] == (8,)
    assert shapes["dw_w"] == (8, 1, 3, 3) and shapes["dw_b"] == (8,)
    assert shapes["proj_w"] == (8, 8, 1, 1) and shapes["proj_b"] == (8,)
    assert len(shrunk.model.graph.node) == len(lg.model.graph.node)
    dw = next(n for n in shrunk.model.graph.node if n.name == "depthwise")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 8
    small = build_layer_graph(shrunk.model)
    for name in ("expand", "depthwise", "project"):  # consumer's MACs shrink too
        assert small.layers[name].macs * 2 == lg.layers[name].macs
    assert small.layers["stem"].macs == lg.layers["stem"].macs


def test_per_channel_constants_swish_and_pooling_into_gemm() -> None:
    lg = build_layer_graph(conv_head())
    keep = {"c1": [1, 4, 5, 9, 10], "c2": [0, 3, 6, 7]}
    shrunk = shrink_channels(lg, keep)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(shrunk.model, x), _run(mask_channels(lg, keep), x),
                               atol=1e-5)
    shapes = _shapes(shrunk.model)
    assert shapes["w1"] == (5, 3, 3, 3) and shapes["shift"] == (1, 5, 1, 1)
    assert shapes["scale"] == (5, 1, 1) and shapes["w2"] == (4, 5, 1, 1)
    assert shapes["b2"] == (4,) and shapes["fc_w"] == (5, 4)


def test_matmul_chain_with_bias_add() -> None:
    lg = build_layer_graph(mlp())
    keep = {"up": list(range(0, 16, 2))}
    shrunk = shrink_channels(lg, keep)
    x = np.random.default_rng(2).standard_normal((2, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(shrunk.model, x), _run(mask_channels(lg, keep), x),
                               atol=1e-5)
    shapes = _shapes(shrunk.model)
    assert shapes["w1"] == (6, 8) and shapes["b1"] == (8,) and shapes["w2"] == (8, 6)


@pytest.mark.parametrize(("act", "layer", "words"), [
    ("Clip", "stem", "tie"), ("Clip", "project", "tie"), ("Clip", "grouped", "group=2"),
    ("Clip", "fc", "graph output"), ("Clip", "depthwise", "never alone"),
    ("Sigmoid", "expand", "not zero"),
])
def test_refusals_say_why(act: str, layer: str, words: str) -> None:
    lg = build_layer_graph(mbconv(act=act))
    refusal = channel_route(lg, layer)
    assert isinstance(refusal, ChannelRefusal) and words in refusal.reason
    with pytest.raises(UsageError, match=words):
        shrink_channels(lg, {layer: [0, 1]})


def test_bad_channel_sets_are_usage_errors() -> None:
    lg = build_layer_graph(mbconv())
    with pytest.raises(UsageError, match="non-empty"):
        shrink_channels(lg, {"expand": []})
    with pytest.raises(UsageError, match="non-empty"):
        shrink_channels(lg, {"expand": [16]})
    with pytest.raises(UsageError, match="not a layer"):
        shrink_channels(lg, {"nope": [0]})


TOY = toy_profile("toy_channels", pairs="w8a8+channel@0.5", bytes_per_s=1e8, per_layer_s=1e-6,
                  patterns="    channel: {speedup: 1.0, metadata_bits: 0}")


def test_channel_cost_is_the_cost_of_the_smaller_model() -> None:
    """Pruning half of expand's channels costs, in every metric, what the physically smaller
    model costs dense: the layer, its depthwise follower and the consumer's input all shrink."""
    from mpsearch.core.formats import parse_candidate
    from mpsearch.hw.cost import CostModel
    from mpsearch.hw.profile import parse_profile

    prof = parse_profile(TOY)
    w8a8, pruned = parse_candidate("w8a8"), parse_candidate("w8a8+channel@0.5")
    lg = build_layer_graph(mbconv())
    small = build_layer_graph(shrink_channels(lg, {"expand": KEEP8}).model)
    got = CostModel(lg, prof).plan({g: pruned if g == "expand" else w8a8 for g in lg.layers},
                                   relative=False)
    want = CostModel(small, prof).plan(dict.fromkeys(small.layers, w8a8), relative=False)
    for m, v in want.as_dict().items():
        assert got.as_dict()[m] == pytest.approx(v, rel=1e-9), m
    dense = CostModel(lg, prof).plan(dict.fromkeys(lg.layers, w8a8), relative=False)
    assert got.latency_s < dense.latency_s and got.bops < dense.bops
    with pytest.raises(UsageError, match="tie"):
        CostModel(lg, prof).layer("stem", pruned)
