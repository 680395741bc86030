"""Range setting: from calibration statistics and weights to quantization parameters.

Activations (per tensor) are set from the calibration histogram. ``mse`` (the default, as the
white paper recommends, Nagel et al. 2021 §3.3) minimises the expected squared error
``Σ_bins n_i · e(c_i)`` over a grid of clipping ranges (ratios 0.02-1 of the observed range,
each side separately for asymmetric formats), where inside the range
``e = Δ²/12`` for an integer grid of step ``Δ`` (for FP8 the local step of the value's binade,
``Δ(v) = s · 2^(max(⌊log2|v/s|⌋, e_min) - m)``) and outside it the clipping error
``(c - clip(c))²``. ``minmax`` takes the observed range; ``percentile`` clips both tails
at 99.99%. Every range contains zero, so zero is exactly representable.

Weights are symmetric per output channel. ``mse`` picks, per channel, the clipping ratio
``r ∈ [0.3, 1]`` of ``max|w|`` that minimises ``‖w - Q(w)‖²`` with round-to-nearest, searched
on a grid of 71 ratios; 16-bit grids use ``r = 1`` (rounding noise is negligible there).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mpsearch.calibrate import TensorStats
from mpsearch.formats import Format, FormatKind, fp8_max, quantize

__all__ = ["QParams", "RangeMethod", "RangeSetter", "activation_qparams", "constant_qparams",
           "qparams_from_range", "range_from_stats", "weight_qparams"]


class RangeMethod(enum.Enum):
    MSE = "mse"
    MINMAX = "minmax"
    PERCENTILE = "percentile"


@dataclass(frozen=True, kw_only=True, eq=False)
class QParams:
    """Quantization parameters of one tensor in one format."""

    fmt: Format
    scale: np.ndarray  # float32; scalar for per tensor, 1-D for per channel
    zero_point: np.ndarray  # same shape, integer (fp8: zeros)
    axis: int | None = None
    rmin: float = field(default=0.0)
    rmax: float = field(default=0.0)


_FP8_MANTISSA = {Format.FP8_E4M3: (3, -6), Format.FP8_E5M2: (2, -14)}


def qparams_from_range(lo: float, hi: float, fmt: Format) -> QParams:
    """Per-tensor parameters that represent [lo, hi] (zero included) in ``fmt``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    spec = fmt.spec
    if spec.kind is FormatKind.FP8:
        amax = max(abs(lo), abs(hi))
        scale = amax / fp8_max(fmt) if amax > 0 else 1.0
        return QParams(fmt=fmt, scale=np.float32(scale), zero_point=np.zeros((), np.float32),
                       rmin=-amax, rmax=amax)
    if spec.kind is not FormatKind.INT:
        raise ValueError(f"{fmt} has no quantization parameters")
    if spec.signed:
        amax = max(abs(lo), abs(hi))
        scale = amax / spec.qmax if amax > 0 else 1.0
        return QParams(fmt=fmt, scale=np.float32(scale), zero_point=np.zeros((), np.int64),
                       rmin=-amax, rmax=amax)
    if hi - lo <= 0:
        return QParams(fmt=fmt, scale=np.float32(1.0), zero_point=np.zeros((), np.int64))
    scale = (hi - lo) / (spec.qmax - spec.qmin)
    zp = int(np.clip(np.rint(spec.qmin - lo / scale), spec.qmin, spec.qmax))
    return QParams(fmt=fmt, scale=np.float32(scale), zero_point=np.asarray(zp, np.int64),
                   rmin=lo, rmax=hi)


def _expected_error(centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                    fmt: Format) -> np.ndarray:
    """Expected squared error for ranges (lo[k], hi[k]); returns one value per k."""
    c = centers[None, :]
    lo_, hi_ = lo[:, None], hi[:, None]
    clipped = np.clip(c, lo_, hi_)
    clip_err = (c - clipped) ** 2
    spec = fmt.spec
    if spec.kind is FormatKind.FP8:
        mbits, emin = _FP8_MANTISSA[fmt]
        scale = np.maximum(np.maximum(np.abs(lo_), np.abs(hi_)), 1e-30) / fp8_max(fmt)
        v = np.maximum(np.abs(clipped) / scale, 2.0**emin)
        step = scale * 2.0 ** (np.floor(np.log2(v)) - mbits)
        round_err = step**2 / 12.0
    else:
        if spec.signed:
            amax = np.maximum(np.abs(lo_), np.abs(hi_))
            delta = 2 * amax / (spec.qmax - spec.qmin - 1)
        else:
            delta = (hi_ - lo_) / (spec.qmax - spec.qmin)
        round_err = delta**2 / 12.0
    inside = (c >= lo_) & (c <= hi_)
    err = np.where(inside, round_err, clip_err)
    return err @ counts


# Clipping ratios of the observed range: geometric below 0.2 for very heavy tails, linear above.
_ACT_RATIOS = np.unique(np.concatenate([np.geomspace(0.02, 0.2, 8), np.linspace(0.2, 1.0, 33)]))


