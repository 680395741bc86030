"""Layer weight quantization: output-aware clipping, bias correction and Hessian rounding,
measured on the layer's output with inputs whose statistics the moments describe."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import images, mbconv
from onnx import helper, numpy_helper

from mpsearch import analyze, open_dataset, parse_candidate
from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Format, dequantize, quantize
from mpsearch.core.ops import OpRole
from mpsearch.export.qdq import quantize as quantize_plan
from mpsearch.graph.calibrate import ChannelMoments, make_session
from mpsearch.graph.layer_graph import Layer
from mpsearch.graph.layer_hessian import LayerHessian
from mpsearch.graph.ranges import RangeMethod
from mpsearch.quant.analysis import QuantizeOptions
from mpsearch.quant.layer import (
    INT32_BIAS_LIMIT,
    LayerInputs,
    Rounding,
    WeightSettings,
    quantize_layer,
)
from mpsearch.quant.layout import input_channel_view
from mpsearch.quant.parameters import RangeSetter


def _gemm(n_out: int, k: int) -> Layer:
    return Layer(name="fc", op_type="Gemm", role=OpRole.LAYER, inputs=("x",), output="y",
                 weight="w", bias="b", weight_shape=(n_out, k), channel_axis=0)


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    k, n = 64, 32
    # inputs with very different energies and non-zero means per channel
    x = (rng.standard_normal((4000, k)) * rng.uniform(0.05, 3, k) + rng.uniform(-1, 2, k))
    w = rng.standard_t(df=4, size=(n, k)).astype(np.float32) * 0.1
    b = rng.standard_normal(n).astype(np.float32) * 0.1
    mom = ChannelMoments(mean=x.mean(0), mean_sq=(x**2).mean(0))
    return x.astype(np.float32), w, b, mom


def _out_err(x, w, b, lw) -> tuple[float, float]:
    scale = lw.qparams.scale.reshape(-1, 1).astype(np.float64)
    wq = lw.values.astype(np.float64) * scale
    ref = x @ w.T + b
    got = x @ wq.T + lw.bias
    err = got - ref
    return float((err**2).mean()), float(np.abs(err.mean(axis=0)).max())


@pytest.mark.parametrize("fmt", [Format.INT4, Format.INT8])
def test_output_aware_clipping_and_bias_correction_reduce_output_error(fmt):
    x, w, b, mom = _data()
    layer = _gemm(*w.shape)
    mse = WeightSettings(method=RangeMethod.MSE)
    plain = quantize_layer(LayerInputs(layer=layer, weight=w, bias=b), fmt, settings=mse)
    aware = quantize_layer(LayerInputs(layer=layer, weight=w, bias=b, moments=mom), fmt,
                           settings=WeightSettings(method=RangeMethod.MSE, bias_correction=False))
    both = quantize_layer(LayerInputs(layer=layer, weight=w, bias=b, moments=mom), fmt,
                          settings=mse)
    e_plain, m_plain = _out_err(x, w, b, plain)
    e_aware, _ = _out_err(x, w, b, aware)
    e_both, m_both = _out_err(x, w, b, both)
    assert e_aware < e_plain
    assert e_both < e_aware
    assert m_both < 0.05 * m_plain  # the mean shift is gone (up to float error)


def test_conv_input_channel_view_handles_groups():
    layer = Layer(name="c", op_type="Conv", role=OpRole.LAYER, inputs=("x",), output="y",
                  weight="w", weight_shape=(8, 2, 3, 3), channel_axis=0, conv_groups=4)
    v = input_channel_view(layer, (8, 2, 3, 3), np.arange(8.0))
    # output channel 5 is in group 2 (channels 4..5 out, inputs 4..5)
    assert v[5, :, 0, 0].tolist() == [4.0, 5.0] and v[0, :, 1, 1].tolist() == [0.0, 1.0]
    dw = Layer(name="d", op_type="Conv", role=OpRole.LAYER, inputs=("x",), output="y",
               weight="w", weight_shape=(8, 1, 3, 3), channel_axis=0, conv_groups=8)
    assert input_channel_view(dw, (8, 1, 3, 3), np.arange(8.0))[6, 0, 2, 2] == 6.0


def test_corrected_bias_still_fits_int32():
    x, w, b, mom = _data(1)
    w[3] = 0.0
    b[3] = 5.0
    lw = quantize_layer(LayerInputs(layer=_gemm(*w.shape), weight=w, bias=b, moments=mom),
                        Format.INT16, input_scale=1e-6)
    s_b = 1e-6 * lw.qparams.scale.astype(np.float64)
    assert np.abs(lw.bias / s_b).max() < INT32_BIAS_LIMIT


@pytest.mark.parametrize("rounding", list(Rounding))
def test_rescale_after_correction_rerounds_with_the_same_method(rounding):
    """A channel whose bias only overflows int32 once corrected gets a larger scale after the
    correction; it is rounded again the same way and the correction recomputed."""
    x, w, b, mom = _data(1)
    xd = x.astype(np.float64)
    h = LayerHessian(second=(xd.T @ xd / len(xd))[None], mean=xd.mean(0)[None], positions=1.0,
                     rows_seen=len(xd), dense=True)
    layer = _gemm(*w.shape)
    w[3] *= 1e-3  # a nearly dead channel: a tiny weight scale
    def inputs() -> LayerInputs:  # b changes below
        return LayerInputs(layer=layer, weight=w, bias=b, moments=mom, hessian=h)

    kw = dict(settings=WeightSettings(method=RangeMethod.MSE, rounding=rounding))
    free = quantize_layer(inputs(), Format.INT8, **kw)
    s3, delta3 = float(free.qparams.scale[3]), float(b[3] - free.bias[3])
    s_x = 1e-6
    # just inside the int32 limit before the correction, outside after it
    b[3] = -np.sign(delta3) * s3 * s_x * INT32_BIAS_LIMIT / 1.01 * (1 - 1e-4)
    lw = quantize_layer(inputs(), Format.INT8, input_scale=s_x, **kw)
    s = lw.qparams.scale.astype(np.float64)
    assert s[3] > s3 and np.array_equal(np.delete(s, 3), np.delete(free.qparams.scale, 3))
    assert np.abs(lw.bias / (s_x * s)).max() < INT32_BIAS_LIMIT
    dw = lw.values.astype(np.float64) * s[:, None] - w
    np.testing.assert_allclose(lw.bias, b - dw @ mom.mean, rtol=1e-5, atol=1e-7)
    # the raised channel is rounded to nearest on its new scale, the others keep theirs
    nearest = quantize(w, Format.INT8, lw.qparams.scale, lw.qparams.zero_point, axis=0)
    np.testing.assert_array_equal(lw.values[3], nearest[3])
    np.testing.assert_array_equal(np.delete(lw.values, 3, 0), np.delete(free.values, 3, 0))
    # the same result from the one without the int32 limit (what RangeSetter passes)
    again = quantize_layer(inputs(), Format.INT8, input_scale=s_x, base=free, **kw)
    np.testing.assert_array_equal(again.values, lw.values)
    np.testing.assert_array_equal(again.bias, lw.bias)
    if rounding is Rounding.HESSIAN:
        np.testing.assert_array_equal(np.delete(lw.values, 3, 0),
                                      np.delete(free.values, 3, 0))
        assert _out_err(x, w, b, lw)[0] < _out_err(
            x, w, b, quantize_layer(LayerInputs(layer=layer, weight=w, bias=b, moments=mom),
                                    Format.INT8, input_scale=s_x))[0]


# -- Hessian rounding on a real model, measured by running each layer in ONNX Runtime


@pytest.fixture(scope="module")
def mb(tmp_path_factory):
    """mbconv analysed with Hessian rounding, the nearest RangeSetter over the same
    calibration, and every layer's calibration input."""
    model, x = mbconv(), images(64, seed=1)
    path = tmp_path_factory.mktemp("mb") / "calib.npz"
    np.savez(path, x=x)
    a = analyze(model, open_dataset(path, model, batch_size=16),
                options=QuantizeOptions(rounding=Rounding.HESSIAN))
    nearest = a.with_rounding(Rounding.NEAREST).ranges
    assert nearest.rounding is Rounding.NEAREST and nearest.stats is a.ranges.stats
    g = a.graph.model.graph
    exposed = onnx.ModelProto()
    exposed.CopyFrom(a.graph.model)
    wanted = {layer.inputs[0] for layer in a.graph.layers.values()} - {i.name for i in g.input}
    exposed.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                for t in sorted(wanted))
    sess = make_session(exposed)
    names = [o.name for o in sess.get_outputs()]
    inputs = dict(zip(names, sess.run(None, {"x": x}), strict=True)) | {"x": x}
    return a, nearest, inputs


