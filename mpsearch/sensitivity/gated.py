"""Gating configurations as extra candidates for the solver (``--gating``).

For every group whose output channels can be pruned (:func:`mpsearch.graph.flow.
channel_route`) and whose op the profile lets prune channels (a pair listed with ``+channel``),
a sweep of ``λ`` over the layer objective of :mod:`mpsearch.quant.gating`,

    tr(δW H δWᵀ) / tr(W H Wᵀ) + λ · cost / C(16),

on the calibration pass's layer Hessian ``H`` (weights frozen) yields configurations (a weight
bit-width ``b`` and the output channels kept). Each one with ``0 < kept < R`` channels and a
bit-width the profile allows becomes the candidate ``w{b}a{a}+channel@{kept/R}`` for every
activation format ``a`` the profile pairs with it: the gates choose each layer's bit-width and
how many of its channels stay, per layer, where the fixed candidates offer one ladder
(``channel@0.5``, ``@0.75``) to all. Then the candidate is scored like every other one (the
Hessian estimator or a measured run, on the weights the exporter writes), so the solver still
meets the budget exactly on the cost model.

*Which* channels go is what the fixed candidates drop too: those of least Hessian energy
``w_r H w_rᵀ`` (:func:`mpsearch.quant.prune.prune_layer`). The exact read-out of the sweep
keeps the channels of largest ``w_r H w_rᵀ - δw_r H δw_rᵀ`` (energy less the channel's own
quantization error), the same order wherever quantization error is small against a channel's
energy; :func:`gated_candidates` counts where the masks differ.

``cost`` is the budgeted metric of the layer alone at each bit-width (the cost model's, on the
activation format's pair; levels the profile lacks scale with the bit-width), times the kept
fraction: the consumers' saving, which the cost model adds for the solver, is left out of the
sweep. The ``λ`` of a sweep are trained together (:func:`mpsearch.quant.gating.train_many`):
a configuration at one ``λ`` does not bound the next, which the solver does not need.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mpsearch.core.formats import Candidate, FormatKind, Sparsity
from mpsearch.graph.flow import ChannelRefusal, channel_route
from mpsearch.hw.cost import CostModel
from mpsearch.quant.gating import GatedConfig, GatedLayer, GateSearch, prepare, read_out, train_many
from mpsearch.quant.layout import weight_rows

if TYPE_CHECKING:
    from mpsearch.quant.analysis import Analysis

__all__ = ["LAMBDAS", "GatedCandidates", "gated_candidates"]

log = logging.getLogger(__name__)

# λ weighs the layer's relative output error against its cost relative to 16 bits: at 1e-3
# nothing is pruned and 8 bits win; near 1 a channel carrying less than ~1/R of the layer's
# output energy goes. Eight points cover that range in half-decade steps.
LAMBDAS = tuple(float(v) for v in np.geomspace(1e-3, 3.0, 8))


@dataclass(frozen=True, kw_only=True)
class GatedCandidates:
    """The candidates gating adds per group, and the read-outs they come from."""

    by_group: Mapping[str, tuple[Candidate, ...]]
    configs: Mapping[str, tuple[tuple[str, GatedConfig], ...]]  # group -> (activation, read-out)
    search: GateSearch
    seconds: float
    mask_differs: int  # read-outs whose kept channels are not the energy order's


def _int_weight(c: Candidate) -> bool:
    return c.weight.spec.kind is FormatKind.INT and c.weight.spec.signed


def _ladders(costs: CostModel, group: str) -> dict[object, dict[int, Candidate]]:
    """Activation format -> {weight bits: dense candidate} of the pairs the profile lets prune
    channels on this group's op."""
    out: dict[object, dict[int, Candidate]] = {}
    for c in costs.candidates(group):
        if c.sparsity is not None and c.sparsity.pattern == "channel" and _int_weight(c):
            dense = Candidate(weight=c.weight, activation=c.activation)
            out.setdefault(c.activation, {})[c.weight.bits] = dense
    return out


