"""Predicted sensitivity from the layer Hessian (OBS/GPTQ; docs/design.md §3), for every candidate
of every group from the one calibration pass.

For a layer ``y = W x + b`` with input second moment ``H = E[x xᵀ]`` and mean ``μ = E[x]``
(im2col layout, per output position; :mod:`mpsearch.graph.layer_hessian`), a candidate changes the
layer's output by three independent errors, each per output position:

* weights: ``E‖δW x + δb‖² = tr(δW H δWᵀ) + 2 δbᵀ δW μ + ‖δb‖²``, with ``δW`` the exact
  difference between the integers the exporter writes and the float weights, and ``δb`` the
  bias correction it applies; a pruned candidate (2:4, unstructured) is one more such ``δW``,
  that of its pruned and quantized weights (:meth:`mpsearch.quant.parameters.RangeSetter.layer`);
* input quantization, white noise of variance ``σ_in²`` per element: ``σ_in² ‖W‖²_F``;
* output quantization: ``σ_out² · C_out``.

``σ²`` is the expected error of the chosen range on the calibration histogram (rounding and
clipping together). Dividing by the layer's output power ``tr(W H Wᵀ) + 2 bᵀWμ + ‖b‖²`` gives a
relative error ``rel``; dividing by the output channels, the error per output element. A MatMul
of two activations has ``rel = σ_a²/E[a²] + σ_b²/E[b²] + σ_out²/E[y²]``.

The network-output error is predicted as
``mse = α · (gain_w · err_w + gain_out · σ_out² + gain_in · σ_in²)``, with the layer's measured
gains (:mod:`.gain`) for weight-shaped errors and for white noise at its output and at its
input (per element of that tensor), and one scale ``α`` fitted (median in log space) on a few
measured single-group runs; ``α`` near 1 says the gains describe quantization error well.
Input noise gets its own gain because ``W ε_in`` is not white at the output: through a 1×1
expand conv it fills only the few directions ``W`` spans, which the layers after it pass far
more weakly than white noise (EfficientNet-Lite0's first expand conv: 40× more weakly; with
the output's white gain, its w8a8 error was predicted 14× too large).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mpsearch.core.formats import Candidate, Format, FormatKind, Sparsity, dequantize, fake_quant
from mpsearch.core.memo import Memo
from mpsearch.core.ops import OpRole
from mpsearch.graph.calibrate import Calibration, TensorStats
from mpsearch.graph.layer_graph import Layer, LayerGraph
from mpsearch.graph.layer_hessian import LayerHessian
from mpsearch.quant.layer import LayerWeights
from mpsearch.quant.layout import input_channel_view, weight_rows
from mpsearch.quant.parameters import RangeSetter
from mpsearch.sensitivity.table import HessianFit, unchanged

__all__ = ["LayerError", "fit_runs", "fit_scale", "layer_errors", "layer_output_error"]

log = logging.getLogger(__name__)


def _act_error(stats: TensorStats, ranges: RangeSetter, t: str, fmt: Format) -> float:
    """Expected squared error per element of quantizing ``t`` in ``fmt``, on its histogram."""
    if fmt is Format.FLOAT:
        return 0.0
    c, n = stats.centers, stats.hist
    total = float(n.sum())
    if total <= 0:
        return 0.0
    if fmt is Format.FP16:
        d = fake_quant(c, fmt) - c
    else:
        qp = ranges.activation(t, fmt)
        d = fake_quant(c, fmt, qp.scale, qp.zero_point) - c
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing format: not finite
        return float((n * d.astype(np.float64) ** 2).sum() / total)


def _power(stats: TensorStats) -> float:
    n = stats.hist
    total = float(n.sum())
    return float((n * stats.centers.astype(np.float64) ** 2).sum() / total) if total else 0.0


@dataclass(frozen=True)
class LayerError:
    """A candidate's error at its layer's output: relative to the output power, and the mean
    squared error per output element."""

    relative: float
    weight: float  # per output element, from the weights (δW x + δb)
    activation: float  # per output element, from rounding the output (all of it, without weights)
    input: float = 0.0  # per input element, from rounding the layer's input


@dataclass(frozen=True)
class _LayerTerms:
    signal: float  # output power per position
    weight_sq: float  # ‖W‖²_F
    out_channels: int


class _Predictor:
    def __init__(self, lg: LayerGraph, cal: Calibration, ranges: RangeSetter) -> None:
        self.lg, self.cal, self.ranges = lg, cal, ranges
        # layer_errors runs one group per thread: every memo here is a thread-safe Memo
        self._terms: Memo[str, _LayerTerms] = Memo()
        self._werr: Memo[tuple[str, Format, float | None, Sparsity | None], float] = Memo()
        self._aerr: Memo[tuple[str, Format], float] = Memo()
        # tr(δW H δWᵀ) of quantized weights, by the identity of their integers and parameters
        # (the LayerWeights kept alive here): the a8 and a16 variants of a weight format share
        # them (unless the int32 bias limit raised a scale) and differ only in the corrected
        # bias, so the costly quadratic form is computed once for both.
        self._quads: Memo[tuple[int, int], tuple[LayerWeights, float]] = Memo()

    def act_error(self, t: str, fmt: Format) -> float:
        def make() -> float:
            st = self.cal.stats.get(t)
            return 0.0 if st is None else _act_error(st, self.ranges, t, fmt)

        return self._aerr.get((t, fmt), make)

    def output_tensor(self, layer: Layer) -> str:
        """The tensor the group's output quantizer reads: after a fused Relu/Clip."""
        cons = self.lg.activations[layer.output].consumers if layer.output in \
            self.lg.activations else ()
        if len(cons) == 1:
            info = self.lg.op_info(cons[0])
            out = self.lg.nodes[cons[0]].output[0]
            if info is not None and info.fuses_into_producer and out in self.cal.stats:
                return out
        return layer.output

    # -- weighted layers

    def _quad(self, layer: Layer, h: LayerHessian | None, dw: np.ndarray,
              db: np.ndarray | None) -> float:
        """E‖δW x + δb‖² per output position."""
        if h is not None and weight_rows(layer, dw) is not None:
            return layer_output_error(layer, h, dw, db)
        # No Hessian for this layout (ConvTranspose, ...): the diagonal from channel moments.
        mom = self.cal.moments.get(layer.inputs[0])
        if mom is None:
            return float((dw.astype(np.float64) ** 2).sum())
        imp = input_channel_view(layer, dw.shape, mom.mean_sq)
        q = float((dw.astype(np.float64) ** 2 * imp).sum()) if imp is not None else \
            float((dw.astype(np.float64) ** 2).sum() * float(mom.mean_sq.mean()))
        if db is not None:
            q += float((db.astype(np.float64) ** 2).sum())
        return q

    def terms(self, layer: Layer) -> _LayerTerms:
        def make() -> _LayerTerms:
            w = self.ranges.weights[layer.weight]
            b = self.ranges.weights[layer.bias] if layer.bias else None
            h = self.cal.hessians.get(layer.name)
            sig = self._quad(layer, h, w, b)
            if sig <= 0:
                sig = _power(self.cal.stats[layer.output]) * (layer.out_channels or 1)
            return _LayerTerms(signal=sig, weight_sq=float((w.astype(np.float64) ** 2).sum()),
                               out_channels=int(layer.out_channels or 1))

        return self._terms.get(layer.name, make)

    def weight_error(self, layer: Layer, fmt: Format, input_scale: float | None,
                     sparsity: Sparsity | None = None) -> float:
        return self._werr.get((layer.name, fmt, input_scale, sparsity),
                              lambda: self._weight_error(layer, fmt, input_scale, sparsity))

    def _weight_error(self, layer: Layer, fmt: Format, input_scale: float | None,
                      sparsity: Sparsity | None) -> float:
        w = self.ranges.weights[layer.weight]
        if fmt is Format.FLOAT:
            err = 0.0
        elif fmt is Format.FP16:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow: inf, then dropped
                err = self._quad(layer, self.cal.hessians.get(layer.name),
                                 w.astype(np.float16).astype(np.float64) - w, None)
        else:
            lw = self.ranges.layer(layer, fmt, sparsity=sparsity, input_scale=input_scale)
            db = None
            if layer.bias and lw.bias is not None:
                db = lw.bias.astype(np.float64) - self.ranges.weights[layer.bias]
            h = self.cal.hessians.get(layer.name)
            if h is not None and weight_rows(layer, w) is not None:
                rows, q = self._quantized_quad(layer, fmt, lw, h)
                err = _with_bias(q, rows, h, db)
            else:
                qp = lw.qparams
                deq = dequantize(lw.values, fmt, qp.scale, qp.zero_point, axis=qp.axis)
                err = self._quad(layer, h, deq.astype(np.float64) - w, db)
        return err

    def _quantized_quad(self, layer: Layer, fmt: Format, lw: LayerWeights,
                        h: LayerHessian) -> tuple[np.ndarray, float]:
        """The δW rows of ``lw`` and ``tr(δW H δWᵀ)``."""
        qp = lw.qparams
        deq = dequantize(lw.values, fmt, qp.scale, qp.zero_point, axis=qp.axis)
        rows = _rows64(layer, deq.astype(np.float64) - self.ranges.weights[layer.weight])
        return rows, self._quads.get((id(lw.values), id(qp)),
                                     lambda: (lw, _quadratic(rows, h)))[1]

    def errors(self, layer: Layer, cand: Candidate) -> LayerError:
        af = cand.activation
        if layer.role is OpRole.ACT_MATMUL or layer.weight is None:
            rel = 0.0
            for t in (*layer.inputs, self.output_tensor(layer)):
                p = _power(self.cal.stats[t]) if t in self.cal.stats else 0.0
                if p > 0:
                    rel += self.act_error(t, af) / p
            out = self.cal.stats.get(layer.output)
            return LayerError(relative=rel, weight=0.0,
                              activation=rel * (_power(out) if out else 0.0))
        terms = self.terms(layer)
        int_bias = (layer.bias is not None and af.spec.kind is FormatKind.INT
                    and cand.weight.spec.kind is FormatKind.INT)
        s_x = float(self.ranges.activation(layer.inputs[0], af).scale) if int_bias else None
        werr = self.weight_error(layer, cand.weight, s_x, cand.sparsity)
        ain = self.act_error(layer.inputs[0], af)
        aout = self.act_error(self.output_tensor(layer), af)
        return LayerError(relative=(werr + ain * terms.weight_sq + aout * terms.out_channels)
                          / terms.signal,
                          weight=werr / terms.out_channels, activation=aout, input=ain)


