"""Ingestion and the LayerGraph: layers, MACs, groups, ties, float ops, normalisation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import attention, conv_transpose, dynamic_clip, erf_gelu, images, mbconv, runtime_pad
from onnx import helper

from mpsearch.core.errors import ModelError
from mpsearch.core.ops import OpRole
from mpsearch.graph.calibrate import make_session
from mpsearch.graph.ingest import load_model, prepare_model
from mpsearch.graph.layer_graph import build_layer_graph


def test_batchnorm_is_folded_and_outputs_unchanged():
    m = mbconv()
    pm = prepare_model(m)
    assert "BatchNormalization" not in {n.op_type for n in pm.graph.node}
    x = images(4)
    ref = make_session(m).run(None, {"x": x})[0]
    got = make_session(pm).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("opset", "domain"), [(11, "com.microsoft"), (20, "")])
def test_an_erf_gelu_becomes_one_gelu_node_computing_the_same(opset, domain):
    """PaddlePaddle's written-out GELU (tests/models.py) becomes one Gelu node (ONNX Runtime's
    contrib op below opset 20, ONNX's from 20): no Erf left for the HTP to refuse, the same
    outputs, and the checker passes; the Gelu is an element-wise op between the two layers."""
    m = erf_gelu(opset=opset)
    pm = prepare_model(m)
    ops = [(n.op_type, n.domain) for n in pm.graph.node]
    assert ops == [("Gemm", ""), ("Gelu", domain), ("Gemm", "")]
    onnx.checker.check_model(pm, full_check=True)
    x = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32) * 3
    ref = make_session(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(make_session(pm).run(None, {"x": x})[0], ref, rtol=1e-5,
                               atol=1e-6)
    lg = build_layer_graph(m)
    assert set(lg.layers) == {"fc0", "fc1"} and not lg.float_ops


def test_a_clip_with_a_run_time_limit_becomes_max_computing_the_same():
    """A top-dB floor ``Clip(y, ReduceMax(y) - 8)`` (tests/models.py): QNN refuses dynamic
    Clip limits, so ingestion writes it ``Max(y, lo)``, with the same outputs; a Clip with
    constant limits stays."""
    m = dynamic_clip()
    pm = prepare_model(m)
    ops = [n.op_type for n in pm.graph.node]
    assert ops == ["Gemm", "ReduceMax", "Sub", "Max", "Gemm"]
    onnx.checker.check_model(pm, full_check=True)
    x = np.random.default_rng(3).standard_normal((4, 1, 16)).astype(np.float32)
    for xi in x:
        ref = make_session(m).run(None, {"x": xi})[0]
        np.testing.assert_array_equal(make_session(pm).run(None, {"x": xi})[0], ref)
    assert [n.op_type for n in prepare_model(mbconv()).graph.node].count("Clip") == \
        [n.op_type for n in mbconv().graph.node].count("Clip")


def test_layers_macs_and_params_match_hand_counts():
    lg = build_layer_graph(mbconv(), input_shapes={"x": (1, 3, 16, 16)})
    assert list(lg.layers) == ["stem", "expand", "depthwise", "project", "grouped", "fc"]
    L = lg.layers
    # stem: 8 out ch, 8x8 output, 3 in ch, 3x3 kernel
    assert L["stem"].macs == 8 * 8 * 8 * 3 * 9
    assert L["expand"].macs == 16 * 8 * 8 * 8
    assert L["depthwise"].macs == 16 * 8 * 8 * 9 and L["depthwise"].depthwise
    assert L["grouped"].macs == 8 * 8 * 8 * 4 * 9 and not L["grouped"].depthwise
    assert L["grouped"].conv_groups == 2
    assert L["fc"].macs == 10 * 16 and L["fc"].channel_axis == 0
    assert L["stem"].params == 8 * 27 + 8  # BN folded: the stem gained a bias
    assert lg.total_macs == sum(layer.macs for layer in L.values())
    assert [g.name for g in lg.groups] == list(L)


def test_residual_add_and_concat_tie_their_source_groups():
    lg = build_layer_graph(mbconv())
    ties = {t.node: set(t.groups) for t in lg.ties}
    assert ties["residual"] == {"project", "stem"}
    # concat meets the grouped conv and the residual (itself from project and stem)
    assert ties["concat"] == {"grouped", "project", "stem"}
    assert lg.tie_classes() == (frozenset({"grouped", "project", "stem"}),)


def test_attention_layers_constant_weights_and_unknown_op():
    lg = build_layer_graph(attention(), input_shapes={"x": (1, 6, 8)})
    roles = {n: layer.role for n, layer in lg.layers.items()}
    assert roles == {"q_proj": OpRole.LAYER, "k_proj": OpRole.LAYER, "v_proj": OpRole.LAYER,
                     "qk": OpRole.ACT_MATMUL, "pv": OpRole.ACT_MATMUL}
    assert lg.layers["v_proj"].weight == "wv"  # the Constant node became an initializer
    assert lg.layers["q_proj"].channel_axis == 1
    assert lg.layers["qk"].macs == 6 * 6 * 8  # [6,8] x [8,6]
    assert [(f.node, f.op_type) for f in lg.float_ops] == [("cumsum", "CumSum")]
    assert "registry" in lg.float_ops[0].reason
    assert not [g for g in lg.groups if g.name in ("qk", "pv") and g.has_weight]


def test_convtranspose_macs_and_channel_axis():
    lg = build_layer_graph(conv_transpose())
    layer = lg.layers["deconv"]
    assert layer.channel_axis == 1 and layer.out_channels == 6
    assert layer.macs == 4 * 5 * 5 * 6 * 9


def test_dynamic_dims_take_shapes_from_the_caller():
    lg1 = build_layer_graph(attention(), input_shapes={"x": (1, 4, 8)})
    lg2 = build_layer_graph(attention(), input_shapes={"x": (1, 8, 8)})
    assert lg2.layers["q_proj"].macs == 2 * lg1.layers["q_proj"].macs
    assert lg2.layers["qk"].macs == 4 * lg1.layers["qk"].macs
    # the graph itself keeps its dynamic dims
    dims = lg1.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and dims[1].dim_param == "T"


def test_input_model_is_not_modified():
    m = mbconv()
    before = m.SerializeToString()
    build_layer_graph(m)
    assert m.SerializeToString() == before


def test_external_data_model_loads(tmp_path):
    m = mbconv()
    path = tmp_path / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    loaded = load_model(path)
    lg = build_layer_graph(loaded)
    assert len(lg.layers) == 6


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"this is not a protobuf at all \xff\xfe" * 10, "not a readable ONNX model"),
])
def test_unreadable_files_raise_model_error(tmp_path, content, needle):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelError, match=needle):
        load_model(p)


def test_truncated_file_raises_model_error(tmp_path):
    data = mbconv().SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as e:
        load_model(p)
    assert "\n" not in str(e.value)


def test_checker_failure_names_the_problem(tmp_path):
    m = mbconv()
    m.graph.node[0].input[1] = "no_such_weight"
    p = tmp_path / "broken.onnx"
    onnx.save(m, str(p))
    with pytest.raises(ModelError, match="checker"):
        load_model(p)


def test_contrib_op_stays_float_and_the_layers_after_it_are_found():
    m = mbconv()
    node = helper.make_node("FastGelu", ["e_act"], ["e_gelu"], name="gelu", domain="com.microsoft")
    m.graph.node.insert(5, node)
    for n in m.graph.node:
        if n.name == "depthwise":
            n.input[0] = "e_gelu"
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    lg = build_layer_graph(m)
    assert [(f.node, f.op_type) for f in lg.float_ops] == [("gelu", "FastGelu")]
    assert "com.microsoft" in lg.float_ops[0].reason
    assert list(lg.layers) == ["stem", "expand", "depthwise", "project", "grouped", "fc"]


def test_macs_shape_inference_cannot_tell_come_from_the_calibration_pass(tmp_path):
    """Run-time same-padding: shape inference leaves the Conv's output (and so its MACs, and the
    Gemm's after it) unknown; the calibration pass sees the real shapes and the MACs are the
    hand counts: 16x16 outputs x 8 channels x 3x3x3 and 8 x 4."""
    from mpsearch import analyze, open_dataset

    model = runtime_pad()
    lg = build_layer_graph(model)
    assert lg.layers["conv"].macs is None and lg.layers["fc"].macs is None
    np.savez(tmp_path / "c.npz", x=images(8, seed=1))
    a = analyze(model, open_dataset(tmp_path / "c.npz", model))
    assert a.graph.layers["conv"].macs == 16 * 16 * 8 * 27
    assert a.graph.layers["fc"].macs == 8 * 4
    assert a.graph.activations["xp"].shape == (1, 3, 18, 18)
    assert a.graph.activations["c"].shape == (1, 8, 16, 16)


def test_a_relative_budget_on_a_quantity_that_is_zero_says_so():
    from mpsearch.core.errors import UsageError
    from mpsearch.solve.budget import parse_budget

    with pytest.raises(UsageError, match=r"budget bops=0.9 is relative to the all-w8a8 plan's "
                                         r"bops, which is 0 on this model"):
        parse_budget("bops=0.9").limit({"bops": 0.0})


def _refused(nodes, inits, tmp_path) -> str:
    """The one-line refusal of a graph x [N, 4] -> y [N, 3] made of ``nodes``."""
    from onnx import TensorProto, numpy_helper

    from mpsearch import analyze, open_dataset

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "c.npz", x=np.ones((2, 4), np.float32))
    with pytest.raises(ModelError) as e:
        analyze(model, open_dataset(tmp_path / "c.npz", model))
    return str(e.value)


def test_an_already_quantized_model_is_refused_saying_so(tmp_path):
    """ddddocr ships ConvInteger/DynamicQuantizeLinear models: nothing float to plan."""
    from onnx import TensorProto

    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "s", "z"]),
             helper.make_node("MatMulInteger", ["xq", "w", "z", "wz"], ["yi"]),
             helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT)]
    text = _refused(nodes, {"w": np.ones((4, 3), np.uint8), "wz": np.array(0, np.uint8)},
                    tmp_path)
    assert text.startswith("the model is already quantized (1 DynamicQuantizeLinear, "
                           "1 MatMulInteger)") and "FP32 model" in text


def test_layers_only_inside_an_if_are_refused_saying_where(tmp_path):
    """Silero VAD's layers all sit in the branches of an If on the sample rate."""
    from onnx import TensorProto

    body = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["b_out"])], "body", [],
                             [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body,
                              name="sr_switch")]
    text = _refused(nodes, {"w": np.ones((4, 3), np.float32), "zero": np.array(0, np.float32)},
                    tmp_path)
    assert "inside the bodies of sr_switch (If/Loop)" in text
