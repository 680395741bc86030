"""Cross-layer equalization: exact pairs keep the function and equalize channel ranges."""

from __future__ import annotations

import numpy as np
from models import images, mbconv
from onnx import numpy_helper

from mpsearch.graph.calibrate import make_session
from mpsearch.graph.equalize import EqualizeMode, equalize
from mpsearch.graph.layer_graph import build_layer_graph


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_relu_chain_is_equalized_and_the_function_is_unchanged():
    m = mbconv(act="Relu")
    lg = build_layer_graph(m)
    eq, report = equalize(lg, mode=EqualizeMode.EXACT)
    assert report.pairs == (("expand", "depthwise"), ("depthwise", "project"))
    assert report.clips_replaced == ()
    x = images(8, seed=3)
    np.testing.assert_allclose(make_session(eq).run(None, {"x": x})[0],
                               make_session(m).run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
    w = _weights(eq)
    r_exp = np.abs(w["exp_w"]).reshape(16, -1).max(1)
    r_dw = np.abs(w["dw_w"]).reshape(16, -1).max(1)
    r_proj_in = np.abs(w["proj_w"]).max(axis=(0, 2, 3))
    # at the fixed point the depthwise channel range is the geometric mean of its neighbours
    np.testing.assert_allclose(r_dw**2, r_exp * r_proj_in, rtol=1e-2)
    before = _weights(m)
    spread = lambda a: a.max() / a.min()  # noqa: E731
    assert spread(r_dw) < spread(np.abs(before["dw_w"]).reshape(16, -1).max(1))


def test_exact_leaves_relu6_chains_alone_and_relu6_mode_replaces_the_clips():
    lg = build_layer_graph(mbconv(act="Clip"))
    eq, report = equalize(lg, mode=EqualizeMode.EXACT)
    assert report.pairs == () and eq is lg.model
    eq, report = equalize(lg, mode=EqualizeMode.RELU6)
    assert len(report.pairs) == 2
    assert set(report.clips_replaced) == {"expand_act", "dw_act"}
    ops = {n.name: n.op_type for n in eq.graph.node}
    assert ops["expand_act"] == "Relu" and ops["stem_act"] == "Clip"


def test_off_does_nothing():
    lg = build_layer_graph(mbconv(act="Relu"))
    eq, report = equalize(lg, mode=EqualizeMode.OFF)
    assert eq is lg.model and report.pairs == ()
