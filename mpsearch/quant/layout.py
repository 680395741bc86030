"""Weight layouts: a layer's weight as the rows over inputs that its layer Hessian sees.

The layer Hessian (:mod:`mpsearch.graph.layer_hessian`) is ``E[x xᵀ]`` of the im2col input,
per group of input channels. GPTQ rounding (:mod:`mpsearch.quant.rounding`), OBS pruning
(:mod:`mpsearch.quant.prune`) and the Hessian sensitivity (:mod:`mpsearch.sensitivity.hessian`)
read a weight in the same layout: ``(G, R, K)``, per group ``G`` the ``R`` output channels as
rows over the ``K`` inputs they multiply, input channel first, then kernel offsets.
"""

from __future__ import annotations

import numpy as np

from mpsearch.graph.layer_graph import Layer

__all__ = ["MIN_ROWS_PER_INPUT", "input_channel_view", "rows_to_weight", "weight_rows"]

# A Hessian-driven update (GPTQ, OBS) only where the Hessian saw at least 2 rows per input
# column; with fewer it fits the calibration set's noise (mpsearch/quant/layer.py).
MIN_ROWS_PER_INPUT = 2


def input_channel_view(layer: Layer, w_shape: tuple[int, ...],
                       per_input: np.ndarray) -> np.ndarray | None:
    """``per_input`` (one value per input channel of ``layer``) broadcast to the weight's shape,
    or None when the layout is not one this knows."""
    v = np.asarray(per_input, np.float64)
    nd = len(w_shape)
    if layer.op_type == "Conv":
        cout, cin_g = w_shape[0], w_shape[1]
        g = layer.conv_groups
        if v.size != cin_g * g or cout % g:
            return None
        idx = (np.arange(cout) // (cout // g))[:, None] * cin_g + np.arange(cin_g)[None, :]
        return np.broadcast_to(v[idx].reshape(cout, cin_g, *([1] * (nd - 2))), w_shape)
    if layer.op_type == "ConvTranspose":
        if v.size != w_shape[0] or layer.conv_groups != 1:
            return None
        return np.broadcast_to(v.reshape(-1, *([1] * (nd - 1))), w_shape)
    if layer.op_type in ("Gemm", "MatMul"):
        k_axis = nd - 2 if layer.channel_axis == nd - 1 else nd - 1
        if v.size != w_shape[k_axis]:
            return None
        shape = [1] * nd
        shape[k_axis] = v.size
        return np.broadcast_to(v.reshape(shape), w_shape)
    return None


def weight_rows(layer: Layer, w: np.ndarray) -> np.ndarray | None:
    """``w`` as ``(G, R, K)``: per group of input channels ``G``, the ``R`` output channels as
    rows over the ``K`` inputs they multiply, in im2col order (input channel, then kernel
    offsets), the layout of the layer Hessian. None for layouts this does not know
    (ConvTranspose, batched MatMul weights)."""
    if layer.op_type == "Conv":
        g = layer.conv_groups
        cout = w.shape[0]
        if cout % g:
            return None
        return w.reshape(g, cout // g, -1)
    if layer.op_type in ("Gemm", "MatMul") and w.ndim == 2:
        rows = w if layer.channel_axis == 0 else w.T
        return rows[None]
    return None


def rows_to_weight(layer: Layer, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`weight_rows`."""
    if layer.op_type == "Conv":
        return rows.reshape(shape)
    r = rows[0]
    return np.ascontiguousarray(r if layer.channel_axis == 0 else r.T).reshape(shape)