def _layer_output(a, name: str, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """The layer's node alone, run on ``x`` with weight ``w`` and bias ``b``."""
    layer, node = a.graph.layers[name], a.graph.nodes[name]
    inits = [numpy_helper.from_array(w, layer.weight)]
    if b is not None:
        inits.append(numpy_helper.from_array(b, layer.bias))
    g = helper.make_graph([node], "layer",
                          [helper.make_tensor_value_info(layer.inputs[0], onnx.TensorProto.FLOAT,
                                                         list(x.shape))],
                          [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT,
                                                         None)], inits)
    m = helper.make_model(g, opset_imports=a.graph.model.opset_import)
    return make_session(m).run(None, {layer.inputs[0]: x})[0].astype(np.float64)


def _layer_error(a, ranges: RangeSetter, name: str, x: np.ndarray, fmt: Format) -> float:
    layer = a.graph.layers[name]
    w = ranges.weights[layer.weight]
    b = ranges.weights[layer.bias] if layer.bias else None
    lw = ranges.layer(layer, fmt)
    qp = lw.qparams
    wq = dequantize(lw.values, fmt, qp.scale, qp.zero_point, axis=qp.axis)
    ref = _layer_output(a, name, x, w, b)
    return float(((_layer_output(a, name, x, wq, lw.bias) - ref) ** 2).mean())


