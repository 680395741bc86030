"""Number formats and range setting: measured error properties."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Candidate, Format, fake_quant, parse_candidate, quantize
from mpsearch.graph.calibrate import RangeCollector
from mpsearch.graph.ranges import (
    RangeMethod,
    activation_qparams,
    qparams_from_range,
    range_from_stats,
    weight_qparams,
)


@pytest.mark.parametrize("fmt", [Format.UINT8, Format.INT8, Format.UINT16, Format.INT16])
def test_integer_error_is_at_most_half_a_step_inside_the_range(fmt):
    x = np.random.default_rng(0).uniform(-3, 5, 100_000).astype(np.float32)
    qp = qparams_from_range(-3, 5, fmt)
    err = np.abs(fake_quant(x, fmt, qp.scale, qp.zero_point) - x)
    inside = (x >= qp.rmin) & (x <= qp.rmax)
    # half a step, plus float32 rounding of x/s (matters at 16 bits)
    assert err[inside].max() <= qp.scale / 2 + 4 * np.spacing(np.float32(5))
    assert qp.zero_point.dtype.kind == "i"
    # zero is exact
    assert fake_quant(np.zeros(1, np.float32), fmt, qp.scale, qp.zero_point)[0] == 0


def test_int4_weights_use_a_symmetric_grid():
    assert (Format.INT4.spec.qmin, Format.INT4.spec.qmax) == (-8, 7)
    w = np.linspace(-1, 1, 1001, dtype=np.float32).reshape(1, -1)
    qp = weight_qparams(w, Format.INT4, 0, RangeMethod.MINMAX)
    q = quantize(w, Format.INT4, qp.scale, axis=0)
    assert q.min() == -7 and q.max() == 7


@pytest.mark.parametrize("fmt,dt", [(Format.FP8_E4M3, ml_dtypes.float8_e4m3fn),
                                    (Format.FP8_E5M2, ml_dtypes.float8_e5m2)])
def test_fp8_matches_ml_dtypes_rounding(fmt, dt):
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 3
    s = np.float32(0.01)
    got = fake_quant(x, fmt, s)
    clipped = np.clip(x / s, -float(ml_dtypes.finfo(dt).max), float(ml_dtypes.finfo(dt).max))
    np.testing.assert_array_equal(got, clipped.astype(dt).astype(np.float32) * s)


def test_fp16_is_a_cast():
    x = np.float32([1.0001, 65504.0, 1e-8])
    np.testing.assert_array_equal(fake_quant(x, Format.FP16), x.astype(np.float16))


def test_parse_candidates():
    assert parse_candidate("w4a16") == Candidate(weight=Format.INT4, activation=Format.UINT16)
    assert parse_candidate("fp8").weight is Format.FP8_E4M3
    assert parse_candidate("W:INT8/A:INT8") == Candidate(weight=Format.INT8,
                                                         activation=Format.INT8)
    for c in ("w8a8", "w8a16", "w4a8", "w16a16", "fp16", "fp8", "float", "w:int8/a:int8",
              "w:int4/a:fp16", "fp8e5m2"):
        assert parse_candidate(c).name == c
        assert parse_candidate(parse_candidate(c).name) == parse_candidate(c)
    with pytest.raises(UsageError, match="w2a8"):
        parse_candidate("w2a8")


def _stats(x: np.ndarray):
    rc = RangeCollector(["t"])
    for chunk in np.array_split(x, 4):  # several batches: the histogram must grow correctly
        rc.update({"t": chunk})
    return rc.result()["t"]


def test_histogram_grows_without_losing_mass():
    x = np.concatenate([np.random.default_rng(2).standard_normal(50_000),
                        np.random.default_rng(3).standard_normal(50_000) * 10])
    st = _stats(x.astype(np.float32))
    assert st.hist.sum() == pytest.approx(x.size, rel=1e-9)
    assert st.min == pytest.approx(x.min(), rel=1e-6) and st.max == pytest.approx(x.max(),
                                                                                  rel=1e-6)


def test_mse_range_beats_minmax_on_heavy_tails():
    rng = np.random.default_rng(4)
    x = rng.laplace(size=200_000).astype(np.float32)
    st = _stats(x)
    errs = {}
    for m in RangeMethod:
        qp = activation_qparams(st, Format.UINT8, m)
        errs[m] = float(((fake_quant(x, Format.UINT8, qp.scale, qp.zero_point) - x) ** 2).mean())
    assert errs[RangeMethod.MSE] < 0.85 * errs[RangeMethod.MINMAX]  # measured: 0.77
    assert errs[RangeMethod.MSE] <= errs[RangeMethod.PERCENTILE] * 1.05
    # 16-bit grids keep the full range, with headroom for held-out data
    assert range_from_stats(st, Format.UINT16) == (pytest.approx(1.5 * min(x.min(), 0)),
                                                   pytest.approx(1.5 * x.max()))
    assert range_from_stats(st, Format.UINT16, RangeMethod.MINMAX) == (
        pytest.approx(min(x.min(), 0)), pytest.approx(x.max()))


def test_relu_output_keeps_zero_at_the_bottom():
    x = np.maximum(np.random.default_rng(5).standard_normal(50_000), 0).astype(np.float32)
    lo, hi = range_from_stats(_stats(x), Format.UINT8)
    assert lo == 0 and 0 < hi <= x.max()


@pytest.mark.parametrize("fmt", [Format.INT4, Format.INT8, Format.FP8_E4M3])
def test_mse_weight_scales_never_lose_to_minmax_per_channel(fmt):
    rng = np.random.default_rng(6)
    w = rng.standard_t(df=3, size=(16, 64)).astype(np.float32)
    def err(qp):
        return ((fake_quant(w, fmt, qp.scale, axis=0, weight=True) - w) ** 2).sum(axis=1)
    e_mse = err(weight_qparams(w, fmt, 0, RangeMethod.MSE))
    e_mm = err(weight_qparams(w, fmt, 0, RangeMethod.MINMAX))
    assert np.all(e_mse <= e_mm * (1 + 1e-6))
    if fmt is Format.INT4:  # measured 0.90 on the symmetric grid [-7, 7]
        assert e_mse.sum() < 0.92 * e_mm.sum()


def test_a_clip_output_range_never_passes_its_limits(tmp_path):
    """16-bit ranges get 50% headroom, but not past what the op can output: the hard-swish's
    Clip(0, 6) gets [0, 6] in uint16 and int16, not [0, 9] (the HTP clamps a Clip to its
    output encoding: tests/test_verify.py); a range from the statistics alone would pass 6."""
    from models import hardswish, images

    from mpsearch import analyze, open_dataset
    from mpsearch.graph.ranges import activation_qparams

    model = hardswish()
    np.savez(tmp_path / "c.npz", x=2 * images(16, seed=1))
    a = analyze(model, open_dataset(tmp_path / "c.npz", model))
    assert a.ranges.bounds["k"] == (0.0, 6.0)
    for fmt in (Format.UINT16, Format.INT16, Format.UINT8):
        assert a.ranges.activation("k", fmt).rmax <= 6.0 + 1e-6
    assert activation_qparams(a.ranges.stats["k"], Format.UINT16).rmax > 6.0 + 1e-3
