"""Hessian-compensated (GPTQ) rounding against round-to-nearest and a textbook OBS loop."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mpsearch.core.formats import Format, numpy_storage_dtype, quantize
from mpsearch.quant.rounding import _upper_inverse, hessian_round, output_error


def _correlated_h(rng: np.random.Generator, k: int, n: int, rho: float = 0.9) -> np.ndarray:
    """``H = X Xᵀ / N`` for inputs whose columns are AR(1)-correlated (neighbouring pixels)."""
    idx = np.arange(k)
    cov = rho ** np.abs(idx[:, None] - idx[None, :])
    x = np.linalg.cholesky(cov) @ rng.standard_normal((k, n))
    return x @ x.T / n


def _absmax_scale(rows: np.ndarray, fmt: Format, shrink: float = 1.0) -> np.ndarray:
    return (np.abs(rows).max(axis=2) / fmt.spec.qmax * shrink).astype(np.float32)


def _rtn(rows: np.ndarray, fmt: Format, scale: np.ndarray,
         zp: np.ndarray | None = None) -> np.ndarray:
    z = 0.0 if zp is None else zp[..., None].astype(np.float32)
    q = np.clip(np.rint(rows.astype(np.float32) / scale[..., None]) + z,
                fmt.spec.weight_qmin, fmt.spec.qmax)  # the symmetric weight grid
    return q.astype(numpy_storage_dtype(fmt))


def _error(q: np.ndarray, rows: np.ndarray, h: np.ndarray, scale: np.ndarray,
           zp: np.ndarray | None = None) -> float:
    z = 0.0 if zp is None else zp[..., None].astype(np.float32)
    deq = (q.astype(np.float32) - z) * scale[..., None]
    return float(output_error(deq - rows, h).sum())


def _obs_reference(rows: np.ndarray, h: np.ndarray, fmt: Format, scale: np.ndarray,
                   damp: float) -> np.ndarray:
    """One group, the Optimal Brain Surgeon update written out: after rounding column j,
    move the remaining columns F by ``-e / [H_F⁻¹]_00 · [H_F⁻¹]_{0,1:}``, with ``H_F⁻¹``
    recomputed as the inverse of the dampened Hessian restricted to the columns left."""
    w = rows[0].astype(np.float64).copy()
    hd = h[0] / np.mean(np.diag(h[0]))
    hd = hd + damp * np.eye(hd.shape[0])
    k = w.shape[1]
    q = np.empty(w.shape)
    s = scale[0]
    for j in range(k):
        qj = np.clip(np.rint(w[:, j].astype(np.float32) / s), fmt.spec.qmin, fmt.spec.qmax)
        q[:, j] = qj
        hinv = np.linalg.inv(hd[j:, j:])
        e = w[:, j] - (qj * s).astype(np.float32)
        w[:, j + 1 :] -= np.outer(e / hinv[0, 0], hinv[0, 1:])
    return q[None].astype(numpy_storage_dtype(fmt))


@pytest.mark.parametrize(("fmt", "margin"), [(Format.INT4, 0.8), (Format.INT8, 1.0)])
def test_beats_round_to_nearest_on_correlated_inputs(fmt: Format, margin: float) -> None:
    rng = np.random.default_rng(0)
    k, r = 48, 32
    h = _correlated_h(rng, k, 4 * k)[None]
    rows = rng.standard_normal((1, r, k)).astype(np.float32)
    scale = _absmax_scale(rows, fmt)
    q = hessian_round(rows, h, fmt, scale)
    assert q.dtype == numpy_storage_dtype(fmt)
    err_gptq = _error(q, rows, h, scale)
    err_rtn = _error(_rtn(rows, fmt, scale), rows, h, scale)
    assert err_gptq < margin * err_rtn
    q_ao = hessian_round(rows, h, fmt, scale, act_order=True)
    assert _error(q_ao, rows, h, scale) < margin * err_rtn


def test_matches_the_textbook_obs_loop_and_any_block_size() -> None:
    rng = np.random.default_rng(1)
    k, r = 20, 6
    h = _correlated_h(rng, k, 60, rho=0.7)[None]
    rows = rng.standard_normal((1, r, k)).astype(np.float32)
    scale = _absmax_scale(rows, Format.INT4)
    ref = _obs_reference(rows, h, Format.INT4, scale, damp=0.01)
    for block in (1, 3, 7, 128):
        np.testing.assert_array_equal(hessian_round(rows, h, Format.INT4, scale, block=block),
                                      ref)


@pytest.mark.parametrize("fmt", [Format.INT4, Format.INT8, Format.UINT8, Format.INT16])
def test_diagonal_hessian_is_round_to_nearest(fmt: Format) -> None:
    rng = np.random.default_rng(2)
    g, r, k = 3, 5, 30
    rows = rng.standard_normal((g, r, k)).astype(np.float32)
    h = np.zeros((g, k, k))
    h[:, np.arange(k), np.arange(k)] = rng.uniform(0.0, 3.0, (g, k))
    h[0, 4, 4] = 0.0  # a dead input
    scale = _absmax_scale(rows, fmt, shrink=0.7)
    zp = (np.full((g, r), 128, dtype=np.int32) if fmt is Format.UINT8 else None)
    q = hessian_round(rows, h, fmt, scale, zp)
    np.testing.assert_array_equal(q, _rtn(rows, fmt, scale, zp))
    # the same as formats.quantize, per row (axis 0 of a 2-D weight)
    flat = quantize(rows.reshape(g * r, k), fmt, scale.reshape(-1),
                    0 if zp is None else zp.reshape(-1), axis=0, weight=True)
    np.testing.assert_array_equal(q.reshape(g * r, k), flat)


def test_singular_hessian_gives_finite_integers_in_range() -> None:
    rng = np.random.default_rng(3)
    k, r = 16, 8
    x = rng.standard_normal((k, 50))
    x[3] = 0.0  # dead input (zero padding)
    x[7] = x[5]  # duplicated im2col column
    x[9] = 1.0  # constant column
    h = (x @ x.T / 50)[None]
    rows = rng.standard_normal((1, r, k)).astype(np.float32)
    fmt = Format.INT4
    scale = _absmax_scale(rows, fmt)
    for damp in (0.01, 0.0):
        q = hessian_round(rows, h, fmt, scale, damp=damp)
        assert q.shape == rows.shape
        assert q.min() >= fmt.spec.qmin and q.max() <= fmt.spec.qmax
    q = hessian_round(rows, h, fmt, scale)
    np.testing.assert_array_equal(q[..., 3], _rtn(rows, fmt, scale)[..., 3])  # dead: RTN
    assert _error(q, rows, h, scale) < _error(_rtn(rows, fmt, scale), rows, h, scale)
    # a Hessian of zeros (a layer that never saw an input) is round-to-nearest
    q0 = hessian_round(rows, np.zeros((1, k, k)), fmt, scale)
    np.testing.assert_array_equal(q0, _rtn(rows, fmt, scale))


def test_not_positive_definite_group_falls_back_to_round_to_nearest(
        caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(4)
    g, r, k = 3, 4, 10
    rows = rng.standard_normal((g, r, k)).astype(np.float32)
    h = np.stack([_correlated_h(rng, k, 40) for _ in range(g)])
    h[1] = np.eye(k)  # not a second moment: eigenvalue -1 that no dampening lifts
    h[1, 0, 1] = h[1, 1, 0] = 2.0
    scale = _absmax_scale(rows, Format.INT4)
    with caplog.at_level(logging.DEBUG, logger="mpsearch.quant.rounding"):
        q = hessian_round(rows, h, Format.INT4, scale)
    assert "1 of 3 groups" in caplog.text
    np.testing.assert_array_equal(q[1], _rtn(rows, Format.INT4, scale)[1])
    np.testing.assert_array_equal(q[0], hessian_round(rows[:1], h[:1], Format.INT4, scale[:1])[0])


def test_batched_groups_equal_separate_groups() -> None:
    rng = np.random.default_rng(5)
    g, r, k = 6, 2, 9  # depthwise-like: a 3x3 kernel per channel
    rows = rng.standard_normal((g, r, k)).astype(np.float32)
    h = np.stack([_correlated_h(rng, k, 30, rho=0.5 + 0.08 * i) for i in range(g)])
    scale = _absmax_scale(rows, Format.INT4)
    for act_order in (False, True):
        batched = hessian_round(rows, h, Format.INT4, scale, act_order=act_order)
        for i in range(g):
            one = hessian_round(rows[i : i + 1], h[i : i + 1], Format.INT4, scale[i : i + 1],
                                act_order=act_order)
            np.testing.assert_array_equal(batched[i], one[0])


def test_scale_of_hessian_does_not_matter() -> None:
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((1, 5, 12)).astype(np.float32)
    h = _correlated_h(rng, 12, 40)[None]
    scale = _absmax_scale(rows, Format.INT4)
    np.testing.assert_array_equal(hessian_round(rows, h, Format.INT4, scale),
                                  hessian_round(rows, h * 1024.0, Format.INT4, scale))


def test_heavy_clipping_stays_in_range_and_no_worse_than_rtn() -> None:
    rng = np.random.default_rng(7)
    k, r = 32, 16
    h = _correlated_h(rng, k, 128)[None]
    rows = rng.standard_normal((1, r, k)).astype(np.float32)
    for fmt in (Format.INT4, Format.INT8):
        scale = _absmax_scale(rows, fmt, shrink=0.2)  # most large weights clip
        rtn = _rtn(rows, fmt, scale)
        assert np.mean((rtn == fmt.spec.qmin) | (rtn == fmt.spec.qmax)) > 0.2
        q = hessian_round(rows, h, fmt, scale)
        assert q.min() >= fmt.spec.qmin and q.max() <= fmt.spec.qmax
        assert _error(q, rows, h, scale) <= 1.001 * _error(rtn, rows, h, scale)


def test_output_error_is_the_expected_squared_output_error() -> None:
    rng = np.random.default_rng(8)
    g, r, k, n = 2, 3, 5, 7
    delta = rng.standard_normal((g, r, k))
    x = rng.standard_normal((g, k, n))
    h = x @ x.transpose(0, 2, 1) / n
    direct = ((delta @ x) ** 2).sum(axis=(1, 2)) / n
    np.testing.assert_allclose(output_error(delta, h), direct, rtol=1e-12)


def test_rejects_float_formats_and_bad_shapes() -> None:
    rows = np.ones((1, 2, 3), dtype=np.float32)
    h = np.eye(3)[None]
    scale = np.ones((1, 2), dtype=np.float32)
    for fmt in (Format.FP8_E4M3, Format.FP16, Format.FLOAT):
        with pytest.raises(ValueError, match="integer format"):
            hessian_round(rows, h, fmt, scale)
    with pytest.raises(ValueError, match="h must be"):
        hessian_round(rows, np.eye(2)[None], Format.INT8, scale)
    with pytest.raises(ValueError, match="scale must be"):
        hessian_round(rows, h, Format.INT8, np.zeros((1, 2), dtype=np.float32))


@pytest.mark.parametrize("k", [5, 64, 65, 200])
def test_triangular_inverse_by_halves_equals_lapack(k: int) -> None:
    rng = np.random.default_rng(7)
    h = np.stack([_correlated_h(rng, k, 3 * k, rho=0.6) for _ in range(3)])
    v = np.linalg.cholesky(h)[:, ::-1, ::-1].transpose(0, 2, 1)  # upper, as GPTQ has it
    got = _upper_inverse(v)
    ref = np.triu(np.linalg.inv(v))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    assert np.array_equal(got, np.triu(got))
