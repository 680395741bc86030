"""Quantizing one layer's weights for the error it causes at the layer's output.

**Output-aware clipping** (the diagonal of the layer Hessian ``H = 2·E[x xᵀ]``, docs/design.md §3).
For ``y = W x`` the expected output error of a weight error ``δW`` is
``E‖δW x‖² = Σ_i δW_i E[x xᵀ] δW_iᵀ``; keeping the diagonal gives ``Σ_ij δW_ij² · E[x_j²]``,
so a weight counts by the energy of the input it multiplies. The per-channel clipping ratio
minimises that rather than the plain weight error.

**Empirical bias correction** (Nagel et al. 2019 §4.2; white paper §4.2). Quantization moves
the layer's mean output by ``δW · E[x]`` (summed over kernel positions, taking the channel mean
as spatially uniform); subtracting it from the bias removes that systematic error. Layers
without a bias input (MatMul followed by an Add) are not corrected.

Measured on EfficientNet-Lite0 (200 held-out crops, SQNR against FP32), plain weight MSE ->
output-aware -> plus bias correction: w8a8 16.17 -> 17.18 -> 21.65 dB, w8a16 17.64 -> 19.11 ->
25.83 dB, w4a8 -2.80 -> -2.20 -> 2.45 dB. MNIST CNN w4a8: 21.62 -> 22.51 -> 24.23 dB.

**int32-safe scales.** A bias stored as int32 with scale ``s_x·s_w`` overflows where a channel's
weights are ~0 but its bias is not (dead channels after BN folding); those channels get a larger
weight scale, as ONNX Runtime's quantizer does.

**Hessian rounding** (GPTQ with act-order, :mod:`mpsearch.quant.rounding`;
``Rounding.HESSIAN``). With the scales chosen as above, integer formats of 8 bits or fewer are
rounded column by column, largest ``H_jj`` first, with the error fed forward through the layer
Hessian instead of to nearest. Both are scored on that Hessian, ``δw H δwᵀ`` per output
channel, and each channel keeps the lower: never worse than nearest on the calibration
statistic. Where the bias is corrected afterwards the Hessian is the covariance
``E[x xᵀ] - E[x]E[x]ᵀ`` (the bias removes the mean error, the rest remains), otherwise
``E[x xᵀ]``. The correction is computed from the final rounding. Measured on
EfficientNet-Lite0 (same 200 crops), nearest -> GPTQ -> GPTQ act-order: w8a8 22.10 -> 23.15 ->
23.53 dB, w4a8 2.69 -> 7.17 -> 8.03 dB; MNIST CNN w4a8 24.23 -> 30.73 dB, MiniLM w8a16
29.34 -> 31.95 dB, w4a16 9.96 -> 14.96 dB (act-order). Rounding with the uncentered
``E[x xᵀ]`` instead: 23.01 and 7.13 dB (without act-order); the layer error after bias
correction (exact, on the calibration statistics) is then higher in 45 of 50 layers at int4 and
in all 50 at int8, by 5% (geometric mean).

**Pruned candidates** (``sparsity`` 2:4 or unstructured, :mod:`mpsearch.quant.prune`). The
scales are chosen on the dense weights as above; then one SparseGPT pass (OBS with the layer
Hessian, the same one GPTQ uses: centered where the bias is corrected) picks the mask, moves
the surviving weights to compensate and rounds them onto those scales, whatever ``rounding``
says (pruning without the update costs 2-4x the layer error, benchmarks/pruning.py). Pruned
weights are stored as the zero point, so the integers in the QDQ file show the pattern. The
bias correction and the int32-safe scales follow as for dense weights; a channel whose scale the
int32 limit raises is pruned again on the new scale (never rounded to nearest, which would
fill the zeros back in). Formats without an integer grid (fp8) are pruned in float and the
result quantized, zeros staying zeros. Output-channel pruning (``+channel@d``) zeroes whole rows
and the bias of those channels too (no correction there): the channel outputs 0, as if it were
gone (:mod:`mpsearch.export.channels`).

The moments ``E[x]``, ``E[x²]`` per input channel come from the one calibration pass; the
Hessians, when rounding wants them, from the same pass (:mod:`mpsearch.graph.layer_hessian`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

import numpy as np

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Format, FormatKind, Sparsity, quantize
from mpsearch.graph.calibrate import ChannelMoments
from mpsearch.graph.layer_graph import Layer
from mpsearch.graph.layer_hessian import LayerHessian
from mpsearch.graph.ranges import QParams, RangeMethod, weight_qparams
from mpsearch.quant.layout import (
    MIN_ROWS_PER_INPUT,
    input_channel_view,
    rows_to_weight,
    weight_rows,
)
from mpsearch.quant.prune import prune_layer
from mpsearch.quant.rounding import FactorCache, HessianFactor, factor_hessian, hessian_round

__all__ = ["INT32_BIAS_LIMIT", "LayerInputs", "LayerWeights", "Rounding", "WeightSettings",
           "bias_safe", "quantize_layer"]

log = logging.getLogger(__name__)

INT32_BIAS_LIMIT = 2**31 - 1
# Rescale, re-round and re-correct while the corrected bias overflows int32, at most this
# often: the scales only grow, and one pass settles all but pathological channels.
_BIAS_SAFE_TRIES = 3


class Rounding(enum.Enum):
    """How weights are rounded onto the grid of their (already chosen) scales."""

    NEAREST = "nearest"
    HESSIAN = "hessian"  # GPTQ on the layer Hessian, per channel where it beats nearest


@dataclass(frozen=True, kw_only=True)
class WeightSettings:
    """How every layer's weights are quantized (the plan-independent choices)."""

    method: RangeMethod = RangeMethod.MSE  # per-channel clipping search, or min/max
    bias_correction: bool = True
    rounding: Rounding = Rounding.NEAREST


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerInputs:
    """One layer's float weights and what the calibration pass saw of its input."""

    layer: Layer
    weight: np.ndarray
    bias: np.ndarray | None = None
    moments: ChannelMoments | None = None  # E[x], E[x²] per input channel
    hessian: LayerHessian | None = None  # what Rounding.HESSIAN and OBS pruning use


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerWeights:
    """A layer's weights in one format: parameters, stored values, and the bias to write."""

    qparams: QParams
    values: np.ndarray
    bias: np.ndarray | None  # float bias after correction (None: the layer has no bias)
    bias_shift: float  # largest |correction| applied, for reports
    # output channels pruned whole (``+channel@d``): their rows at the zero point, bias 0
    pruned_channels: tuple[int, ...] = field(default=())


