"""The measuring form of a QDQ model (:mod:`mpsearch.graph.folding`): the weights ORT would
dequantize at every run are dequantized once, and the model computes what it computed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import images, mbconv

from mpsearch import analyze, open_dataset, parse_candidate
from mpsearch.export.qdq import quantize
from mpsearch.graph.calibrate import make_session
from mpsearch.graph.folding import DISABLED, folded, measuring_session


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    d = tmp_path_factory.mktemp("fold")
    model = mbconv(seed=2)
    np.savez(d / "c.npz", x=images(32, seed=1))
    return model, analyze(model, open_dataset(d / "c.npz", model))


def _outputs(sess, x):
    return np.concatenate([sess.run(None, {"x": x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def _db(ref, y):
    noise = np.sum((ref.astype(np.float64) - y) ** 2)
    return np.inf if noise == 0 else 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise)


@pytest.mark.parametrize("plan", ["w4a8", "w8a16", "w4a16"])
def test_unfused_weights_fold_and_compute_the_same(analysis, plan):
    model, a = analysis
    q = quantize(a, parse_candidate(plan)).model
    f = folded(q)
    assert f is not None
    dq = lambda m: sum(n.op_type == "DequantizeLinear" for n in m.graph.node)  # noqa: E731
    assert dq(f) < dq(q)  # the weights' (and biases') DequantizeLinear nodes are gone
    # the weights are what DequantizeLinear computes, bit for bit: a model of only those
    # nodes, run by ORT, against the folded initializers
    inits = {t.name: t for t in q.graph.initializer}
    names = {t.name for t in f.graph.initializer} - set(inits)
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(
            [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in names],
            "dq", [], [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                       for n in sorted(names)],
            [inits[i] for n in q.graph.node if n.op_type == "DequantizeLinear"
             and n.output[0] in names for i in n.input if i]),
        opset_imports=q.opset_import, ir_version=q.ir_version)
    got = dict(zip(sorted(names), make_session(probe).run(None, {}), strict=True))
    for t in f.graph.initializer:
        if t.name in names:
            assert np.array_equal(onnx.numpy_helper.to_array(t), got[t.name]), t.name
    x = images(32, seed=3)
    exact = _outputs(make_session(q), x)
    fast = _outputs(measuring_session(q), x)
    assert _db(exact, fast) > 35  # the float summation order alone (one step at most)
    ref = _outputs(make_session(model), x)
    assert abs(_db(ref, exact) - _db(ref, fast)) < 0.05
    f.graph.node.extend([])  # (the model given is not modified)
    assert folded(q) is not None and len(q.graph.node) > len(f.graph.node)


def test_fused_8bit_ops_and_float_weights_between_quantized_activations_stay(analysis):
    model, a = analysis
    assert folded(quantize(a, parse_candidate("w8a8")).model) is None  # ORT's integer kernels
    q = quantize(a, parse_candidate("w4a8")).model
    # a float weight read by an op whose input is quantized: ORT's WeightBiasQuantization acts
    # on it in the model as it is, so the measurement must run that model
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    w = next(t for t in q.graph.initializer if t.name == conv.input[1].replace(
        "_dequantized", "_quantized"))
    conv.input[1] = "float_weight"
    arr = onnx.numpy_helper.to_array(w).astype(np.float32)
    q.graph.initializer.append(onnx.numpy_helper.from_array(arr, "float_weight"))
    assert folded(q) is None
    assert DISABLED == ("WeightBiasQuantization",)


def test_a_float_layer_between_quantized_activations_is_quantized_by_ort_and_said(
        analysis, tmp_path):
    # ORT's WeightBiasQuantization quantizes the weights of a float Conv that reads a
    # quantized activation (its output quantized again through the fused Clip): the layer a
    # plan keeps float does not run float on the CPU EP. Seen in ORT's optimized model.
    import onnxruntime as ort

    import mpsearch
    from mpsearch.job.config import CacheConfig, CandidateConfig, MeasureConfig, SearchConfig

    model, a = analysis
    plan = {g: parse_candidate("w8a8") for g in a.graph.group_names}
    plan["expand"] = parse_candidate("fp16")  # fp16-rounded weights, computed in fp32 on CPU
    q = quantize(a, plan).model
    assert folded(q) is None  # measured as it is, ORT's pass included
    from mpsearch.graph.folding import requantized_by_ort

    assert requantized_by_ort(q) == ["expand"]
    assert requantized_by_ort(quantize(a, parse_candidate("w8a8")).model) == []

    def weight_producer(disabled):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        opt = onnx.load(str(tmp_path / "opt.onnx"))
        conv = next(n for n in opt.graph.node if n.name == "expand")
        return next((n.op_type for n in opt.graph.node if conv.input[1] in n.output), None)

    assert weight_producer([]) == "DequantizeLinear"  # ORT made it int8
    assert weight_producer(list(DISABLED)) is None  # a float initializer, as written

    np.savez(tmp_path / "c.npz", x=images(32, seed=1))
    from pathlib import Path

    profile = Path(__file__).resolve().parent.parent / "hw_profiles" / "ort_cpu.yaml"
    res = mpsearch.search(model, profile, str(tmp_path / "c.npz"), SearchConfig(
        budgets=["bops=1.5"], cache=CacheConfig(enabled=False),
        measurement=MeasureConfig(enabled=False, front_points=0),
        candidates=CandidateConfig(pin={"expand": "fp16"}, only=["w8a8", "w4a8"])))
    assert any("WeightBiasQuantization" in w and "expand" in w for w in res.warnings)
