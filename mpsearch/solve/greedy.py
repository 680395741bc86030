"""AIMET AMP's greedy allocation (Pandey et al. 2023, phase 2): the baseline the ILP must beat.

Start every group at its option of least error. Then repeatedly apply the one move that lowers
the driving metric's total ``cost_m`` and costs the least objective per unit saved,
``argmin Δf / (-Δcost_m)`` with ``f = error + penalty · penalty cost`` (edge costs included in
both deltas), until every budget is met. The driving metric is the first budget's (AMP drives
BOPs only); the other budgets are only checked. Every move strictly lowers ``cost_m``, so the
walk ends: InfeasibleBudgetError when it runs out of moves first.

Ties: groups linked by ties form a class. A member may move to another option with the class's
current port; the whole class may move to a new port, each member to its option of least error
among those with that port that do not raise its own ``cost_m`` (else its cheapest there).
Pinned groups never move, and their class keeps its port.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Iterator, Mapping

from mpsearch.core.errors import InfeasibleBudgetError, UsageError
from mpsearch.solve.problem import PENALTY, Problem, Solution, SolveStatus, evaluate

__all__ = ["greedy", "greedy_path"]

log = logging.getLogger(__name__)

_TOLERANCE = 1e-9


def greedy(
    problem: Problem,
    budgets: Mapping[str, float],
    *,
    pins: Mapping[str, Hashable] = {},  # noqa: B006 - read only
    penalty: float = 0.0,
) -> Solution:
    """The first plan of the greedy walk (driven by the first budget's metric) within budget."""
    started = time.perf_counter()
    for metric, bound in budgets.items():
        problem.require_metric(metric)
        if not math.isfinite(float(bound)):
            raise UsageError(f"budget {metric} <= {bound} is not a finite number")
    metric = next(iter(budgets), None)
    last: dict[str, float] = {}
    for choice in _walk(problem, metric, pins, penalty):
        error, costs = evaluate(problem, choice)
        last = costs
        if all(costs[m] <= b + _TOLERANCE * abs(b) for m, b in budgets.items()):
            return Solution(
                choice=choice, error=error, costs=costs, budgets=dict(budgets),
                seconds=time.perf_counter() - started, status=SolveStatus.GREEDY,
            )
    parts = [f"{m} <= {b:.6g} (greedy reached {last[m]:.6g})" for m, b in budgets.items()]
    raise InfeasibleBudgetError(
        "the greedy walk ran out of moves before meeting the budgets: " + ", ".join(parts),
        fix="raise the budget, allow more formats, or use the exact solver (solve.ilp.solve)",
    )


def greedy_path(
    problem: Problem,
    metric: str,
    *,
    pins: Mapping[str, Hashable] = {},  # noqa: B006 - read only
    penalty: float = 0.0,
) -> tuple[Solution, ...]:
    """Every plan of the walk driven by ``metric``, from least error until no move saves."""
    problem.require_metric(metric)
    path = []
    for choice in _walk(problem, metric, pins, penalty):
        error, costs = evaluate(problem, choice)
        path.append(Solution(choice=choice, error=error, costs=costs, status=SolveStatus.GREEDY))
    return tuple(path)



def _classes(problem: Problem) -> list[list[str]]:
    """Groups linked by ties (union-find), in group order."""
    parent = {g: g for g in problem.groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for tie in problem.ties:
        for g in tie[1:]:
            parent[root(g)] = root(tie[0])
    classes: dict[str, list[str]] = {}
    for g in problem.groups:
        classes.setdefault(root(g), []).append(g)
    return list(classes.values())


def _walk(
    problem: Problem, metric: str | None, pins: Mapping[str, Hashable], penalty: float
) -> Iterator[dict[str, Hashable]]:
    if not (math.isfinite(penalty) and penalty >= 0):
        raise UsageError(f"penalty={penalty} must be finite and >= 0")
    pinned = {g: problem.option_index(g, o) for g, o in pins.items()}
    classes = _classes(problem)
    state = _start(problem, classes, pinned)
    yield _choice(problem, state)
    if metric is None:
        return
    err = problem.error
    own = {g: problem.costs.get(metric, {}).get(g) or (0.0,) * len(err[g]) for g in err}
    incident: dict[str, list] = {g: [] for g in problem.groups}
    for e in problem.edges:
        incident[e.src].append(e)
        if e.dst != e.src:
            incident[e.dst].append(e)
    # A move must save more than rounding noise, so the walk cannot cycle.
    noise = 1e-12 * (
        sum(max(map(abs, own[g])) for g in problem.groups)
        + sum(max(e.costs.get(metric, {}).values(), default=0.0) for e in problem.edges)
    )

    def delta(changes: dict[str, int]) -> tuple[float, float]:
        d_f = sum(err[g][i] - err[g][state[g]] for g, i in changes.items())
        d_c = sum(own[g][i] - own[g][state[g]] for g, i in changes.items())
        edges = {id(e): e for g in changes for e in incident[g]}.values()
        for e in edges:
            old = (problem.ports[e.src][state[e.src]], problem.ports[e.dst][state[e.dst]])
            new = (
                problem.ports[e.src][changes.get(e.src, state[e.src])],
                problem.ports[e.dst][changes.get(e.dst, state[e.dst])],
            )
            cost, pen = e.costs.get(metric, {}), e.costs.get(PENALTY, {})
            d_c += cost.get(new, 0.0) - cost.get(old, 0.0)
            d_f += penalty * (pen.get(new, 0.0) - pen.get(old, 0.0))
        return d_f, d_c

    # Deltas per class, recomputed only where the last move changed a member or a neighbour.
    class_of = {g: k for k, members in enumerate(classes) for g in members}
    touches = {g: {g} | {h for e in incident[g] for h in (e.src, e.dst)} for g in problem.groups}
    moves: dict[int, list[tuple[dict[str, int], float, float]]] = {}
    dirty = set(range(len(classes)))
    while True:
        for k in dirty:
            moves[k] = [
                (changes, *delta(changes))
                for changes in _moves(problem, classes[k], pinned, state, own)
            ]
        best, best_rate = None, math.inf
        for k in range(len(classes)):
            for changes, d_f, d_c in moves[k]:
                if d_c < -noise and d_f / -d_c < best_rate:
                    best, best_rate = changes, d_f / -d_c
        if best is None:
            return
        state.update(best)
        dirty = {class_of[h] for g in best for h in touches[g]}
        yield _choice(problem, state)


def _start(problem: Problem, classes: list[list[str]], pinned: Mapping[str, int]) -> dict[str, int]:
    """Least error per group, per tie class the port of least summed error (pins kept)."""
    state: dict[str, int] = {}
    for members in classes:
        pinned_ports = {problem.ports[g][pinned[g]] for g in members if g in pinned}
        ports = [
            p for p in _shared_ports(problem, members) if not pinned_ports or p in pinned_ports
        ]
        best, best_error = None, math.inf
        for port in ports:
            pick = {g: _least_error(problem, g, port, pinned) for g in members}
            total = math.fsum(problem.error[g][i] for g, i in pick.items())
            if total < best_error:
                best, best_error = pick, total
        if best is None:
            raise UsageError(
                f"no plan respects the ties of groups {', '.join(members)}"
                + (" and their pins" if pinned_ports else ""),
                fix="tie only groups that share a port, and pin tied groups alike",
            )
        state.update(best)
    return {g: state[g] for g in problem.groups}


def _least_error(problem: Problem, g: str, port: Hashable, pinned: Mapping[str, int]) -> int:
    if g in pinned:
        return pinned[g]
    options = [i for i, p in enumerate(problem.ports[g]) if p == port]
    return min(options, key=lambda i: problem.error[g][i])


def _moves(
    problem: Problem, members: list[str], pinned: Mapping[str, int],
    state: Mapping[str, int], own: Mapping[str, tuple[float, ...]],
) -> Iterator[dict[str, int]]:
    """One class's moves: a member within its port, or (unpinned) the whole class to a port."""
    tied = len(members) > 1
    for g in members:
        if g in pinned:
            continue
        port = problem.ports[g][state[g]]
        for i, p in enumerate(problem.ports[g]):
            if i != state[g] and (p == port or not tied):
                yield {g: i}
    if not tied or any(g in pinned for g in members):
        return
    current = problem.ports[members[0]][state[members[0]]]
    for port in _shared_ports(problem, members):
        if port == current:
            continue
        move = {}
        for g in members:
            there = [i for i, p in enumerate(problem.ports[g]) if p == port]
            saving = [i for i in there if own[g][i] <= own[g][state[g]]]
            if saving:
                move[g] = min(saving, key=lambda i, g=g: problem.error[g][i])
            else:
                move[g] = min(there, key=lambda i, g=g: (own[g][i], problem.error[g][i]))
        yield move


def _shared_ports(problem: Problem, members: list[str]) -> list[Hashable]:
    """Ports every member can take, in the first member's order (deterministic)."""
    return [
        p for p in dict.fromkeys(problem.ports[members[0]])
        if all(p in problem.ports[g] for g in members[1:])
    ]


def _choice(problem: Problem, state: Mapping[str, int]) -> dict[str, Hashable]:
    return {g: problem.options[g][i] for g, i in state.items()}