def layer_output_error(layer: Layer, h: LayerHessian, dw: np.ndarray,
                       db: np.ndarray | None = None) -> float:
    """``E‖δW x + δb‖²`` per output position: ``tr(δW H δWᵀ) + 2 δbᵀ δW μ + ‖δb‖²``, summed
    over the groups of input channels (exact with a dense Hessian)."""
    rows = _rows64(layer, dw)
    return _with_bias(_quadratic(rows, h), rows, h, db)


def _rows64(layer: Layer, dw: np.ndarray) -> np.ndarray:
    rows = weight_rows(layer, dw)
    if rows is None:
        raise ValueError(f"layer {layer.name}: no Hessian layout for {layer.op_type}")
    return rows.astype(np.float64)


def _quadratic(rows: np.ndarray, h: LayerHessian) -> float:
    """``tr(δW H δWᵀ)``, the costly part: ``R·K²`` per group."""
    if h.dense:  # batched matmul (BLAS); a three-operand einsum runs naive loops here
        return float(np.einsum("grk,grk->", np.matmul(rows, h.second), rows))
    return float(np.einsum("grk,gk->", rows**2, h.second))


def _with_bias(q: float, rows: np.ndarray, h: LayerHessian, db: np.ndarray | None) -> float:
    """``q`` plus the bias terms ``2 δbᵀ δW μ + ‖δb‖²``."""
    if db is not None:
        dbr = np.asarray(db, np.float64).reshape(rows.shape[0], rows.shape[1])
        q += 2.0 * float(np.einsum("gr,grk,gk->", dbr, rows, h.mean))
        q += float((dbr**2).sum())
    return q


