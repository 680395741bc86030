"""Bayesian-Bits gating of one layer's weights (van Baalen et al., NeurIPS 2020).

**Quantizer.** Per output channel ``r`` with range ``m_r = max|w_r|`` (symmetric), the grids
``s_b = 2·m_r / (2^b - 1)``, i.e. ``s₂ = range/3``, ``s₄ = s₂/5``, ``s₈ = s₄/17``,
``s₁₆ = s₈/257``, nest: every 2-bit level lies on the 4-bit grid, and so on. With
``q_b = s_b·clamp(⌊w/s_b⌉, ±(2^(b-1) - 1))`` (a narrow-range signed ``b``-bit integer times
``s_b``) and residuals ``ε_b = q_b - q_(b/2)``, which equal ``s_b·⌊(w - q_(b/2))/s_b⌉`` wherever
no level clips, the gated weight is

    ŵ = z₂ (q₂ + z₄ (ε₄ + z₈ (ε₈ + z₁₆ ε₁₆)))

with one ``z₂`` per output channel (closed: the channel is pruned, 0 bits) and ``z₄, z₈, z₁₆``
shared by the layer. ``min_bits = 4`` starts the ladder at ``q₄`` for devices without int2.

**Gates.** Hard concrete (Louizos et al. 2018): ``u ~ U(0, 1)``,
``z = clamp(σ((logit u + log α)/β)·(ζ - γ) + γ, 0, 1)`` with ``β = 2/3, γ = -0.1, ζ = 1.1``;
``P(z > 0) = σ(log α - β·log(-γ/ζ))``. Read-out: a gate is on iff ``P(z = 0) < 0.34``.

**Objective.** Weights frozen, only ``log α`` learned, on the relative layer-output error
``tr(δW H δWᵀ) / tr(W H Wᵀ)``, ``H = E[x xᵀ]`` (from the cached im2col inputs or the
calibration pass's :class:`~mpsearch.graph.layer_hessian.LayerHessian`), plus ``λ`` times the
expected cost relative to the 16-bit layer: channel ``r`` pays level ``b`` iff every gate up to
``b`` is nonzero, so ``E[cost] = Σ_r Σ_b Π_(b'≤b) P(z_b' > 0) · (C(b) - C(b/2)) / R`` for a
per-layer cost table ``C`` (default ``MACs·b``). With increments, a deterministic read-out costs
exactly ``C(bits)·kept/R``, what the solver is given (docs/design.md §3 writes ``MAC·b`` per
level, which would charge a 16-bit layer ``MAC·30``).

Two departures from the paper, both because the weights are frozen. No straight-through
estimator is needed: the ``q_b`` and ``ε_b`` are constants, the loss depends only on the gates.
And the expectation over the gates is computed, not sampled: ``δW`` is linear in each gate and
the gates are independent, so ``E‖δW‖²_H`` needs only ``E[z]`` and ``E[z²]`` per gate, taken
by the midpoint rule in ``u`` where ``0 < z < 1`` (the rest in closed form); the loss is a
5×5 quadratic form per channel (the ``[w, q₂, ε₄, ε₈, ε₁₆]`` Gram matrix under ``H``, computed
once), so the Adam steps are noise-free, deterministic and cheap (300 on a 256×256 layer:
about 0.3 s on one core; torch's per-step overhead dominates).

**Sweep.** Increasing ``λ``; a gate closed at one ``λ`` stays closed at the larger ones, so
cost never increases along the sweep. Every read-out is re-evaluated exactly (its error on
``H``, not the training loss); the distinct ones are the candidates for the solver.

**Exact alternative** (``GateSearch.EXACT``). With frozen weights the layer objective separates
over output channels: ``tr(δW H δWᵀ) = Σ_r δw_r H δw_rᵀ``. So for each of the four
bit-widths a channel is kept iff its error there plus its share of ``λ·cost`` is below its
error when pruned, and the best bit-width wins: the global minimum of the deterministic
objective in ``O(levels·R·K²)``, monotone in ``λ`` by construction. Measured on 72 random
(layer, ``λ``) cases (4–40 channels, ``λ`` from 1e-4 to 30): the gates' read-out was worse
than this optimum in 25, by up to 69% of the objective (still 25, up to 60%, with 1000
steps): gates pushed down in the first steps, while every higher level still adds cost, are
slow to reopen, and the relaxation's channel decisions interact with the shared level gates.
The gates remain the method where no enumeration exists (learned ranges, a loss beyond one
layer).

**In the search** (``--gating``): :mod:`mpsearch.sensitivity.gated` turns each sweep's
read-outs into per-layer candidates; :func:`train_many` trains a sweep's ``λ`` in one batch.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from mpsearch.core.errors import UsageError
from mpsearch.graph.layer_hessian import LayerHessian

__all__ = ["BETA", "GAMMA", "LEVELS", "THRESHOLD", "ZETA", "GatedConfig", "GatedLayer", "Gates",
           "GateSearch", "prepare", "read_out", "sweep", "train", "train_many"]

log = logging.getLogger(__name__)

LEVELS = (2, 4, 8, 16)
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
THRESHOLD = 0.34  # a gate is on iff P(z = 0) < THRESHOLD
INIT_LOG_ALPHA = 3.0  # P(z > 0) = 0.99 at the start: every gate on
QUADRATURE = 16  # midpoints in u over 0 < z < 1, for E[z] and E[z²]
STEPS = 300
LR = 0.1

_LOG_RATIO = BETA * math.log(-GAMMA / ZETA)  # P(z > 0) = σ(log α - _LOG_RATIO)
# z = 0 for logit u < _U0 - log α, z = 1 for logit u > _U1 - log α
_U0 = BETA * math.log(-GAMMA / ZETA)
_U1 = BETA * math.log((1 - GAMMA) / (ZETA - 1))


class GateSearch(enum.Enum):
    """How a sweep finds each ``λ``'s configuration."""

    GATES = "gates"  # Bayesian-Bits hard-concrete gates, trained by Adam
    EXACT = "exact"  # enumeration of the deterministic objective (see module docstring)


