"""Polish the shipped plan on measured output error: a short local search from the best
shortlisted plan, each step exported and run for real.

A sum of single-group errors misjudges plans that change several groups at once. On
EfficientNet-Lite0, the stem conv and the depthwise conv after it at w8a8 cost 1.83e-3 of
output MSE measured together, against 1.53e-3 + 1.87e-3 measured one at a time; raising only
one of them to 16-bit activations gains almost nothing (1.70e-3), since the tensor between
them keeps the other's 8-bit grid, while raising both gains 1.66e-3. The shortlist
(:mod:`mpsearch.job.selection`) measures whole plans, but only a few, each optimal for some sum. So
from the best of them the search tries neighbouring plans that also meet every budget,
measured on the calibration data. A move is one raise (a group to a candidate predicted
better, or a producer and its consumer raised to the same activation format together) that
fits as it is, or paid for by one lowering, or by the lowerings of least predicted harm per
cost saved (:data:`REPAIR` at most). The raises of largest predicted gain go first: the
predicted total of a move is what misleads, and the biggest possible gains are where a measured
plan can differ most. A plan replaces the incumbent when its calibration ``mse`` is lower by
at least :data:`ACCEPT_Z` standard errors of the per-sample differences
(:func:`mpsearch.job.selection.paired_z`): accepting any lower ``mse`` took, at bops 0.75, two moves
of 0.4-1.6% on the calibration data that lost 0.06 dB on the held-out crops. The search goes on
from the new incumbent, for ``evaluations`` measured plans at most. A raise that measured worse
is not tried again, with any partner, until the incumbent changes, or one mistaken prediction
would use up every evaluation.

Each evaluation is one export and one run of the calibration data (0.4-1.2 s on
EfficientNet-Lite0). There, at bops 0.9 of w8a8, its first move (both stem convs to 16-bit
activations, three 1x1 convs to w4a8) took the plan from 20.71 to 21.13 dB on the 200
held-out crops (benchmarks/effnet_search.py). Plain Python: the neighbourhood is a few
thousand moves, filtered by linear cost sums before anything is exported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mpsearch.core.formats import Candidate
from mpsearch.hw.cost import CostModel
from mpsearch.job.selection import paired_z, plan_key
from mpsearch.solve.allocate import Built

__all__ = ["EVALUATIONS", "Polish", "Step", "polish"]

log = logging.getLogger(__name__)

EVALUATIONS = 6  # default: neighbouring plans measured at most (--polish)
UPS = 40  # raises considered per step, best predicted first
REPAIR = 3  # lowerings at most added to make a raise fit
ACCEPT_Z = 1.0  # a better plan must win by this many standard errors (see the docstring)
DOWNS = 80  # lowerings considered as partners, least predicted harm first

Change = tuple[str, Candidate]
Unit = tuple[Change, ...]  # a raise: one group, or a producer and consumer together


@dataclass(frozen=True, kw_only=True)
class Step:
    """One neighbouring plan measured: what it changed and its calibration error."""

    changes: tuple[tuple[str, Candidate, Candidate], ...]  # (group, from, to)
    predicted_delta: float  # predicted change of the output MSE
    check_mse: float
    z: float  # standard errors by which it beat the incumbent (negative: it lost)
    accepted: bool


@dataclass(frozen=True, kw_only=True)
class Polish:
    start: str  # the shortlist entry it started from
    start_mse: float
    plan: Mapping[str, Candidate]
    check_mse: float
    steps: tuple[Step, ...]

    @property
    def accepted(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.accepted)


def polish(start: Mapping[str, Candidate], start_mse: float, start_samples: np.ndarray, *,
           name: str, built: Built, costs: CostModel, limits: Mapping[str, float],
           pins: Mapping[str, Hashable],
           measure: Callable[[Mapping[str, Candidate]], tuple[float, np.ndarray]],
           evaluations: int, accept_z: float = ACCEPT_Z,
           tried: Sequence[Mapping[str, Candidate]] = (),
           progress: Callable[[int], None] | None = None) -> Polish:
    """Local search from ``start`` (measured: ``start_mse``, and ``start_samples`` the squared
    error of each calibration sample) on ``measure``, which gives the same two for a plan;
    ``evaluations`` measurements at most; a plan replaces the incumbent when it is better by
    ``accept_z`` standard errors of the per-sample differences; ``tried``: plans measured
    already (the shortlist), never measured again."""
    problem = built.problem
    ties = {g for t in problem.ties for g in t}
    seen = {plan_key(p) for p in (start, *tried)}
    cur, cur_mse, cur_samples = dict(start), start_mse, np.asarray(start_samples)
    steps: list[Step] = []
    tabu: set[Unit] = set()
    used = 0
    while used < evaluations:
        moved = False
        for delta, changes, up in _moves(cur, built, costs, limits, pins, ties, tabu):
            if used >= evaluations:
                break
            if up in tabu:
                continue
            plan = {**cur, **dict(changes)}
            key = plan_key(plan)
            if key in seen:
                continue
            seen.add(key)
            cost = costs.plan(plan, relative=False).as_dict()
            if any(cost[m] > lim * (1 + 1e-9) for m, lim in limits.items()):
                continue
            mse, samples = measure(plan)
            used += 1
            if progress:
                progress(1)
            z = paired_z(cur_samples, samples)
            better = mse < cur_mse and z >= accept_z
            steps.append(Step(changes=tuple((g, cur[g], c) for g, c in changes),
                              predicted_delta=delta, check_mse=mse, z=z,
                              accepted=better))
            log.info("polish: %s -> mse %.4g (incumbent %.4g, z %.2f)%s",
                     ", ".join(f"{g}={c.name}" for g, c in changes), mse, cur_mse, z,
                     " accepted" if better else "")
            if better:
                cur, cur_mse, cur_samples, moved = plan, mse, samples, True
                tabu.clear()
                break
            tabu.add(up)
        if not moved:
            break
    return Polish(start=name, start_mse=start_mse, plan=cur, check_mse=cur_mse,
                  steps=tuple(steps))


def _moves(plan: Mapping[str, Candidate], built: Built, costs: CostModel,
           limits: Mapping[str, float], pins: Mapping[str, Hashable], ties: set[str],
           tabu: set[Unit]) -> list[tuple[float, tuple[Change, ...], Unit]]:
    """(predicted change, changes, the raise among them): the raises of largest predicted gain
    first, each with its ways to pay for it in order of predicted change. A raise is
    one group, or a producer and its consumer raised to the same activation format together
    (each keeps its weight format). Each raise comes alone if it fits, with each single
    lowering that makes it fit, and with the lowerings of least predicted harm per cost saved
    that make it fit (:data:`REPAIR` at most). Costs are linear sums here; the exact cost
    model is checked before a plan is measured."""
    problem = built.problem
    now = built.predicted_error(plan)
    base = costs.plan(plan, relative=False).as_dict()
    metric = next(iter(limits))

    def delta_cost(changes: Unit) -> dict[str, float]:
        out = dict.fromkeys(limits, 0.0)
        for g, c in changes:
            new, old = problem.option_index(g, c), problem.option_index(g, plan[g])
            for m in limits:
                row = problem.costs.get(m, {}).get(g)
                if row is not None:
                    out[m] += row[new] - row[old]
        return out

    def fits(*dcs: dict[str, float]) -> bool:
        return all(base[m] + sum(d[m] for d in dcs) <= lim * (1 + 1e-9)
                   for m, lim in limits.items())

    def free(g: str) -> bool:
        return g in plan and g not in pins

    units: list[tuple[float, Unit, dict[str, float]]] = []
    for g in problem.groups:
        if not free(g):
            continue
        for c in problem.options[g]:
            if c != plan[g] and (g not in ties or c.activation == plan[g].activation):
                u = ((g, c),)
                units.append((built.predicted_error({**plan, g: c}) - now, u, delta_cost(u)))
    for e in problem.edges:
        a, b = e.src, e.dst
        if not (free(a) and free(b)) or a in ties or b in ties:
            continue
        for ca in problem.options[a]:
            if ca.weight != plan[a].weight or ca.activation == plan[a].activation:
                continue
            for cb in problem.options[b]:
                if cb.weight == plan[b].weight and cb.activation == ca.activation:
                    u = ((a, ca), (b, cb))
                    units.append((built.predicted_error({**plan, a: ca, b: cb}) - now, u,
                                  delta_cost(u)))
    ups = sorted((x for x in units if x[0] < 0 and x[1] not in tabu),
                 key=lambda x: (x[0], _names(x[1])))[:UPS]
    downs = sorted((x for x in units if x[0] >= 0 and len(x[1]) == 1),
                   key=lambda x: (x[0], _names(x[1])))
    out: list[tuple[float, float, tuple[Change, ...], Unit]] = []
    for d, up, dc in ups:
        if fits(dc):
            out.append((d, d, up, up))
            continue
        taken = {g for g, _ in up}
        for d2, down, dc2 in downs[:DOWNS]:
            if down[0][0] not in taken and fits(dc, dc2):
                out.append((d, d + d2, (*up, *down), up))
        # repair: lowerings of least harm per cost saved on the first budget's metric
        savers = sorted((x for x in downs if x[2][metric] < 0 and x[1][0][0] not in taken),
                        key=lambda x: (x[0] / -x[2][metric], _names(x[1])))
        chosen: list[tuple[float, Unit, dict[str, float]]] = []
        for x in savers:
            if len(chosen) == REPAIR or fits(dc, *(c[2] for c in chosen)):
                break
            if x[1][0][0] not in {c[1][0][0] for c in chosen}:
                chosen.append(x)
        if len(chosen) > 1 and fits(dc, *(c[2] for c in chosen)):
            out.append((d, d + sum(c[0] for c in chosen),
                        (*up, *(ch for c in chosen for ch in c[1])), up))
    out.sort(key=lambda m: (m[0], m[1], _names(m[2])))
    return [(total, changes, up) for _, total, changes, up in out]


def _names(changes: Sequence[Change]) -> list[tuple[str, str]]:
    return [(g, c.name) for g, c in changes]