def bias_safe(qp: QParams, bias: np.ndarray, input_scale: float) -> QParams:
    """``qp`` with the scales raised where ``bias`` would overflow int32 at scale
    ``input_scale · s_w`` (``qp`` itself when it fits)."""
    floor = np.abs(bias.astype(np.float64)) / (float(input_scale) * INT32_BIAS_LIMIT) * 1.01
    if np.all(qp.scale >= floor):
        return qp
    scale = np.maximum(qp.scale.astype(np.float64), floor).astype(np.float32)
    return QParams(fmt=qp.fmt, scale=scale, zero_point=qp.zero_point, axis=qp.axis,
                   rmin=qp.rmin, rmax=qp.rmax)


def _rounding_hessian(li: LayerInputs, fmt: Format, rounding: Rounding, factors: FactorCache,
                      *, centered: bool) -> tuple[np.ndarray, HessianFactor] | None:
    """The ``(G, K, K)`` Hessian to round the weight with and its GPTQ factor, or None for
    round-to-nearest."""
    layer, w, hessian = li.layer, li.weight, li.hessian
    if (rounding is not Rounding.HESSIAN or hessian is None or not hessian.dense
            or fmt.spec.kind is not FormatKind.INT or fmt.bits > 8):
        return None
    rows = weight_rows(layer, w)
    g_k_k = None if rows is None else (rows.shape[0], rows.shape[2], rows.shape[2])
    if hessian.second.shape != g_k_k:
        log.debug("%s: Hessian %s does not match the weight rows %s; rounding to nearest",
                  layer.name, hessian.second.shape, None if rows is None else rows.shape)
        return None
    k = g_k_k[1]
    if hessian.rows_seen < MIN_ROWS_PER_INPUT * k:
        # Too few rows for the unknowns: GPTQ fits the calibration set's noise. On the MNIST
        # CNN (256 calibration digits) a w4 Gemm with more inputs than samples looked best on
        # the calibration data, and the search's plan at bops=1.0 lost 5.7 dB on held-out
        # digits to the best plan there; round to nearest instead.
        log.debug("%s: %d Hessian rows for %d inputs; rounding to nearest", layer.name,
                  hessian.rows_seen, k)
        return None
    h = hessian.centered() if centered else hessian.second
    factor = factors.get(hessian, ("gptq", centered), lambda: factor_hessian(h, act_order=True))
    return h, factor