@dataclass(frozen=True, kw_only=True, eq=False)
class GatedConfig:
    """One read-out: the layer at ``bits`` with the output channels of ``channel_mask`` kept.

    ``error``: relative output error ``tr(δW H δWᵀ)/tr(W H Wᵀ)`` of exactly this quantizer;
    ``cost``: ``C(bits)·kept/channels`` in the units of the cost table; ``lam``: the smallest
    ``λ`` of the sweep that gave it. ``bits`` is 0 when every channel is pruned."""

    bits: int
    channel_mask: np.ndarray  # (channels,) bool, in output-channel order
    error: float
    cost: float
    lam: float = 0.0

    @property
    def kept(self) -> int:
        return int(self.channel_mask.sum())

    @property
    def density(self) -> float:
        return self.kept / self.channel_mask.size

    def same_choice(self, other: GatedConfig) -> bool:
        return self.bits == other.bits and np.array_equal(self.channel_mask, other.channel_mask)


@dataclass(frozen=True, kw_only=True, eq=False)
class GatedLayer:
    """A layer prepared for gating: its weight rows, the nested quantizer's terms, and the
    Gram matrix of ``[w, q_first, ε...]`` under ``H`` per channel (see module docstring)."""

    rows: np.ndarray  # (G, R, K) float64
    hessian: np.ndarray  # (G, K, K), or (G, K) when only the diagonal is known
    levels: tuple[int, ...]  # the ladder, e.g. (2, 4, 8, 16)
    scales: np.ndarray  # (len(levels), G, R)
    terms: np.ndarray  # (len(levels), G, R, K): q_first, then the residuals
    gram: np.ndarray  # (G, R, len(levels) + 1, len(levels) + 1)
    norm: float  # tr(W H Wᵀ)
    bit_cost: Mapping[int, float]  # the whole layer (all channels) at each level

    @property
    def channels(self) -> int:
        return self.rows.shape[0] * self.rows.shape[1]

    @property
    def full_cost(self) -> float:
        return self.bit_cost[self.levels[-1]]

    def energy(self) -> np.ndarray:
        """``w_r H w_rᵀ`` per output channel (flat, channel order): its error when pruned."""
        return _quad(self.rows, self.rows, self.hessian).reshape(-1)

    def quantized(self, bits: int) -> np.ndarray:
        """The read-out weight rows ``q_bits`` (every channel kept)."""
        return self.terms[: self.levels.index(bits) + 1].sum(axis=0)

    def evaluate(self, bits: int, channel_mask: np.ndarray, *, lam: float = 0.0) -> GatedConfig:
        """The exact error and cost of ``bits`` with the channels of ``channel_mask`` kept."""
        mask = np.asarray(channel_mask, bool).reshape(-1).copy()
        if mask.size != self.channels:
            raise UsageError(f"channel mask has {mask.size} entries, the layer {self.channels} "
                             "output channels", fix="pass one entry per output channel")
        if not mask.any():
            bits = 0
        elif bits not in self.levels:
            raise UsageError(f"{bits} bits is not a level of the ladder {self.levels}",
                             fix=f"use one of {self.levels}")
        g, r, _ = self.rows.shape
        q = self.quantized(bits) if bits else np.zeros_like(self.rows)
        d = self.rows - q * mask.reshape(g, r, 1)
        err = float(_quad(d, d, self.hessian).sum()) / self.norm
        cost = self.bit_cost[bits] * mask.sum() / mask.size if bits else 0.0
        mask.setflags(write=False)
        return GatedConfig(bits=bits, channel_mask=mask, error=max(err, 0.0), cost=float(cost),
                           lam=lam)

    def exact(self, lam: float) -> GatedConfig:
        """The configuration of least ``error + λ·cost/C(16)`` by enumeration: the rows'
        errors add up, so for each bit-width a channel is kept iff its own error there plus
        its share of the cost is below its error when pruned. Ties keep channels and bits;
        ``λ = 0`` is the whole layer at the top level."""
        top = self.levels[-1]
        if lam == 0:
            return self.evaluate(top, np.ones(self.channels, bool), lam=lam)
        pruned = self.energy() / self.norm
        best: tuple[float, int, np.ndarray] | None = None
        for bits in reversed(self.levels):
            d = self.rows - self.quantized(bits)
            kept = (_quad(d, d, self.hessian).reshape(-1) / self.norm
                    + lam * self.bit_cost[bits] / (self.full_cost * self.channels))
            mask = kept <= pruned
            f = float(np.where(mask, kept, pruned).sum())
            if best is None or f < best[0]:
                best = (f, bits, mask)
        return self.evaluate(best[1], best[2], lam=lam)