def test_hessian_rounding_never_raises_a_layers_output_error(mb):
    a, nearest, inputs = mb
    assert a.calibration.hessians and a.ranges.rounding is Rounding.HESSIAN
    gains = {}
    for name, layer in a.graph.layers.items():
        x = inputs[layer.inputs[0]]
        e_near = _layer_error(a, nearest, name, x, Format.INT4)
        e_hess = _layer_error(a, a.ranges, name, x, Format.INT4)
        assert e_hess <= e_near * (1 + 1e-6), name
        gains[name] = e_near / e_hess
    assert set(gains) == {"stem", "expand", "depthwise", "project", "grouped", "fc"}
    assert max(gains.values()) > 1.2, gains


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_export_ships_exactly_the_integers_the_range_setter_holds(mb):
    a, nearest, _ = mb
    q = quantize_plan(a, parse_candidate("w4a8"))
    inits = _initializers(q.model)
    producer = {o: n for n in q.model.graph.node for o in n.output}
    differs = 0
    for node in q.model.graph.node:
        if node.name not in a.graph.layers:
            continue
        layer = a.graph.layers[node.name]
        dq_w, dq_x = producer[node.input[1]], producer[node.input[0]]
        assert dq_w.op_type == dq_x.op_type == "DequantizeLinear"
        s_x = float(inits[dq_x.input[1]])  # int32 bias: the layer was asked with its input scale
        lw = a.ranges.layer(layer, Format.INT4, input_scale=s_x)
        shipped = inits[dq_w.input[0]].astype(np.int64)
        np.testing.assert_array_equal(shipped, lw.values.astype(np.int64), err_msg=node.name)
        np.testing.assert_array_equal(inits[dq_w.input[1]], lw.qparams.scale)
        near = nearest.layer(layer, Format.INT4, input_scale=s_x).values
        differs += int(not np.array_equal(near, lw.values))
    assert differs >= 3  # what is shipped is the Hessian rounding, not nearest


def test_nearest_analysis_collects_no_hessians_and_cannot_switch_to_them(tmp_path):
    model = mbconv()
    np.savez(tmp_path / "calib.npz", x=images(16))
    a = analyze(model, open_dataset(tmp_path / "calib.npz", model),
                options=QuantizeOptions(rounding=Rounding.NEAREST))
    assert not a.calibration.hessians
    with pytest.raises(UsageError, match="Hessians"):
        a.with_rounding(Rounding.HESSIAN)
