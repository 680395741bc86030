"""The layer Hessian collector against torch's own im2col (``F.unfold``) as the reference, on
maps large enough that only a grid of output positions enters the statistic (at most
``POSITIONS_PER_INPUT`` per column of the block, at least ``MIN_POSITIONS``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper

from mpsearch.graph.ingest import prepare_model
from mpsearch.graph.layer_graph import build_layer_graph
from mpsearch.graph.layer_hessian import (
    MAX_POSITIONS,
    MIN_POSITIONS,
    POSITIONS_PER_INPUT,
    HessianCollector,
    grid_step,
)


def _conv_model(c_in: int, c_out: int, size: int, **attrs) -> tuple:
    k = attrs.pop("k")
    groups = attrs.get("group", 1)
    w = np.random.default_rng(0).standard_normal((c_out, c_in // groups, k, k)).astype(
        np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    g = helper.make_graph([node], "g",
                          [helper.make_tensor_value_info("x", 1, [2, c_in, size, size])],
                          [helper.make_tensor_value_info("y", 1, None)],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), w


@pytest.mark.parametrize("c_in,c_out,size,attrs", [
    (3, 8, 70, dict(k=3, strides=[2, 2], pads=[1, 1, 1, 1])),            # a stem
    (16, 16, 48, dict(k=5, group=16, pads=[2, 2, 2, 2])),                 # depthwise 5x5
    (8, 8, 50, dict(k=3, group=2, dilations=[2, 2], auto_pad="SAME_UPPER")),  # grouped
    (4, 4, 75, dict(k=3, strides=[2, 2], auto_pad="SAME_LOWER")),
])
def test_sampled_grid_equals_unfold_at_those_positions(c_in, c_out, size, attrs):
    groups, k = attrs.get("group", 1), attrs["k"]
    stride, dil = attrs.get("strides", [1, 1])[0], attrs.get("dilations", [1, 1])[0]
    model, _ = _conv_model(c_in, c_out, size, **dict(attrs))
    lg = build_layer_graph(prepare_model(model))
    col = HessianCollector(lg)
    x = np.random.default_rng(1).standard_normal((2, c_in, size, size)).astype(np.float32)
    col.update({"x": x})
    h = col.result()["conv"]

    # Reference: torch pads and unfolds the whole map; keep every r-th output row and column.
    pad = attrs.get("pads")
    if pad is None:  # SAME_*: total padding (out-1)*s + (k-1)*d + 1 - n, odd half at the end
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + (k - 1) * dil + 1 - size)
        lo = total // 2 if attrs["auto_pad"] == "SAME_UPPER" else total - total // 2
        pad = [lo, lo, total - lo, total - lo]
    xp = torch.nn.functional.pad(torch.from_numpy(x), (pad[1], pad[3], pad[0], pad[2]))
    cols = torch.nn.functional.unfold(xp, k, dilation=dil, stride=stride).numpy()
    ho = (xp.shape[2] - dil * (k - 1) - 1) // stride + 1
    wo = (xp.shape[3] - dil * (k - 1) - 1) // stride + 1
    kk = c_in // groups * k * k
    cap = min(MAX_POSITIONS, max(MIN_POSITIONS, POSITIONS_PER_INPUT * kk))
    assert ho * wo > cap  # the test must exercise the sampling
    r = grid_step(ho, wo, cap)
    cols = cols.reshape(2, c_in * k * k, ho, wo)[:, :, ::r, ::r].reshape(2, c_in * k * k, -1)
    g = cols.reshape(2, groups, kk, -1).transpose(1, 2, 0, 3).reshape(groups, kk, -1)
    g = g.astype(np.float64)
    assert h.positions == g.shape[2] / 2 and h.positions <= cap
    np.testing.assert_allclose(h.second, g @ g.transpose(0, 2, 1) / g.shape[2], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(h.mean, g.mean(axis=2), rtol=1e-5, atol=1e-6)


def test_parallel_calibration_equals_one_thread():
    """The collectors' updates of a batch run side by side (the Hessian in one part per
    statistic); every statistic is the same, bit for bit, as with one thread."""
    from models import images, mbconv

    from mpsearch.graph.calibrate import (
        MomentsCollector,
        RangeCollector,
        layer_input_axes,
        run_collectors,
    )

    lg = build_layer_graph(prepare_model(mbconv(seed=1)))
    batches = [{"x": images(5, seed=s)} for s in range(4)]
    out = []
    for threads in (1, 3):
        cs = (HessianCollector(lg), RangeCollector(lg.activations),
              MomentsCollector(layer_input_axes(lg)))
        run_collectors(lg, batches, cs, threads=threads)
        out.append([c.result() for c in cs])
    (h1, r1, m1), (h3, r3, m3) = out
    assert h1.keys() == h3.keys() and len(h1) >= 5
    for name in h1:
        assert np.array_equal(h1[name].second, h3[name].second), name
        assert np.array_equal(h1[name].mean, h3[name].mean), name
    for name in r1:
        assert np.array_equal(r1[name].hist, r3[name].hist), name
    for name in m1:
        assert np.array_equal(m1[name].mean_sq, m3[name].mean_sq), name
