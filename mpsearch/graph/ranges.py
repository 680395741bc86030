"""Range setting: from calibration statistics and weights to quantization parameters.

Activations (per tensor) are set from the calibration histogram. ``mse`` (the default, as the
white paper recommends, Nagel et al. 2021 §3.3) minimises the expected squared error
``Σ_bins n_i · e(c_i)`` over a grid of clipping ranges (ratios 0.02-1 of the observed range,
each side separately for asymmetric formats), where inside the range
``e = Δ²/12`` for an integer grid of step ``Δ`` (for FP8 the local step of the value's binade,
``Δ(v) = s · 2^(max(⌊log2|v/s|⌋, e_min) - m)``) and outside it the clipping error
``(c - clip(c))²``. ``minmax`` takes the observed range; ``percentile`` clips both tails
at 99.99%. Every range contains zero, so zero is exactly representable.

16-bit grids under ``mse`` take the observed range widened by 50% (``HEADROOM_16BIT``): their
rounding noise is ~90 dB down, so clipping of held-out values beyond the calibration range is
the only error that matters. Measured on held-out data (w16a16): EfficientNet-Lite0
47.1 -> 65.5 dB, the MNIST CNN 46.6 -> 86.3 dB; the margin costs 3.5 dB of rounding SQNR.

Weights are symmetric per output channel. ``mse`` picks, per channel, the clipping ratio
``r ∈ [0.3, 1]`` of ``max|w|`` that minimises ``‖w - Q(w)‖²`` with round-to-nearest, searched
coarse to fine (to 0.01); 16-bit grids use ``r = 1`` (rounding noise is negligible there).
No channel's scale is below ``2^-16`` of the layer's largest (``WEIGHT_SCALE_FLOOR``): a channel
left nearly dead by batch-norm folding (weights ~1e-9 beside ~1e-2) would otherwise get a scale
near 1e-11, which QNN's HTP does not compute (its output there is tens, where the CPU EP gives
the bias, ~0). Measured on the zoo's PaddleOCR detector, its depthwise 5x5 conv with three such
channels, w8a16 HTP against the CPU EP: 11.8 dB as exported, 78.0 dB with the floor (and with
a floor of 2^-20, still 11.8 dB). Its weights round to zero either way on the CPU.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from mpsearch.core.formats import Format, FormatKind, fp8_max, quantize
from mpsearch.graph.calibrate import TensorStats
from mpsearch.graph.ingest import scalar_value
from mpsearch.graph.layer_graph import LayerGraph

__all__ = ["QParams", "RangeMethod", "activation_qparams", "constant_qparams", "output_bounds",
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


HEADROOM_16BIT = 1.5
WEIGHT_SCALE_FLOOR = 2.0**-16  # x the layer's largest channel scale
_SEARCH_BINS = 512

# Clipping ratios of the observed range: geometric below 0.2 for very heavy tails, linear above.
_ACT_RATIOS = np.unique(np.concatenate([np.geomspace(0.02, 0.2, 8), np.linspace(0.2, 1.0, 33)]))


def range_from_stats(st: TensorStats, fmt: Format,
                     method: RangeMethod = RangeMethod.MSE) -> tuple[float, float]:
    """The clipping range for an activation tensor in ``fmt``."""
    lo, hi = min(st.min, 0.0), max(st.max, 0.0)
    if method is RangeMethod.MINMAX or st.count == 0:
        return lo, hi
    if fmt.bits >= 16:
        return lo * HEADROOM_16BIT, hi * HEADROOM_16BIT
    counts, centers = st.hist, st.centers
    if method is RangeMethod.MSE and len(counts) > _SEARCH_BINS:
        # the grid search runs on a coarser histogram: 4x faster, ranges to 1/512 of the span
        k = len(counts) // _SEARCH_BINS
        counts = counts.reshape(_SEARCH_BINS, k).sum(axis=1)
        centers = centers.reshape(_SEARCH_BINS, k).mean(axis=1)
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


def activation_qparams(st: TensorStats, fmt: Format, method: RangeMethod = RangeMethod.MSE,
                       bounds: tuple[float, float] | None = None) -> QParams:
    """``st``'s range in ``fmt``, kept within ``bounds`` (the interval the producing op's
    values lie in, :func:`output_bounds`; zero stays inside)."""
    lo, hi = range_from_stats(st, fmt, method)
    if bounds is not None:
        lo, hi = max(lo, min(bounds[0], 0.0)), min(hi, max(bounds[1], 0.0))
    return qparams_from_range(lo, hi, fmt)


def output_bounds(lg: LayerGraph) -> dict[str, tuple[float, float]]:
    """Tensor -> the interval its producer's values lie in, where the op itself bounds them: a
    Clip with constant limits, the registry's ``bounds`` (Sigmoid's [0, 1], Tanh's [-1, 1],
    :mod:`mpsearch.core.ops`). An activation range is never wider than
    this: the 16-bit headroom (module docstring) would otherwise take a ReLU6 to [0, 9], and
    a Clip whose output encoding reaches past its limit is not computed alike everywhere (QNN's
    HTP clamps a uint16 Clip to its output encoding, not to 6: a hard-swish loses 15-25 dB
    against the CPU EP; tests/test_verify.py)."""
    values = {t.name: t for t in lg.model.graph.initializer}

    def scalar(name: str) -> float | None:
        return scalar_value(values, name)

    out: dict[str, tuple[float, float]] = {}
    for name in lg.order:
        n = lg.nodes[name]
        if n.op_type == "Clip":
            attrs = {a.name: a.f for a in n.attribute if a.name in ("min", "max")}
            lo = scalar(n.input[1]) if len(n.input) > 1 and n.input[1] else attrs.get("min")
            hi = scalar(n.input[2]) if len(n.input) > 2 and n.input[2] else attrs.get("max")
            if lo is not None or hi is not None:
                out[n.output[0]] = (-math.inf if lo is None else lo,
                                    math.inf if hi is None else hi)
        elif (info := lg.op_info(name)) is not None and info.bounds is not None:
            out[n.output[0]] = info.bounds
    return out


_COARSE_RATIOS = np.linspace(0.3, 1.0, 15)
_FINE_OFFSETS = np.linspace(-0.05, 0.05, 11)


def _channel_errors(wc: np.ndarray, fmt: Format, amax: np.ndarray, ratio: np.ndarray,
                    top: float, imp: np.ndarray | None) -> np.ndarray:
    s = np.maximum(amax * ratio / top, 1e-30)
    spec = fmt.spec
    if spec.kind is FormatKind.INT:  # what quantize() computes, without its integer casts
        q = np.rint(wc / s.astype(np.float32)[:, None])
        np.clip(q, spec.weight_qmin, spec.qmax, out=q)
    else:
        q = quantize(wc, fmt, s, axis=0).astype(np.float32)
    err = (q * s[:, None] - wc) ** 2
    return (err if imp is None else err * imp).sum(axis=1)


def weight_qparams(w: np.ndarray, fmt: Format, axis: int,
                   method: RangeMethod = RangeMethod.MSE, *,
                   importance: np.ndarray | None = None) -> QParams:
    """Symmetric per-channel parameters for weight ``w`` with output channels on ``axis``.

    ``mse`` searches the clipping ratio per channel coarse to fine: 15 ratios in [0.3, 1], then
    11 around each channel's best in steps of 0.01. ``importance`` (the weight's shape) weights
    each element's squared error, e.g. by ``E[x²]`` of its input (:mod:`mpsearch.quant.layer`)."""
    spec = fmt.spec
    wc = np.moveaxis(np.asarray(w, np.float32), axis, 0).reshape(w.shape[axis], -1)
    imp = None
    if importance is not None:
        imp = np.moveaxis(np.asarray(importance, np.float32), axis, 0).reshape(wc.shape)
    amax = np.abs(wc).max(axis=1)
    top = fp8_max(fmt) if spec.kind is FormatKind.FP8 else float(spec.qmax)
    best = np.ones_like(amax)
    if method is RangeMethod.MSE and fmt.bits < 16:
        best_err = _channel_errors(wc, fmt, amax, best, top, imp)
        # fp8 is a relative format: clipping gains little and each cast is slow, so coarse only
        passes = (None,) if spec.kind is FormatKind.FP8 else (None, _FINE_OFFSETS)
        for grid in passes:
            ratios = _COARSE_RATIOS if grid is None else grid
            center = best.copy()
            for r in ratios:
                ratio = np.full_like(amax, r) if grid is None else np.clip(center + r, 0.05, 1.0)
                err = _channel_errors(wc, fmt, amax, ratio, top, imp)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best = np.where(better, ratio, best)
    scale = (amax * best / top).astype(np.float32)
    if np.any(scale > 0):  # nearly dead channels: no scale below the floor (module docstring)
        scale = np.maximum(scale, np.float32(scale.max() * WEIGHT_SCALE_FLOOR))
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zdt = np.float32 if spec.kind is FormatKind.FP8 else np.int64
    return QParams(fmt=fmt, scale=scale, zero_point=np.zeros(scale.shape, zdt), axis=axis,
                   rmin=float(-amax.max(initial=0)), rmax=float(amax.max(initial=0)))


def constant_qparams(c: np.ndarray, fmt: Format) -> QParams:
    """Per-tensor min/max parameters for a constant input of an element-wise op."""
    c = np.asarray(c, np.float32)
    return qparams_from_range(float(c.min(initial=0)), float(c.max(initial=0)), fmt)
