"""Layer weight quantization: output-aware clipping and bias correction, measured on the
layer's output with inputs whose statistics the moments describe."""

from __future__ import annotations

import numpy as np
import pytest

from mpsearch.calibrate import ChannelMoments
from mpsearch.formats import Format
from mpsearch.graph import Layer
from mpsearch.layerquant import INT32_BIAS_LIMIT, input_channel_view, quantize_layer
from mpsearch.ops import OpRole
from mpsearch.ranges import RangeMethod


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
    plain = quantize_layer(layer, w, b, fmt, moments=None, method=RangeMethod.MSE)
    aware = quantize_layer(layer, w, b, fmt, moments=mom, method=RangeMethod.MSE,
                           bias_correction=False)
    both = quantize_layer(layer, w, b, fmt, moments=mom, method=RangeMethod.MSE)
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
    lw = quantize_layer(_gemm(*w.shape), w, b, Format.INT16, moments=mom,
                        method=RangeMethod.MSE, input_scale=1e-6)
    s_b = 1e-6 * lw.qparams.scale.astype(np.float64)
    assert np.abs(lw.bias / s_b).max() < INT32_BIAS_LIMIT
