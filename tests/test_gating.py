"""Bayesian-Bits gating of one layer: known optimal bit-widths, pruned dead channels, the
exact minimiser against brute force, determinism and a monotone λ sweep."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mpsearch.core.errors import UsageError
from mpsearch.graph.layer_hessian import LayerHessian
from mpsearch.quant.gating import LEVELS, GateSearch, prepare, read_out, sweep, train


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _on_grid(rows: int, k: int, bits: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weights exactly on the ``bits``-bit grid of ranges ``m`` (returned with them)."""
    rng = np.random.default_rng(seed)
    top = 2 ** (bits - 1) - 1
    ints = rng.integers(-top, top + 1, (rows, k))
    m = rng.uniform(0.5, 2.0, rows)
    return ints * (2 * m / (2**bits - 1))[:, None], m


def _objective(layer, cfg, lam: float) -> float:
    return cfg.error + lam * cfg.cost / layer.full_cost


def _brute_bits(layer, lam: float) -> int:
    """argmin over the bit-widths, every channel kept."""
    keep = np.ones(layer.channels, bool)
    return min(layer.levels, key=lambda b: _objective(layer, layer.evaluate(b, keep), lam))


@pytest.mark.parametrize("bits,lam", [(4, 0.1), (8, 0.005)])
def test_gates_recover_the_known_optimal_bit_width(bits, lam):
    w, m = _on_grid(16, 32, bits)
    x = np.random.default_rng(1).standard_normal((256, 32))
    layer = prepare(w, inputs=x, ranges=m)
    errors = {b: layer.evaluate(b, np.ones(16, bool)).error for b in LEVELS}
    assert errors[bits] < 1e-20 and errors[bits // 2] > 1e-3  # the grid is what it claims
    assert _brute_bits(layer, lam) == bits
    cfg = read_out(layer, train(layer, lam), lam=lam)
    assert cfg.bits == bits and cfg.channel_mask.all()
    assert layer.exact(lam).bits == bits
    assert cfg.cost == pytest.approx(layer.bit_cost[bits])  # default cost: MACs·bits
    assert layer.bit_cost[bits] == 16 * 32 * bits


def test_lambda_zero_keeps_everything_and_large_lambda_drops():
    w, m = _on_grid(8, 16, 4, seed=2)
    x = np.random.default_rng(3).standard_normal((128, 16))
    configs = sweep(w, inputs=x, ranges=m, lambdas=[0.0, 1000.0])
    assert configs[0].bits == 16 and configs[0].channel_mask.all()
    assert configs[0].error < 1e-20
    assert configs[-1].cost < configs[0].cost and configs[-1].bits < 16


def test_dead_channel_is_pruned_and_informative_ones_stay():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 24))
    w[3] *= 1e-5  # ~0 weights
    x = rng.standard_normal((256, 24))
    layer = prepare(w, inputs=x)
    for lam in (0.01, 0.05):
        cfg = read_out(layer, train(layer, lam), lam=lam)
        assert not cfg.channel_mask[3]
        assert cfg.channel_mask[np.arange(8) != 3].all()
        assert cfg.bits >= 4
        assert cfg.cost == pytest.approx(layer.bit_cost[cfg.bits] * 7 / 8)
        assert np.array_equal(layer.exact(lam).channel_mask, cfg.channel_mask)


def test_dead_input_column_and_hessian_equals_inputs():
    """A channel that reads only a dead input costs nothing to prune; H and X agree."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 10))
    x = rng.standard_normal((200, 10))
    x[:, 0] = 0.0
    w[2] = 0.0
    w[2, 0] = 3.0  # channel 2 multiplies only the dead input
    lams = [0.0, 0.003, 0.03]
    exact = GateSearch.EXACT
    from_x = sweep(w, inputs=x, lambdas=lams, search=exact)
    from_h = sweep(w, hessian=x.T @ x / len(x), lambdas=lams, search=exact)
    hess = LayerHessian(second=(x.T @ x / len(x))[None], mean=x.mean(0)[None], positions=1.0,
                        rows_seen=len(x), dense=True)
    from_lh = sweep(w, hessian=hess, lambdas=lams, search=exact)
    for a, b, c in zip(from_x, from_h, from_lh, strict=True):
        assert a.same_choice(b) and a.same_choice(c)
        assert a.error == pytest.approx(b.error, rel=1e-9, abs=1e-15)
    assert not from_x[-1].channel_mask[2] and from_x[-1].kept == 5
    gated = sweep(w, hessian=hess, lambdas=[0.03])[0]
    assert not gated.channel_mask[2] and gated.kept == 5


def test_exact_matches_brute_force_over_bits_and_masks():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((5, 7)) * rng.uniform(0.05, 2, (5, 1))
    x = rng.standard_normal((64, 7)) * rng.uniform(0.2, 2, 7)
    layer = prepare(w, inputs=x)
    for lam in (1e-3, 0.05, 0.5, 3.0):
        best = min(_objective(layer, layer.evaluate(b, np.array(mask, bool)), lam)
                    for b in LEVELS for mask in itertools.product([0, 1], repeat=5))
        assert _objective(layer, layer.exact(lam), lam) == pytest.approx(best, rel=1e-12)


def test_gates_never_beat_the_exact_optimum():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((12, 16))
    layer = prepare(w, inputs=rng.standard_normal((128, 16)))
    for lam in (0.003, 0.1, 1.0):
        gated = read_out(layer, train(layer, lam), lam=lam)
        assert _objective(layer, gated, lam) >= _objective(layer, layer.exact(lam), lam) - 1e-12


@pytest.mark.parametrize("search", list(GateSearch))
def test_sweep_is_deterministic_and_monotone(search):
    rng = np.random.default_rng(8)
    w = rng.standard_normal((12, 20)) * rng.uniform(0.01, 2, (12, 1))
    x = rng.standard_normal((160, 20)) * rng.uniform(0.1, 2, 20)
    lams = [0.0, 1e-3, 0.1, 10.0, 100.0]
    first = sweep(w, inputs=x, lambdas=lams, search=search)
    second = sweep(w, inputs=x, lambdas=list(reversed(lams)), search=search)
    assert len(first) == len(second) >= 3
    for a, b in zip(first, second, strict=True):
        assert a.same_choice(b) and a.error == b.error and a.cost == b.cost and a.lam == b.lam
    costs = [c.cost for c in first]
    assert all(hi >= lo for hi, lo in itertools.pairwise(costs))
    assert first[0].bits == 16 and first[0].channel_mask.all()
    assert all(not a.same_choice(b) for a, b in itertools.pairwise(first))


def test_min_bits_and_cost_table():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((8, 8))
    x = rng.standard_normal((64, 8))
    table = {4: 1.0, 8: 1.5, 16: 4.0}  # e.g. latency from a profile
    for search in GateSearch:
        configs = sweep(w, inputs=x, lambdas=[0, 1e4], min_bits=4, bit_cost=table,
                        search=search)
        assert [c.bits for c in configs] == [16, 0]
        assert configs[0].cost == 4.0 and configs[1].cost == 0.0
    layer = prepare(w, inputs=x, min_bits=4, bit_cost=table)
    assert layer.levels == (4, 8, 16)
    assert layer.exact(0.1).bits in (4, 8, 16)
    with pytest.raises(UsageError):
        prepare(w, inputs=x, bit_cost={2: 1.0, 4: 0.5, 8: 2.0, 16: 4.0})
    with pytest.raises(UsageError):
        prepare(w, inputs=x, hessian=np.eye(8))
    with pytest.raises(UsageError):
        sweep(w, inputs=x, lambdas=[-1.0])
