"""OBS (SparseGPT) pruning of one layer against magnitude pruning, its patterns and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Format, Sparsity, parse_candidate
from mpsearch.core.ops import OpRole
from mpsearch.graph.layer_graph import Layer
from mpsearch.graph.layer_hessian import LayerHessian
from mpsearch.graph.ranges import weight_qparams
from mpsearch.quant.prune import (
    PrunedLayer,
    PruneMethod,
    PruneRefused,
    prune_layer,
)

S24 = parse_candidate("w8a8+2:4").sparsity


def _unstructured(zeros: float) -> Sparsity:
    return Sparsity(pattern="unstructured", density=1 - zeros)


def _channels(zeros: float) -> Sparsity:
    return Sparsity(pattern="channel", density=1 - zeros)


def _gemm(n_out: int, k: int, *, channel_axis: int = 0) -> Layer:
    shape = (n_out, k) if channel_axis == 0 else (k, n_out)
    return Layer(name="fc", op_type="Gemm", role=OpRole.LAYER, inputs=("x",), output="y",
                 weight="w", weight_shape=shape, channel_axis=channel_axis)


def _conv(cout: int, cin: int, kernel: int, groups: int = 1) -> Layer:
    return Layer(name="conv", op_type="Conv", role=OpRole.LAYER, inputs=("x",), output="y",
                 weight="w", weight_shape=(cout, cin // groups, kernel, kernel),
                 channel_axis=0, conv_groups=groups)


def _correlated(rng: np.random.Generator, k: int, n: int, g: int = 1,
                rho: float = 0.9) -> np.ndarray:
    """``(G, N, K)`` inputs whose columns are AR(1)-correlated (neighbouring pixels), with
    different energies per column and a non-zero mean."""
    idx = np.arange(k)
    chol = np.linalg.cholesky(rho ** np.abs(idx[:, None] - idx[None, :]))
    z = rng.standard_normal((g, n, k)) @ chol.T
    return z * rng.uniform(0.3, 2.0, (g, 1, k)) + 0.2


def _hessian(x: np.ndarray) -> LayerHessian:
    """``E[x xᵀ]`` per group of ``x`` (G, N, K), as :mod:`mpsearch.graph.layer_hessian` collects
    it."""
    n = x.shape[1]
    return LayerHessian(second=np.einsum("gnk,gnl->gkl", x, x) / n, mean=x.mean(axis=1),
                        positions=1.0, rows_seen=n, dense=True)


def _ok(res: PrunedLayer | PruneRefused) -> PrunedLayer:
    assert isinstance(res, PrunedLayer), res
    return res


def _nm_groups(w_conv: np.ndarray) -> np.ndarray:
    """A conv weight (C_out, C_in, kh, kw) as groups of 4 input channels at each kernel offset
    (C_out, kh, kw, C_in/4, 4): what a sparse tensor core reads (apex ASP's layout)."""
    co, ci, kh, kw = w_conv.shape
    return np.moveaxis(w_conv, 1, -1).reshape(co, kh, kw, ci // 4, 4)


@pytest.mark.parametrize("method", [PruneMethod.OBS, PruneMethod.MAGNITUDE])
def test_2_4_keeps_at_most_two_in_four_input_channels(method: PruneMethod) -> None:
    rng = np.random.default_rng(0)
    fc = _gemm(12, 32)
    w = rng.standard_normal((12, 32)).astype(np.float32)
    res = _ok(prune_layer(fc, w, S24, hessian=_hessian(_correlated(rng, 32, 256)),
                          method=method))
    nz = (res.weight != 0).reshape(12, 8, 4).sum(axis=2)
    assert nz.max() <= 2 and res.zero_fraction == 0.5
    assert np.array_equal(res.mask, res.weight != 0)

    conv = _conv(8, 8, 3)  # K = 8·9 = 72 im2col columns, channel-major
    wc = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    rc = _ok(prune_layer(conv, wc, S24, hessian=_hessian(_correlated(rng, 72, 512)),
                         method=method))
    assert (_nm_groups(rc.weight) != 0).sum(axis=-1).max() <= 2
    assert rc.zero_fraction == 0.5
    # the groups run over input channels, not over consecutive im2col columns (kernel taps)
    taps = (rc.weight.reshape(8, -1) != 0).reshape(8, 18, 4).sum(axis=2)
    assert taps.max() > 2


def test_2_4_on_a_kxk_conv_runs_obs_in_tap_major_order() -> None:
    rng = np.random.default_rng(7)
    conv = _conv(6, 8, 3)
    wc = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    x = _correlated(rng, 72, 1000)
    h = _hessian(x)
    obs = _ok(prune_layer(conv, wc, S24, hessian=h))
    mag = _ok(prune_layer(conv, wc, S24, hessian=h, method=PruneMethod.MAGNITUDE))
    d = (obs.weight - wc).reshape(6, -1).astype(np.float64)
    assert obs.predicted_error == pytest.approx(((x[0] @ d.T) ** 2).sum() / 1000, rel=1e-6)
    assert obs.predicted_error < 0.6 * mag.predicted_error


def test_2_4_pads_a_short_channel_group_and_refuses_depthwise() -> None:
    rng = np.random.default_rng(1)
    conv = _conv(4, 6, 1)  # 6 input channels: groups {0..3} and {4, 5, pad, pad}
    w = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    res = _ok(prune_layer(conv, w, S24, hessian=_hessian(_correlated(rng, 6, 64))))
    nz = res.weight[:, :, 0, 0] != 0
    assert (nz[:, :4].sum(axis=1) == 2).all() and nz[:, 4:].all()

    dw = _conv(8, 8, 3, groups=8)
    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    refused = prune_layer(dw, wd, S24, hessian=_hessian(_correlated(rng, 9, 64, g=8)))
    assert isinstance(refused, PruneRefused) and not refused
    assert "1 per group" in refused.reason
    stem = prune_layer(_conv(8, 3, 3), rng.standard_normal((8, 3, 3, 3)), S24, hessian=None)
    assert isinstance(stem, PruneRefused)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("method", list(PruneMethod))
def test_unstructured_fractions_are_exact(ratio: float, method: PruneMethod) -> None:
    rng = np.random.default_rng(2)
    fc = _gemm(24, 200)  # 200 columns: two blocks of 128 and 72
    w = rng.standard_normal((24, 200)).astype(np.float32)
    res = _ok(prune_layer(fc, w, _unstructured(ratio),
                          hessian=_hessian(_correlated(rng, 200, 800)), method=method))
    assert res.method is method and res.fallback is None
    assert (res.weight == 0).sum() == round(ratio * w.size) == (~res.mask).sum()
    # a depthwise conv: 8 groups of K = 9, the count is the layer's, not each group's
    dw = _conv(8, 8, 3, groups=8)
    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    rd = _ok(prune_layer(dw, wd, _unstructured(ratio),
                         hessian=_hessian(_correlated(rng, 9, 64, g=8)), method=method))
    assert (rd.weight == 0).sum() == round(ratio * 72)


@pytest.mark.parametrize("sparsity", [_unstructured(0.5), _unstructured(0.75),
                                      S24])
def test_obs_beats_magnitude_and_predicts_the_measured_error(sparsity: Sparsity) -> None:
    rng = np.random.default_rng(3)
    k, r, n = 64, 32, 2000
    x = _correlated(rng, k, n)
    fc = _gemm(r, k, channel_axis=1)  # a MatMul-style (K, N) weight
    w = (rng.standard_normal((k, r)) * 0.1).astype(np.float32)
    h = _hessian(x)

    def measured(res: PrunedLayer) -> float:
        d = (res.weight.astype(np.float64) - w).T  # (R, K)
        return float(((x[0] @ d.T) ** 2).sum() / n)  # ‖(W - Ŵ) X‖² per sample

    obs = _ok(prune_layer(fc, w, sparsity, hessian=h))
    mag = _ok(prune_layer(fc, w, sparsity, hessian=h, method=PruneMethod.MAGNITUDE))
    assert obs.method is PruneMethod.OBS and obs.error_exact
    assert measured(obs) < 0.6 * measured(mag)
    assert obs.predicted_error == pytest.approx(measured(obs), rel=1e-6)
    assert mag.predicted_error == pytest.approx(measured(mag), rel=1e-6)
    assert obs.mean_shift.shape == (r,)
    assert obs.mean_shift == pytest.approx(((obs.weight - w).T @ x[0].mean(0)), abs=1e-6)


def test_joint_pruning_and_quantization() -> None:
    rng = np.random.default_rng(4)
    k, r = 48, 16
    x = _correlated(rng, k, 1000)
    fc = _gemm(r, k)
    w = rng.standard_normal((r, k)).astype(np.float32)
    qp = weight_qparams(w, Format.INT4, 0)
    h = _hessian(x)
    obs = _ok(prune_layer(fc, w, _unstructured(0.5), hessian=h, fmt=Format.INT4,
                          qparams=qp))
    mag = _ok(prune_layer(fc, w, _unstructured(0.5), hessian=h, fmt=Format.INT4,
                          qparams=qp, method=PruneMethod.MAGNITUDE))
    for res in (obs, mag):
        assert res.values is not None and res.values.dtype == np.int8
        assert np.array_equal(res.values == 0, ~res.mask | (res.values == 0))
        assert (res.values[~res.mask] == 0).all()
        deq = res.values.astype(np.float32) * qp.scale[:, None]
        assert np.array_equal(deq, res.weight)
    assert obs.predicted_error < 0.6 * mag.predicted_error
    dense = _ok(prune_layer(fc, w, None, hessian=h, fmt=Format.INT4, qparams=qp))
    assert dense.zero_fraction < 0.2 and dense.predicted_error < obs.predicted_error


def test_channel_pruning_zeroes_whole_rows_by_hessian_energy() -> None:
    rng = np.random.default_rng(5)
    conv = _conv(8, 8, 1, groups=2)  # a grouped conv: 2 groups of 4 channels
    w = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    x = _correlated(rng, 4, 400, g=2)
    x[1] *= 0.01  # the second group's inputs are tiny: its channels carry little
    w[1] *= 0.2  # and one small channel in the first
    res = _ok(prune_layer(conv, w, _channels(0.5), hessian=_hessian(x)))
    assert res.channels.tolist() == [4, 5, 6, 7]
    assert (res.weight[4:] == 0).all() and (res.weight[:4] == w[:4]).all()
    assert res.mask.reshape(8, -1).all(axis=1).sum() == 4
    mag = _ok(prune_layer(conv, w, _channels(0.25), hessian=None))
    assert mag.method is PruneMethod.MAGNITUDE and 1 in mag.channels.tolist()
    assert mag.predicted_error is None

    dw = _conv(8, 8, 3, groups=8)
    refused = prune_layer(dw, rng.standard_normal((8, 1, 3, 3)), _channels(0.25),
                          hessian=None)
    assert isinstance(refused, PruneRefused) and "depthwise" in refused.reason


def test_fallbacks_say_why() -> None:
    rng = np.random.default_rng(6)
    fc = _gemm(8, 32)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    x = _correlated(rng, 32, 40)  # 40 rows for 32 inputs: fewer than 2 per input
    few = _ok(prune_layer(fc, w, _unstructured(0.5), hessian=_hessian(x)))
    assert few.method is PruneMethod.DIAGONAL and "noise" in few.fallback
    assert few.error_exact
    full = _hessian(_correlated(rng, 32, 400))
    diag = LayerHessian(second=full.diagonal(), mean=full.mean, positions=1.0,
                        rows_seen=400, dense=False)
    d = _ok(prune_layer(fc, w, _unstructured(0.5), hessian=diag))
    assert d.method is PruneMethod.DIAGONAL and "diagonal-only" in d.fallback
    assert not d.error_exact and d.predicted_error > 0
    none = _ok(prune_layer(fc, w, _unstructured(0.5), hessian=None))
    assert none.method is PruneMethod.MAGNITUDE and none.predicted_error is None


def test_candidate_sparsities_are_read_and_checked() -> None:
    rng = np.random.default_rng(8)
    fc = _gemm(8, 16)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    for text, zeros in (("w4a8+unstructured@0.25", 96), ("w8a8+channel@0.75", 32),
                        ("w8a8+unstructured@1", 0)):
        res = _ok(prune_layer(fc, w, parse_candidate(text).sparsity, hessian=None))
        assert (res.weight == 0).sum() == zeros
    for bad in (Sparsity(pattern="block", density=0.5), Sparsity(pattern="2:4", density=0.25),
                Sparsity(pattern="unstructured", density=0.0)):
        with pytest.raises(UsageError):
            prune_layer(fc, w, bad, hessian=None)