@dataclass(frozen=True, kw_only=True, eq=False)
class Gates:
    """Learned ``log α``: one per output channel (the 0-bit gate), one per higher level."""

    channel_log_alpha: np.ndarray  # (G, R)
    level_log_alpha: Mapping[int, float]  # level (4, 8, 16) -> log α; closed levels: -inf

    def channel_open(self) -> np.ndarray:
        return _p_zero(self.channel_log_alpha) < THRESHOLD

    def level_open(self, bits: int) -> bool:
        return bool(_p_zero(np.float64(self.level_log_alpha[bits])) < THRESHOLD)


def _p_zero(log_alpha: np.ndarray) -> np.ndarray:
    """``P(z = 0) = σ(β·log(-γ/ζ) - log α)``."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(np.asarray(log_alpha, np.float64) - _LOG_RATIO))


def _quad(a: np.ndarray, b: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``a_r H b_rᵀ`` per row, for rows ``(G, R, K)`` and ``H`` dense or diagonal."""
    if h.ndim == 3:
        return np.einsum("grk,gkl,grl->gr", a, h, b, optimize=True)
    return np.einsum("grk,gk,grk->gr", a, h, b, optimize=True)


def _as_groups(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        return x[None]
    if x.ndim != 3:
        raise UsageError(f"{name} has shape {x.shape}", fix="pass (R, K) or (G, R, K) rows")
    return x


def _hessian(rows: np.ndarray, hessian: LayerHessian | np.ndarray | None,
             inputs: np.ndarray | None) -> np.ndarray:
    g, _, k = rows.shape
    if (hessian is None) == (inputs is None):
        raise UsageError("gating needs exactly one of the layer Hessian and the layer inputs",
                         fix="pass hessian=E[x xᵀ] or inputs=(N, K) im2col rows")
    if inputs is not None:
        x = _as_groups(inputs, "inputs")
        if x.shape[0] != g or x.shape[2] != k or x.shape[1] == 0:
            raise UsageError(f"inputs of shape {x.shape} do not match weight rows {rows.shape}",
                             fix="pass (N, K) or (G, N, K) im2col rows of the layer input")
        return np.einsum("gnk,gnl->gkl", x, x) / x.shape[1]
    if isinstance(hessian, LayerHessian):
        h = np.asarray(hessian.second, np.float64)
        want = (g, k, k) if hessian.dense else (g, k)
    else:
        h = np.asarray(hessian, np.float64)
        h = h[None] if h.ndim == 2 else h
        want = (g, k, k)
    if h.shape != want:
        raise UsageError(f"Hessian of shape {h.shape} does not match weight rows {rows.shape}",
                         fix=f"pass E[x xᵀ] of shape {want[1:]} or {want}")
    return h


def _bit_cost(levels: tuple[int, ...], bit_cost: Mapping[int, float] | None,
              macs: float) -> Mapping[int, float]:
    if bit_cost is None:
        table = {b: macs * b for b in levels}
    else:
        missing = [b for b in levels if b not in bit_cost]
        if missing:
            raise UsageError(f"cost table has no entry for {missing} bits",
                             fix=f"give the layer's cost at each of {levels} bits")
        table = {b: float(bit_cost[b]) for b in levels}
    values = [table[b] for b in levels]
    if (not all(math.isfinite(v) and v >= 0 for v in values)
            or any(a > b for a, b in zip(values, values[1:], strict=False))
            or values[-1] <= 0):
        raise UsageError(f"cost table {table} must be finite, >= 0, positive at "
                         f"{levels[-1]} bits and non-decreasing in the bit-width",
                         fix="pass the layer's cost at each bit-width")
    table[0] = 0.0
    return MappingProxyType(table)


def prepare(rows: np.ndarray, *, hessian: LayerHessian | np.ndarray | None = None,
            inputs: np.ndarray | None = None, ranges: np.ndarray | None = None,
            bit_cost: Mapping[int, float] | None = None, min_bits: int = 2) -> GatedLayer:
    """The layer of weight ``rows`` ((R, K) or (G, R, K), see
    :func:`mpsearch.quant.layer.weight_rows`) ready to gate, on ``hessian`` (``E[x xᵀ]``) or on
    the im2col ``inputs`` ((N, K) or (G, N, K)). ``ranges``: ``m_r`` per output channel
    (default ``max|w_r|``). ``bit_cost``: the layer's cost at each bit-width of the ladder
    (default ``MACs·b`` with ``MACs = G·R·K``). ``min_bits``: the lowest level (4 on devices
    without int2)."""
    if min_bits not in LEVELS:
        raise UsageError(f"min_bits={min_bits}", fix=f"use one of {LEVELS}")
    w = _as_groups(rows, "weight rows")
    if not np.isfinite(w).all():
        raise UsageError("weight rows are not finite", fix="check the model's weights")
    g, r, k = w.shape
    h = _hessian(w, hessian, inputs)
    levels = tuple(b for b in LEVELS if b >= min_bits)
    m = np.abs(w).max(axis=2) if ranges is None else \
        np.asarray(ranges, np.float64).reshape(g, r)
    m = np.where(m > 0, m, 1.0)  # a zero row rounds to zero on any grid
    scales = np.stack([2.0 * m / (2**b - 1) for b in levels])
    q = [s[..., None] * np.clip(np.rint(w / s[..., None]), -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1)
         for b, s in zip(levels, scales, strict=True)]
    terms = np.stack([q[0]] + [q[i] - q[i - 1] for i in range(1, len(q))])
    p = np.concatenate([w[None], terms]).transpose(1, 2, 0, 3)  # (G, R, L+1, K)
    if h.ndim == 3:
        gram = np.einsum("grik,gkl,grjl->grij", p, h, p, optimize=True)
    else:
        gram = np.einsum("grik,gk,grjk->grij", p, h, p, optimize=True)
    norm = float(np.einsum("grii->", gram[..., :1, :1]))
    if not norm > 0:
        raise UsageError("the layer's output is zero on the calibration data (tr(W H Wᵀ) = 0)",
                         fix="gate only layers whose output carries signal")
    return GatedLayer(rows=w, hessian=h, levels=levels, scales=scales, terms=terms, gram=gram,
                      norm=norm, bit_cost=_bit_cost(levels, bit_cost, float(g * r * k)))


def train(layer: GatedLayer, lam: float, *, steps: int = STEPS, lr: float = LR,
          closed: GatedConfig | None = None) -> Gates:
    """Learn the gates' ``log α`` for ``relative error + λ·E[cost]/C(16)`` by Adam. Gates that
    ``closed`` (an earlier read-out) has off stay off."""
    return train_many(layer, [lam], steps=steps, lr=lr, closed=closed)[0]


def train_many(layer: GatedLayer, lams: Sequence[float], *, steps: int = STEPS, lr: float = LR,
               closed: GatedConfig | None = None) -> list[Gates]:
    """:func:`train` for every ``λ`` of ``lams`` at once: independent sets of gates in one
    batch (Adam's update is per parameter, so each set follows the trajectory it would alone;
    one torch loop instead of one per ``λ``)."""
    import torch  # deferred: torch is only needed when gating is asked for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few thousand entries: threads only add overhead
    try:
        return _train_many(torch, layer, lams, steps=steps, lr=lr, closed=closed)
    finally:
        torch.set_num_threads(threads)


def _train_many(torch, layer: GatedLayer, lams: Sequence[float], *, steps: int, lr: float,
                closed: GatedConfig | None) -> list[Gates]:
    g, r, _ = layer.rows.shape
    n_lv = len(layer.levels)
    lam_t = torch.tensor([float(v) for v in lams], dtype=torch.float64)
    n = lam_t.numel()
    allowed = torch.ones((g, r), dtype=torch.float64)
    top = n_lv - 1  # highest level index that may open
    if closed is not None:
        allowed = torch.from_numpy(closed.channel_mask.reshape(g, r).astype(np.float64))
        top = layer.levels.index(closed.bits) if closed.bits else 0
    level_allowed = torch.tensor([1.0 if i <= top else 0.0 for i in range(1, n_lv)],
                                 dtype=torch.float64)
    gram = torch.from_numpy(layer.gram)
    inc = [layer.bit_cost[b] - layer.bit_cost[a]
           for a, b in zip((0, *layer.levels), layer.levels, strict=False)]
    inc_t = torch.tensor(inc, dtype=torch.float64) / (layer.full_cost * layer.channels)
    nodes = (torch.arange(QUADRATURE, dtype=torch.float64) + 0.5) / QUADRATURE

    chan = torch.full((n, g, r), INIT_LOG_ALPHA, dtype=torch.float64, requires_grad=True)
    lev = torch.full((n, n_lv - 1), INIT_LOG_ALPHA, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([chan, lev], lr=lr)
    # E[v vᵀ] for v = (1, -z₀, -z₀z₁, ...), z₀ the channel's gate, z₁... the levels':
    # E[v₀ v_(a+1)] = -E[z₀]·Π_(0<k≤a) E[z_k] and, for a ≤ b, E[v_(a+1) v_(b+1)] =
    # E[z₀²]·Π_(0<k≤a) E[z_k²]·Π_(a<k≤b) E[z_k]. The channel moments meet the Gram matrix
    # in two matrix products; the level products are (L, L) scalars per λ.
    idx = torch.arange(n_lv)
    between = ((idx[:, None, None] < idx[None, None, :])
               & (idx[None, :, None] >= idx[None, None, :]))  # (a, b, k): a < k ≤ b
    weight = torch.triu(torch.ones(n_lv, n_lv, dtype=torch.float64)) * 2 \
        - torch.eye(n_lv, dtype=torch.float64)
    g00 = gram[..., 0, 0].sum()
    g0 = gram[..., 0, 1:].reshape(-1, n_lv).T.contiguous()  # (L, G·R)
    gw = (gram[..., 1:, 1:] * weight).reshape(-1, n_lv * n_lv).T.contiguous()  # (L·L, G·R)
    ones = torch.ones((n, 1), dtype=torch.float64)

    def moments(log_alpha):
        # z > 0 for u > u₀ and z = 1 for u > u₁: E[z^n] = 1 - u₁ + ∫_(u₀)^(u₁) z^n du, the
        # integral by the midpoint rule over [u₀, u₁] (exact tails, any log α).
        u0 = torch.sigmoid(_U0 - log_alpha)
        u1 = torch.sigmoid(_U1 - log_alpha)
        u = u0[..., None] + (u1 - u0)[..., None] * nodes
        z = (torch.sigmoid((torch.logit(u) + log_alpha[..., None]) / BETA) * (ZETA - GAMMA)
             + GAMMA).clamp(0.0, 1.0)
        width = u1 - u0
        return (1 - u1 + width * z.mean(-1), 1 - u1 + width * (z * z).mean(-1),
                torch.sigmoid(log_alpha - _LOG_RATIO))

    for _ in range(steps):
        opt.zero_grad()
        c1, c2, cp = moments(chan)
        l1, l2, lp = moments(lev)
        c1, c2, cp = c1 * allowed, c2 * allowed, cp * allowed
        l1 = torch.cat([ones, l1 * level_allowed], 1)  # gate 0 (the channel's) factored out
        l2 = torch.cat([ones, l2 * level_allowed], 1)
        lp = torch.cat([ones, lp * level_allowed], 1)
        run = torch.where(between, l1[:, None, None, :], 1.0).prod(-1)  # Π_(a<k≤b) E[z_k]
        e_cross = torch.cumprod(l2, 1)[:, :, None] * run  # (Λ, L, L)
        loss = (g00 - 2.0 * (torch.cumprod(l1, 1) * (c1.reshape(n, -1) @ g0.T)).sum(1)
                + (e_cross.reshape(n, -1) * (c2.reshape(n, -1) @ gw.T)).sum(1))
        cost = cp.reshape(n, -1).sum(1) * (torch.cumprod(lp, 1) * inc_t).sum(1)
        objective = (loss / layer.norm + lam_t * cost).sum()  # independent per λ
        objective.backward()
        opt.step()

    closed_ch = (allowed == 0).numpy()
    out = []
    for j in range(n):
        ch = np.where(closed_ch, -np.inf, chan[j].detach().numpy())
        lv = {b: (float(lev[j, i - 1].detach()) if i <= top else -math.inf)
              for i, b in enumerate(layer.levels) if i > 0}
        out.append(Gates(channel_log_alpha=ch, level_log_alpha=MappingProxyType(lv)))
    return out


def read_out(layer: GatedLayer, gates: Gates, *, lam: float = 0.0) -> GatedConfig:
    """The deterministic configuration of ``gates`` (on iff ``P(z = 0) < 0.34``), evaluated
    exactly."""
    mask = gates.channel_open().reshape(-1)
    bits = layer.levels[0]
    for b in layer.levels[1:]:
        if not gates.level_open(b):
            break
        bits = b
    return layer.evaluate(bits, mask, lam=lam)


def sweep(rows: np.ndarray, *, lambdas: Sequence[float],
          hessian: LayerHessian | np.ndarray | None = None, inputs: np.ndarray | None = None,
          ranges: np.ndarray | None = None, bit_cost: Mapping[int, float] | None = None,
          min_bits: int = 2, search: GateSearch = GateSearch.GATES, steps: int = STEPS,
          lr: float = LR) -> list[GatedConfig]:
    """The distinct configurations along increasing ``lambdas`` (cost non-increasing), each
    with its exact error and cost. Arguments as for :func:`prepare` and :func:`train`;
    ``λ = 0`` gives the top level with every channel. ``search``: the gates, or the exact
    minimiser of the same objective."""
    lams = sorted({float(v) for v in lambdas})
    if not lams or not all(math.isfinite(v) and v >= 0 for v in lams):
        raise UsageError(f"lambdas {list(lambdas)} must be finite and >= 0",
                         fix="pass a non-empty sweep such as [0, 0.01, 0.1, 1]")
    layer = prepare(rows, hessian=hessian, inputs=inputs, ranges=ranges, bit_cost=bit_cost,
                    min_bits=min_bits)
    out: list[GatedConfig] = []
    prev: GatedConfig | None = None
    for lam in lams:
        if search is GateSearch.EXACT or lam == 0:  # λ = 0: nothing to pay, the whole layer
            cfg = layer.exact(lam)
        else:
            cfg = read_out(layer, train(layer, lam, steps=steps, lr=lr, closed=prev), lam=lam)
        log.debug("λ=%g: %d bits, %d/%d channels, error %.3g, cost %.3g", lam, cfg.bits,
                  cfg.kept, layer.channels, cfg.error, cfg.cost)
        if prev is None or not cfg.same_choice(prev):
            out.append(cfg)
        prev = cfg
    return out