def _row_errors(q: np.ndarray, rows: np.ndarray, h: np.ndarray, scale: np.ndarray,
                zero_point: np.ndarray) -> np.ndarray:
    """``δw H δwᵀ`` per row (G, R) of the dequantized ``q`` against ``rows``."""
    deq = (q.astype(np.float32) - zero_point[..., None].astype(np.float32)) * scale[..., None]
    d = deq.astype(np.float64) - rows
    return np.einsum("grk,grk->gr", d @ h, d)


def _round(layer: Layer, w: np.ndarray, fmt: Format, qp: QParams,
           hf: tuple[np.ndarray, HessianFactor] | None) -> np.ndarray:
    """``w`` on the grid of ``qp``: to nearest, or (``hf`` given) by GPTQ where, channel by
    channel, that gives the lower ``δw H δwᵀ``."""
    values = quantize(w, fmt, qp.scale, qp.zero_point, axis=layer.channel_axis,
                    weight=True)
    if hf is None:
        return values
    h, factor = hf
    rows = weight_rows(layer, w).astype(np.float64)
    g, r, _ = rows.shape
    scale = np.asarray(qp.scale, np.float32).reshape(g, r)
    zp = np.asarray(qp.zero_point).reshape(g, r)
    nearest = weight_rows(layer, values)
    gptq = hessian_round(rows, None, fmt, scale, zp, factor=factor)
    better = _row_errors(gptq, rows, h, scale, zp) < _row_errors(nearest, rows, h, scale, zp)
    log.debug("%s: Hessian rounding kept for %d of %d channels", layer.name,
              int(better.sum()), better.size)
    return rows_to_weight(layer, np.where(better[..., None], gptq, nearest), w.shape)


def _mean_shift(layer: Layer, w: np.ndarray, values: np.ndarray, qp: QParams,
                mean: np.ndarray) -> np.ndarray:
    """``δW · E[x]`` per output channel: how far the quantized weights move the mean output."""
    axis = layer.channel_axis
    scale = np.asarray(qp.scale, np.float64).reshape(
        [-1 if i == axis else 1 for i in range(w.ndim)])
    dw = values.astype(np.float64) * scale - w
    return (dw * mean).sum(axis=tuple(i for i in range(w.ndim) if i != axis))


def _patch(layer: Layer, w: np.ndarray, fmt: Format, old: QParams, new: QParams,
           values: np.ndarray) -> np.ndarray:
    """``values`` with the channels whose scale ``new`` raised rounded to nearest on it. Rows
    round independently (also in GPTQ), so the other channels stay as they are; the raised ones
    are nearly dead channels (weights ~0 next to a large bias), where rounding hardly matters."""
    changed = np.asarray(new.scale) != np.asarray(old.scale)
    nearest = quantize(w, fmt, new.scale, new.zero_point, axis=layer.channel_axis,
                    weight=True)
    shape = [-1 if i == layer.channel_axis else 1 for i in range(w.ndim)]
    return np.where(changed.reshape(shape), nearest, values)


def _pruned_values(li: LayerInputs, fmt: Format, sparsity: Sparsity, qp: QParams,
                   factors: FactorCache, *, centered: bool
                   ) -> tuple[np.ndarray, tuple[int, ...]]:
    """The weight pruned to ``sparsity`` and on the grid of ``qp`` (one SparseGPT pass for
    integer formats; pruned in float, then quantized, for fp8), and the output channels pruned
    whole (channel pruning; they do not depend on ``qp``)."""
    layer = li.layer
    joint = fmt.spec.kind is FormatKind.INT
    pr = prune_layer(layer, li.weight, sparsity, hessian=li.hessian, fmt=fmt if joint else None,
                     qparams=qp if joint else None, centered=centered, factors=factors)
    if not pr:
        raise UsageError(f"layer {layer.name} cannot take sparsity {sparsity.name}: "
                         f"{pr.reason}", fix="give it a dense candidate")
    if pr.fallback:
        log.debug("%s: %s by %s (%s)", layer.name, sparsity.name, pr.method.value, pr.fallback)
    cut = () if pr.channels is None else tuple(int(c) for c in pr.channels)
    if joint:
        return pr.values, cut
    return quantize(pr.weight, fmt, qp.scale, qp.zero_point, axis=layer.channel_axis,
                    weight=True), cut