def layer_errors(lg: LayerGraph, cal: Calibration, ranges: RangeSetter,
                 pairs: Iterable[tuple[str, Candidate]], *, threads: int = 1,
                 stop: threading.Event | None = None) -> dict[tuple[str, Candidate],
                                                              LayerError]:
    """The layer-output error of every (group, candidate). ``threads``: groups handled side
    by side, the largest weights first (each group's candidates in order on one thread: they
    share its scales and Hessian factor); the errors do not depend on it. ``stop``: once set,
    no further group starts (raises ``CancelledError``)."""
    pred = _Predictor(lg, cal, ranges)
    zero = LayerError(relative=0.0, weight=0.0, activation=0.0)
    pairs = list(pairs)
    by_group: dict[str, list[Candidate]] = {}
    for g, c in pairs:
        by_group.setdefault(g, []).append(c)

    def group(g: str) -> dict[tuple[str, Candidate], LayerError]:
        if stop is not None and stop.is_set():
            raise CancelledError
        return {(g, c): zero if unchanged(c) else pred.errors(lg.layers[g], c)
                for c in by_group[g]}

    if threads <= 1:
        done = [group(g) for g in by_group]
    else:
        def size(g: str) -> int:
            w = lg.layers[g].weight
            return int(ranges.weights[w].size) if w in ranges.weights else 0

        with ThreadPoolExecutor(max_workers=threads) as pool:
            done = list(pool.map(group, sorted(by_group, key=lambda g: -size(g))))
    out = {k: v for d in done for k, v in d.items()}
    return {k: out[k] for k in pairs}


