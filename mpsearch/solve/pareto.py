"""Pareto front of the objective ``f = error + penalty · penalty cost`` against one cost metric.

1. Lagrangian sweep. For ``λ ≥ 0`` a plan of least ``f + λ·cost`` is a vertex of the lower
   convex hull of all plans' ``(cost, f)``. Start from ``λ = 0`` (least ``f``) and from the
   cheapest plan (least ``f`` of those). Between two hull vertices ``L``
   and ``H`` take ``λ`` = their slope ``(f_L - f_H) / (c_H - c_L)``: a plan strictly below the
   line ``LH`` is a new vertex and splits the segment, otherwise ``LH`` is a hull edge and
   the two plans "coincide" on it. This is the exact form of bisecting on ``λ`` (the NISE
   method, Cohon 1979): ``2·vertices - 1`` solves for the whole hull; it stops after
   ``points`` solves, widest segments first.
2. ε-constraint. The hull misses plans in its non-convex dents. For the gap between two
   neighbours ``L``, ``H`` on the front found so far, ``min f s.t. cost < c_H`` is the front
   point just left of ``H``: ``L`` again (the gap is closed) or a new point. Widest gaps
   (cost × error) first, ``points`` solves at most; with enough, every front point is found,
   so the budgets land where the front bends rather than on a fixed grid.
3. Only non-dominated plans are kept, one point per choice (a plan no cheaper than another
   of equal error is dropped, so no solve needs a tie-break).

Other ``budgets`` (e.g. weight bytes while sweeping latency) hold in every solve.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from mpsearch.core.errors import InfeasibleBudgetError, UsageError
from mpsearch.solve.ilp import TOLERANCE, smallest, solve
from mpsearch.solve.problem import Problem, Solution

__all__ = ["FRONT_SOLVES", "Front", "FrontPoint", "front"]

FRONT_SOLVES = 20  # the search's solves per side, Lagrangian and ε-constraint (30: 1.5x the time)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FrontPoint:
    """One plan on the front: its ``metric`` total and its objective ``error + penalty·...``."""

    cost: float
    error: float
    solution: Solution
    source: str  # "lagrangian" (a hull vertex) or "constrained" (an ε-constraint solve)


@dataclass(frozen=True, kw_only=True)
class Front:
    """Non-dominated plans, cost ascending (so error descending)."""

    metric: str
    points: tuple[FrontPoint, ...]

    def best_within(self, budget: float) -> FrontPoint:
        """The point of least error whose cost is at most ``budget``."""
        inside = [p for p in self.points if p.cost <= budget + TOLERANCE * abs(budget)]
        if not inside:
            cheapest = self.points[0].cost if self.points else float("nan")
            raise InfeasibleBudgetError(
                f"no front point has {self.metric} <= {budget:.6g} "
                f"(smallest reachable {cheapest:.6g})",
                fix="raise the budget or allow more formats",
            )
        return min(inside, key=lambda p: (p.error, p.cost))


def front(
    problem: Problem,
    metric: str,
    *,
    budgets: Mapping[str, float] = {},  # noqa: B006 - read only
    points: int = 30,
    pins: Mapping[str, Hashable] = {},  # noqa: B006 - read only
    penalty: float = 0.0,
    time_limit_s: float = 60.0,
) -> Front:
    """The error/``metric`` trade-off: hull by Lagrangian sweep, dents by ε-constraint ILPs."""
    if metric in budgets:
        raise UsageError(
            f"front over {metric!r} with a budget on {metric!r}",
            fix="leave the swept metric out of budgets and use Front.best_within",
        )
    if points < 2:
        raise UsageError(f"points={points} must be at least 2")
    found: dict[tuple[Hashable, ...], FrontPoint] = {}

    def run(source: str, *, lam: float = 0.0, cap: float | None = None) -> FrontPoint:
        limits = dict(budgets) if cap is None else {**budgets, metric: cap}
        sol = solve(
            problem, limits, pins=pins, penalty=penalty, objective_metric=metric, lam=lam,
            time_limit_s=time_limit_s,
        )
        point = FrontPoint(
            cost=sol.costs[metric], error=sol.objective(penalty), solution=sol, source=source
        )
        return found.setdefault(tuple(sol.choice[g] for g in problem.groups), point)

    dear = run("lagrangian")
    least = smallest(problem, metric, pins=pins, budgets=budgets, time_limit_s=time_limit_s)
    cheap = run("lagrangian", cap=least)
    _hull(run, cheap, dear, points)
    _fill(run, found.values(), points)
    kept = _non_dominated(found.values())
    log.debug("front over %s: %d plans, %d points", metric, len(found), len(kept))
    return Front(metric=metric, points=tuple(kept))


def _non_dominated(points: Iterable[FrontPoint]) -> list[FrontPoint]:
    kept: list[FrontPoint] = []
    for point in sorted(points, key=lambda p: (p.cost, p.error)):
        if not kept or point.error < kept[-1].error:
            kept.append(point)
    return kept


def _fill(run, found: Iterable[FrontPoint], solves: int) -> None:
    """ε-constraint: below the dearer end of the widest open gap, ``solves`` at most.

    The best plan costing less than ``H`` is the front point just left of ``H``: either the
    gap's other end ``L`` (the gap is closed) or a new point ``P`` (``P..H`` is closed).
    """
    closed: set[tuple[int, int]] = set()
    while solves > 0:
        gaps = [
            (low, high) for low, high in itertools.pairwise(_non_dominated(found))
            if (id(low), id(high)) not in closed
            and high.cost - low.cost > 2 * TOLERANCE * abs(high.cost)
        ]
        if not gaps:
            return
        low, high = max(gaps, key=lambda g: (g[1].cost - g[0].cost) * (g[0].error - g[1].error))
        mid = run("constrained", cap=high.cost - 2 * TOLERANCE * abs(high.cost))
        solves -= 1
        if mid.error < low.error and mid.cost < high.cost:
            closed.add((id(mid), id(high)))
        else:
            closed.add((id(low), id(high)))


def _hull(run, cheap: FrontPoint, dear: FrontPoint, solves: int) -> None:
    """NISE between ``cheap`` and ``dear``: split the widest segments first, ``solves`` at most."""
    order = itertools.count()
    heap: list[tuple[float, int, FrontPoint, FrontPoint]] = []

    def push(low: FrontPoint, high: FrontPoint) -> None:
        if high.cost > low.cost and low.error > high.error:
            area = (low.error - high.error) * (high.cost - low.cost)
            heapq.heappush(heap, (-area, next(order), low, high))

    push(cheap, dear)
    while heap and solves > 0:
        _, _, low, high = heapq.heappop(heap)
        lam = (low.error - high.error) / (high.cost - low.cost)
        mid = run("lagrangian", lam=lam)
        solves -= 1
        line = low.error + lam * low.cost
        scale = max(abs(low.error), abs(high.error), lam * abs(low.cost), lam * abs(high.cost))
        below = mid.error + lam * mid.cost < line - TOLERANCE * scale
        if below and low.cost < mid.cost < high.cost:
            push(low, mid)
            push(mid, high)