def _requantize(li: LayerInputs, fmt: Format, sparsity: Sparsity | None, old: QParams,
                new: QParams, values: np.ndarray, factors: FactorCache, *,
                centered: bool) -> np.ndarray:
    """``values`` moved onto the raised scales of ``new``: dense weights re-rounded where the
    scale changed (:func:`_patch`), pruned ones pruned again on the new grid (never rounded to
    nearest, which would fill the zeros back in)."""
    if sparsity is None:
        return _patch(li.layer, li.weight, fmt, old, new, values)
    return _pruned_values(li, fmt, sparsity, new, factors, centered=centered)[0]


def quantize_layer(li: LayerInputs, fmt: Format, *,
                   settings: WeightSettings = WeightSettings(),  # noqa: B008 - frozen
                   sparsity: Sparsity | None = None, input_scale: float | None = None,
                   base: LayerWeights | None = None,
                   factors: FactorCache | None = None) -> LayerWeights:
    """Quantize the layer's weight (and correct its bias) for ``fmt``.

    ``settings``: range method, bias correction and rounding (``Rounding.HESSIAN`` uses
    ``li.hessian``; without one, or for formats other than integers of 8 bits or fewer,
    weights are rounded to nearest). ``sparsity``: prune to it in the same pass (module
    docstring; None: dense); raises :class:`~mpsearch.core.errors.UsageError` where the layer
    cannot take it. ``input_scale``: the scale of the layer's integer input when the bias is
    stored as int32 (None otherwise). ``base``: this function's result for the same arguments
    without ``input_scale`` (saves the clipping search and the rounding). ``factors``: where
    the Hessian factors are kept between calls (a fresh cache when None)."""
    layer, w, bias = li.layer, li.weight, li.bias
    factors = factors if factors is not None else FactorCache()
    axis = layer.channel_axis
    mean = None
    if (bias is not None and settings.bias_correction and li.moments is not None
            and fmt.spec.kind is not FormatKind.FLOAT):
        mean = input_channel_view(layer, w.shape, li.moments.mean)
    centered = mean is not None  # the bias removes the mean error: round on the covariance
    if sparsity is not None and sparsity.density >= 1:
        sparsity = None
    if sparsity is not None and not fmt.is_quantized:
        raise UsageError(f"layer {layer.name}: pruned {fmt} weights are not exported",
                         fix="prune only candidates with integer or fp8 weights")
    cut: tuple[int, ...] = ()  # output channels pruned whole: their bias goes with them
    if base is not None:
        qp, values, cut = base.qparams, base.values, base.pruned_channels
    else:
        importance = None
        if li.moments is not None:
            importance = input_channel_view(layer, w.shape, li.moments.mean_sq)
        qp = weight_qparams(w, fmt, axis, settings.method, importance=importance)
        if sparsity is not None:
            values, cut = _pruned_values(li, fmt, sparsity, qp, factors, centered=centered)
        else:
            hf = _rounding_hessian(li, fmt, settings.rounding, factors, centered=centered)
            values = _round(layer, w, fmt, qp, hf)

    def fit_int32(bias_after: np.ndarray) -> bool:
        """Raise the scales (and re-round) where ``bias_after`` would overflow int32; True
        when nothing had to change."""
        nonlocal qp, values
        new = bias_safe(qp, bias_after, input_scale)
        if new is qp:
            return True
        qp, values = new, _requantize(li, fmt, sparsity, qp, new, values, factors,
                                      centered=centered)
        return False

    shift = 0.0
    if bias is not None and cut:  # a removed channel outputs 0, its bias too
        shift = float(np.abs(bias[list(cut)]).max(initial=0.0))
        bias = bias.copy()
        bias[list(cut)] = 0
    if bias is not None and input_scale is not None:
        fit_int32(bias)
    if mean is None:
        return LayerWeights(qparams=qp, values=values, bias=bias, bias_shift=shift,
                            pruned_channels=cut)

    def mean_shift() -> np.ndarray:
        d = _mean_shift(layer, w, values, qp, mean)
        d[list(cut)] = 0
        return d

    for _ in range(_BIAS_SAFE_TRIES):
        delta = mean_shift()
        if input_scale is None or fit_int32(bias.astype(np.float64) - delta):
            break
    else:
        delta = mean_shift()
    return LayerWeights(qparams=qp, values=values,
                        bias=(bias.astype(np.float64) - delta).astype(np.float32),
                        bias_shift=max(shift, float(np.abs(delta).max(initial=0.0))),
                        pruned_channels=cut)