def fit_runs(lg: LayerGraph, candidates: Mapping[str, Sequence[Candidate]], *,
             count: int = 8) -> list[tuple[str, Candidate]]:
    """Which single-group runs to measure for the fit: groups spread along the network, half
    at the group's candidate with the fewest bits (weight + activation: large, well-measured
    errors), half at its median candidate by bits (the errors the solver mostly weighs). Dense
    candidates only (where a group has any): offering pruned
    candidates as well must not move the fit, and with it every dense prediction."""
    groups = [g for g in lg.group_names if any(not unchanged(c) for c in candidates[g])]
    if not groups:
        return []
    step = max(1, len(groups) // count)
    picked = groups[::step][:count]
    runs = []
    for k, g in enumerate(picked):
        live = [c for c in candidates[g] if not unchanged(c)]
        cands = sorted([c for c in live if c.sparsity is None] or live,
                       key=lambda c: (c.weight.bits + c.activation.bits, c.name))
        runs.append((g, cands[0] if k % 2 == 0 else cands[len(cands) // 2]))
    return runs


def fit_scale(raw: Mapping[tuple[str, Candidate], float],
              measured: Mapping[tuple[str, Candidate], float]) -> HessianFit:
    """``α`` with ``measured ≈ α · raw``: the median of the log ratios (robust to one odd
    layer)."""
    logs, used = [], []
    for key, m in measured.items():
        r = raw.get(key, 0.0)
        if m > 0 and r > 0:
            logs.append(math.log10(m / r))
            used.append(key)
    if not logs:
        return HessianFit(alpha=1.0, runs=(), log_spread=math.nan)
    a = float(np.median(logs))
    return HessianFit(alpha=10.0**a, runs=tuple(used), log_spread=float(np.std(logs)))