def _bit_cost(costs: CostModel, group: str, ladder: Mapping[int, Candidate], levels: Sequence[int],
              metric: str) -> dict[int, float]:
    known = {b: float(getattr(costs.layer(group, c), metric)) for b, c in ladder.items()}
    out = {}
    for b in levels:
        if b in known:
            out[b] = known[b]
        else:  # a level the profile lacks: scaled from the nearest it has
            near = min(known, key=lambda k: (abs(k - b), k))
            out[b] = known[near] * b / near
    for a, b in zip(levels, levels[1:], strict=False):  # the nested ladder's costs must rise
        out[b] = max(out[b], out[a])
    return out


def _energy_order_mask(layer: GatedLayer, kept: int) -> np.ndarray:
    """The ``kept`` channels of largest Hessian energy: what the export keeps."""
    energy = layer.energy()
    mask = np.zeros(energy.size, dtype=bool)
    mask[np.argsort(energy, kind="stable")[energy.size - kept:]] = True
    return mask


def gated_candidates(analysis: Analysis, costs: CostModel,
                     candidates: Mapping[str, Sequence[Candidate]], *, metric: str,
                     search: GateSearch = GateSearch.GATES,
                     lambdas: Sequence[float] = LAMBDAS) -> GatedCandidates:
    """The candidates a ``λ`` sweep of Bayesian-Bits gates (``search=GateSearch.EXACT``: the
    exact minimiser of the same objective) adds to ``candidates`` (group -> its candidates),
    costed in ``metric`` (a :class:`~mpsearch.hw.cost.LayerCost` field: the first budget's)."""
    t0 = time.perf_counter()
    lg, ranges = analysis.graph, analysis.ranges
    by_group: dict[str, tuple[Candidate, ...]] = {}
    configs: dict[str, tuple[tuple[str, GatedConfig], ...]] = {}
    differs = 0
    for g in lg.group_names:
        layer = lg.layers[g]
        hessian = ranges.hessians.get(g)
        ladders = _ladders(costs, g)
        if not ladders or hessian is None or layer.weight is None:
            continue
        if isinstance(channel_route(lg, g), ChannelRefusal):
            continue
        rows = weight_rows(layer, ranges.weights[layer.weight])
        if rows is None:
            continue
        have = set(candidates.get(g, ()))
        new: list[Candidate] = []
        found: list[tuple[str, GatedConfig]] = []
        for act, ladder in sorted(ladders.items(), key=lambda kv: str(kv[0])):
            low = min(ladder)
            levels = tuple(b for b in (2, 4, 8, 16) if b >= low)
            gl = prepare(rows, hessian=hessian, bit_cost=_bit_cost(costs, g, ladder, levels,
                                                                   metric), min_bits=low)
            lams = [float(v) for v in lambdas if v > 0]
            if search is GateSearch.EXACT:
                outs = [gl.exact(v) for v in lams]
            else:
                outs = [read_out(gl, gates, lam=v)
                        for v, gates in zip(lams, train_many(gl, lams), strict=True)]
            seen: list[GatedConfig] = []
            for cfg in outs:
                if any(cfg.same_choice(o) for o in seen):
                    continue
                seen.append(cfg)
                found.append((str(act), cfg))
                if not 0 < cfg.kept < gl.channels or cfg.bits not in ladder:
                    continue
                density = float(f"{cfg.kept / gl.channels:.6g}")  # as the name prints it
                cand = Candidate(weight=ladder[cfg.bits].weight, activation=act,
                                 sparsity=Sparsity(pattern="channel", density=density))
                if cand not in have:
                    have.add(cand)
                    new.append(cand)
                    if not np.array_equal(cfg.channel_mask,
                                          _energy_order_mask(gl, cfg.kept)):
                        differs += 1
        if new:
            by_group[g] = tuple(new)
        if found:
            configs[g] = tuple(found)
    seconds = time.perf_counter() - t0
    log.info("gating (%s): %d candidates for %d groups in %.1f s", search.value,
             sum(len(v) for v in by_group.values()), len(by_group), seconds)
    return GatedCandidates(by_group=by_group, configs=configs, search=search, seconds=seconds,
                           mask_differs=differs)
