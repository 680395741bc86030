"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"; white paper §4.3).

For two convolutions A -> f -> B where output channel i of A feeds input channel i of B and
``f`` is positively homogeneous (``f(x/s) = f(x)/s`` for ``s > 0``: identity, Relu, LeakyRelu,
PRelu), scaling ``W_A[i], b_A[i]`` by ``1/s_i`` and ``W_B[:, i]`` by ``s_i`` leaves the network
unchanged. ``s_i = √(r_A,i / r_B,i)`` with ``r`` the channel's absolute weight range makes both
ranges ``√(r_A,i · r_B,i)``; chains (expand -> depthwise -> project) are iterated pairwise to
a fixed point. A depthwise B scales its own channel ``W_B[i]``.

``Clip(0, c)`` (ReLU6) is not positively homogeneous: after scaling, the bound would have to be
``c/s_i`` per channel. Mode ``exact`` therefore equalizes only exact pairs, which leaves the
model's function unchanged; mode ``relu6`` also equalizes through ``Clip(0, c)`` by replacing it
with Relu, as the DFQ paper does for MobileNets, which changes the float model wherever an
activation exceeded ``c``; mode ``off`` does nothing. Which helps is measured, not assumed:
``benchmarks/uniform_vs_ort.py`` reports each mode.

The default is ``off``: CLE equalizes weight ranges across channels, which is what per-tensor
weight quantization needs, and mpsearch quantizes weights per channel. Measured on
EfficientNet-Lite0, calibrating on 9 photos and evaluating on 8 others: ``exact`` (2 pairs)
costs 0.3-0.5 dB at w8a8/w8a16 and 0.05 dB at w4; ``relu6`` wrecks the float model (0.9 dB
SQNR: its activations often exceed 6), so :func:`mpsearch.quant.analysis.analyze` refuses it when
the float output moves by more than 40 dB SQNR.
"""

from __future__ import annotations

import copy
import enum
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from mpsearch.graph.layer_graph import Layer, LayerGraph

__all__ = ["EqualizeMode", "EqualizeReport", "equalize"]

log = logging.getLogger(__name__)

_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu"}


class EqualizeMode(enum.Enum):
    OFF = "off"
    EXACT = "exact"
    RELU6 = "relu6"


@dataclass(frozen=True, kw_only=True)
class EqualizeReport:
    mode: EqualizeMode
    pairs: tuple[tuple[str, str], ...]  # (layer A, layer B) equalized
    clips_replaced: tuple[str, ...]  # Clip nodes turned into Relu (mode relu6 only)
    iterations: int


def _clip_bounds(lg: LayerGraph, node: onnx.NodeProto) -> tuple[float, float] | None:
    vals = []
    inits = {t.name: t for t in lg.model.graph.initializer}
    for k in (1, 2):
        if len(node.input) <= k or not node.input[k]:
            vals.append(None)
        elif node.input[k] in inits:
            vals.append(float(numpy_helper.to_array(inits[node.input[k]])))
        else:
            return None
    lo, hi = vals
    if lo is None or lo != 0.0:
        return None
    return lo, (hi if hi is not None else np.inf)


def _pairs(lg: LayerGraph, mode: EqualizeMode) -> list[tuple[str, str, str | None]]:
    """(A, B, clip node to replace or None) for every equalizable pair."""
    graph_outputs = {o.name for o in lg.model.graph.output}
    out: list[tuple[str, str, str | None]] = []
    for a in lg.layers.values():
        if a.op_type != "Conv" or a.weight is None or a.output in graph_outputs:
            continue
        if a.conv_groups != 1 and not a.depthwise:
            continue
        t, clip = a.output, None
        cons = lg.activations[t].consumers if t in lg.activations else ()
        if len(cons) != 1:
            continue
        nxt = lg.nodes[cons[0]]
        if nxt.name not in lg.layers:
            if nxt.op_type in _HOMOGENEOUS:
                pass
            elif (nxt.op_type == "Clip" and mode is EqualizeMode.RELU6
                  and _clip_bounds(lg, nxt) is not None):
                clip = nxt.name
            else:
                continue
            t = nxt.output[0]
            if t in graph_outputs or t not in lg.activations:
                continue
            cons = lg.activations[t].consumers
            if len(cons) != 1 or cons[0] not in lg.layers:
                continue
            nxt = lg.nodes[cons[0]]
        b = lg.layers[nxt.name]
        if b.op_type != "Conv" or b.inputs[0] != t or b.weight is None:
            continue
        if b.conv_groups != 1 and not b.depthwise:
            continue
        out.append((a.name, b.name, clip))
    return out


def _ranges_out(w: np.ndarray) -> np.ndarray:
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def _ranges_in(b: Layer, w: np.ndarray) -> np.ndarray:
    if b.depthwise:
        return np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    return np.abs(w).transpose(1, 0, *range(2, w.ndim)).reshape(w.shape[1], -1).max(axis=1)


def equalize(lg: LayerGraph, *, mode: EqualizeMode = EqualizeMode.EXACT,
             max_iter: int = 20, tol: float = 1e-3) -> tuple[onnx.ModelProto, EqualizeReport]:
    """Return an equalized copy of ``lg.model`` and what was done."""
    pairs = _pairs(lg, mode) if mode is not EqualizeMode.OFF else []
    if not pairs:
        return lg.model, EqualizeReport(mode=mode, pairs=(), clips_replaced=(), iterations=0)
    model = copy.deepcopy(lg.model)
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(inits[name]).astype(np.float64)
              for a, b, _ in pairs for layer in (lg.layers[a], lg.layers[b])
              for name in (layer.weight, layer.bias) if name}
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        worst = 0.0
        for a_name, b_name, _ in pairs:
            a, b = lg.layers[a_name], lg.layers[b_name]
            wa, wb = arrays[a.weight], arrays[b.weight]
            ra, rb = _ranges_out(wa), _ranges_in(b, wb)
            ok = (ra > 0) & (rb > 0)
            s = np.ones_like(ra)
            s[ok] = np.sqrt(ra[ok] / rb[ok])
            shape_a = (-1,) + (1,) * (wa.ndim - 1)
            arrays[a.weight] = wa / s.reshape(shape_a)
            if a.bias:
                arrays[a.bias] = arrays[a.bias] / s
            if b.depthwise:
                arrays[b.weight] = wb * s.reshape(shape_a)
            else:
                arrays[b.weight] = wb * s.reshape((1, -1) + (1,) * (wb.ndim - 2))
            worst = max(worst, float(np.abs(np.log(s)).max(initial=0.0)))
        if worst < tol:
            break
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    replaced = []
    for node in model.graph.node:
        if any(node.name == c for _, _, c in pairs if c):
            node.op_type = "Relu"
            del node.input[1:]
            replaced.append(node.name)
    log.info("equalized %d layer pairs in %d iterations (%d Clip -> Relu)", len(pairs), iterations,
             len(replaced))
    return model, EqualizeReport(mode=mode, pairs=tuple((a, b) for a, b, _ in pairs),
                                 clips_replaced=tuple(replaced), iterations=iterations)