def range_from_stats(st: TensorStats, fmt: Format,
                     method: RangeMethod = RangeMethod.MSE) -> tuple[float, float]:
    """The clipping range for an activation tensor in ``fmt``."""
    lo, hi = min(st.min, 0.0), max(st.max, 0.0)
    if method is RangeMethod.MINMAX or fmt.bits >= 16 or st.count == 0:
        return lo, hi
    counts, centers = st.hist, st.centers
    if method is RangeMethod.PERCENTILE:
        cdf = np.cumsum(counts) / max(counts.sum(), 1)
        plo = float(centers[np.searchsorted(cdf, 1e-4)]) if lo < 0 else 0.0
        phi = float(centers[min(np.searchsorted(cdf, 1 - 1e-4), len(centers) - 1)])
        return min(plo, 0.0), max(phi, 0.0)
    ratios = _ACT_RATIOS
    symmetric = fmt.spec.kind is FormatKind.FP8 or fmt.spec.signed
    if symmetric:
        amax = max(-lo, hi)
        los, his = -amax * ratios, amax * ratios
    elif lo < 0:
        rl, rh = np.meshgrid(ratios, ratios, indexing="ij")
        los, his = (lo * rl).ravel(), (hi * rh).ravel()
    else:
        los, his = np.zeros_like(ratios), hi * ratios
    err = _expected_error(centers, counts, los, his, fmt)
    k = int(np.argmin(err))
    return float(los[k]), float(his[k])


def activation_qparams(st: TensorStats, fmt: Format,
                       method: RangeMethod = RangeMethod.MSE) -> QParams:
    lo, hi = range_from_stats(st, fmt, method)
    return qparams_from_range(lo, hi, fmt)


_WEIGHT_RATIOS = np.linspace(0.3, 1.0, 71)


def weight_qparams(w: np.ndarray, fmt: Format, axis: int,
                   method: RangeMethod = RangeMethod.MSE) -> QParams:
    """Symmetric per-channel parameters for weight ``w`` with output channels on ``axis``."""
    spec = fmt.spec
    wc = np.moveaxis(np.asarray(w, np.float32), axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(wc).max(axis=1)
    top = fp8_max(fmt) if spec.kind is FormatKind.FP8 else float(spec.qmax)
    best = np.ones_like(amax)
    if method is RangeMethod.MSE and fmt.bits < 16:
        best_err = np.full_like(amax, np.inf, dtype=np.float64)
        for r in _WEIGHT_RATIOS:
            s = np.maximum(amax * r / top, 1e-30)
            q = quantize(wc, fmt, s, axis=0).astype(np.float32)
            err = ((q * s[:, None] - wc) ** 2).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, r, best)
    scale = (amax * best / top).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zdt = np.float32 if spec.kind is FormatKind.FP8 else np.int64
    return QParams(fmt=fmt, scale=scale, zero_point=np.zeros(scale.shape, zdt), axis=axis,
                   rmin=float(-amax.max(initial=0)), rmax=float(amax.max(initial=0)))


def constant_qparams(c: np.ndarray, fmt: Format) -> QParams:
    """Per-tensor min/max parameters for a constant input of an element-wise op."""
    c = np.asarray(c, np.float32)
    return qparams_from_range(float(c.min(initial=0)), float(c.max(initial=0)), fmt)


class RangeSetter:
    """Quantization parameters for one model and calibration, memoised per tensor and format.

    The exporter and the sensitivity estimators ask the same object, so what is scored is
    what is shipped."""

    def __init__(self, stats: Mapping[str, TensorStats], weights: Mapping[str, np.ndarray], *,
                 activation_method: RangeMethod = RangeMethod.MSE,
                 weight_method: RangeMethod = RangeMethod.MSE) -> None:
        self.stats = stats
        self.weights = weights
        self.activation_method = activation_method
        self.weight_method = weight_method
        self._act: dict[tuple[str, Format], QParams] = {}
        self._w: dict[tuple, tuple[QParams, np.ndarray]] = {}

    def activation(self, tensor: str, fmt: Format) -> QParams:
        key = (tensor, fmt)
        if key not in self._act:
            self._act[key] = activation_qparams(self.stats[tensor], fmt, self.activation_method)
        return self._act[key]

    def weight(self, name: str, fmt: Format, axis: int, *, bias: str | None = None,
               input_scale: float | None = None) -> tuple[QParams, np.ndarray]:
        """Per-channel parameters and the quantized values of initializer ``name``.

        With ``bias`` and ``input_scale``, channels whose int32 bias ``b / (s_x·s_w)`` would
        overflow get a larger weight scale (dead channels after BN folding: ``w ≈ 0``,
        ``b ≠ 0``), as ORT's quantizer does; their weights round to (almost) zero either way.
        """
        key = (name, fmt, axis, bias, input_scale)
        if key not in self._w:
            w = self.weights[name]
            qp = weight_qparams(w, fmt, axis, self.weight_method)
            if bias is not None and input_scale is not None:
                qp = _bias_safe(qp, self.weights[bias], input_scale)
            self._w[key] = (qp, quantize(w, fmt, qp.scale, qp.zero_point, axis=axis))
        return self._w[key]


INT32_BIAS_LIMIT = 2**31 - 1


def _bias_safe(qp: QParams, bias: np.ndarray, input_scale: float) -> QParams:
    floor = np.abs(bias.astype(np.float64)) / (float(input_scale) * INT32_BIAS_LIMIT) * 1.01
    if np.all(qp.scale >= floor):
        return qp
    scale = np.maximum(qp.scale.astype(np.float64), floor).astype(np.float32)
    return QParams(fmt=qp.fmt, scale=scale, zero_point=qp.zero_point, axis=qp.axis,
                   rmin=qp.rmin, rmax=qp.rmax)
