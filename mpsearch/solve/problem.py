"""The allocation problem: one option per group, additive error, additive and pairwise costs.

A plan picks one option ``c`` per group ``g``; with binaries ``x[g,c]``, ``Σ_c x[g,c] = 1``:

* error ``E(x) = Σ_g Σ_c E[g,c] x[g,c]`` (``E ≥ 0``, lower is better; the additivity
  assumption of HAWQ-V3 and AIMET AMP);
* cost of metric ``k``: ``cost_k(x) = fixed_k + Σ_g Σ_c C_k[g,c] x[g,c]
  + Σ_(s,d) W_k[s,d](port(s), port(d))``, the last sum over edges, charged by the pair of
  "ports" (e.g. activation formats) the two ends chose, e.g. a format conversion between a
  producer and a consumer. Edge metric ``"penalty"`` is not a cost to budget but a term the
  solvers add to the objective, ``E(x) + penalty · cost_penalty(x)``;
* ties: every group of a tie chooses options with equal port keys.

Nothing here knows about ONNX: groups are names, options any hashable labels.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

import numpy as np

from mpsearch.core.errors import UsageError

__all__ = [
    "PENALTY",
    "Edge",
    "Index",
    "Problem",
    "Solution",
    "SolveStatus",
    "evaluate",
    "objective",
    "ties_hold",
]

PENALTY = "penalty"

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, kw_only=True)
class Edge:
    """Extra cost ``costs[metric][(p, q)]`` when ``src`` has port ``p`` and ``dst`` port ``q``."""

    src: str
    dst: str
    costs: Mapping[str, Mapping[tuple[Hashable, Hashable], float]]

    def __post_init__(self) -> None:
        tables: dict[str, Mapping[tuple[Hashable, Hashable], float]] = {}
        for metric, table in self.costs.items():
            clean = {}
            for pair, value in table.items():
                value = float(value)
                if not math.isfinite(value) or value < 0:
                    raise UsageError(
                        f"Edge {self.src}->{self.dst}: {metric} cost {value} for ports {pair} "
                        "must be finite and >= 0"
                    )
                if value:
                    clean[tuple(pair)] = value
            tables[metric] = MappingProxyType(clean)
        object.__setattr__(self, "costs", MappingProxyType(tables))


@dataclass(frozen=True, kw_only=True)
class Problem:
    """Groups, their options, predicted errors, costs, ties and edges (see module docstring).

    ``costs[metric]`` may leave out a group (it then costs 0 in that metric); ``ports`` may
    leave out a group (each option is then its own port).
    """

    groups: tuple[str, ...]
    options: Mapping[str, tuple[Hashable, ...]]
    error: Mapping[str, tuple[float, ...]]
    costs: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    fixed: Mapping[str, float] = field(default_factory=dict)
    ports: Mapping[str, tuple[Hashable, ...]] = field(default_factory=dict)
    ties: tuple[tuple[str, ...], ...] = ()
    edges: tuple[Edge, ...] = ()

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        if len(set(groups)) != len(groups):
            raise UsageError("Problem: a group is listed twice in groups")
        known = set(groups)

        def check_known(where: str, names) -> None:
            unknown = sorted(set(names) - known, key=str)
            if unknown:
                raise UsageError(f"Problem: {where} names unknown group {unknown[0]!r}")

        check_known("options", self.options)
        check_known("error", self.error)
        check_known("ports", self.ports)
        options = {}
        for g in groups:
            opts = tuple(self.options.get(g, ()))
            if not opts:
                raise UsageError(f"Problem: group {g!r} has no options")
            if len(set(opts)) != len(opts):
                raise UsageError(f"Problem: group {g!r} lists an option twice")
            options[g] = opts
        error = {g: self._row("error", g, self.error.get(g), len(options[g])) for g in groups}
        for g, row in error.items():
            if any(v < 0 for v in row):
                raise UsageError(f"Problem: error of group {g!r} is negative; errors must be >= 0")
        costs = {}
        for metric, table in self.costs.items():
            check_known(f"costs[{metric!r}]", table)
            costs[metric] = MappingProxyType(
                {g: self._row(f"{metric} cost", g, v, len(options[g])) for g, v in table.items()}
            )
        fixed = {m: float(v) for m, v in self.fixed.items()}
        if not all(math.isfinite(v) for v in fixed.values()):
            raise UsageError("Problem: fixed costs must be finite")
        ports = {}
        for g in groups:
            row = tuple(self.ports.get(g, options[g]))
            if len(row) != len(options[g]):
                raise UsageError(
                    f"Problem: ports of group {g!r} has {len(row)} values for "
                    f"{len(options[g])} options"
                )
            ports[g] = row
        ties = tuple(tuple(t) for t in self.ties)
        for tie in ties:
            check_known("a tie", tie)
        for e in self.edges:
            check_known("an edge", (e.src, e.dst))
        set_ = object.__setattr__
        set_(self, "groups", groups)
        set_(self, "options", MappingProxyType(options))
        set_(self, "error", MappingProxyType(error))
        set_(self, "costs", MappingProxyType(costs))
        set_(self, "fixed", MappingProxyType(fixed))
        set_(self, "ports", MappingProxyType(ports))
        set_(self, "ties", ties)
        set_(self, "edges", tuple(self.edges))

    @staticmethod
    def _row(what: str, group: str, values, size: int) -> tuple[float, ...]:
        if values is None:
            raise UsageError(f"Problem: {what} of group {group!r} is missing")
        row = tuple(float(v) for v in values)
        if len(row) != size:
            raise UsageError(
                f"Problem: {what} of group {group!r} has {len(row)} values for {size} options"
            )
        if not all(math.isfinite(v) for v in row):
            raise UsageError(f"Problem: {what} of group {group!r} is not finite")
        return row

    @cached_property
    def metrics(self) -> tuple[str, ...]:
        """Every metric a plan has a total for: costs, fixed and edge metrics, in that order."""
        names = [*self.costs, *self.fixed, *(m for e in self.edges for m in e.costs)]
        return tuple(dict.fromkeys(names))

    def require_metric(self, metric: str) -> None:
        """UsageError unless some plan has a total for ``metric``."""
        if metric not in self.metrics:
            known = ", ".join(self.metrics) or "none"
            raise UsageError(f"unknown metric {metric!r}; the problem has {known}")

    @cached_property
    def index(self) -> Index:
        return Index.of(self)

    def option_index(self, group: str, option: Hashable) -> int:
        """Position of ``option`` among ``group``'s options; UsageError if it is not one."""
        if group not in self.index.position:
            raise UsageError(f"unknown group {group!r}")
        try:
            return self.index.position[group][option]
        except (KeyError, TypeError):
            raise UsageError(f"{option!r} is not an option of group {group!r}") from None


@dataclass(frozen=True, eq=False)
class Index:
    """Flat column layout of a problem: group ``g``'s option ``i`` is column ``start[g] + i``."""

    start: Mapping[str, int]
    size: int
    position: Mapping[str, Mapping[Hashable, int]]
    error: np.ndarray
    costs: Mapping[str, np.ndarray]
    port_columns: Mapping[str, Mapping[Hashable, tuple[int, ...]]]

    @classmethod
    def of(cls, problem: Problem) -> Index:
        start, n = {}, 0
        for g in problem.groups:
            start[g] = n
            n += len(problem.options[g])
        error = np.concatenate([np.asarray(problem.error[g]) for g in problem.groups])
        costs = {}
        for metric, table in problem.costs.items():
            col = np.zeros(n)
            for g, row in table.items():
                col[start[g] : start[g] + len(row)] = row
            costs[metric] = col
        port_columns = {}
        for g in problem.groups:
            by_port: dict[Hashable, list[int]] = {}
            for i, p in enumerate(problem.ports[g]):
                by_port.setdefault(p, []).append(start[g] + i)
            port_columns[g] = {p: tuple(cols) for p, cols in by_port.items()}
        position = {g: {o: i for i, o in enumerate(problem.options[g])} for g in problem.groups}
        return cls(start, n, position, error, costs, port_columns)


class SolveStatus(enum.Enum):
    """How a plan was found; the value is what ``plan.json`` writes as ``solver.status``."""

    OPTIMAL = "optimal"  # proven optimal
    OPTIMAL_INACCURATE = "optimal_inaccurate"  # optimal up to the solver's tolerances
    TIME_LIMIT = "time_limit"  # the best plan found when the time limit hit
    INFEASIBLE = "infeasible"  # no plan meets the budgets (no plan returned)
    FAILED = "failed"  # the solver gave no plan for another reason (logged)
    GREEDY = "greedy"  # the greedy baseline's plan, not a solver's


@dataclass(frozen=True, kw_only=True)
class Solution:
    """One plan and its exact totals (``costs`` include fixed and edge costs)."""

    choice: Mapping[str, Hashable]
    error: float
    costs: Mapping[str, float]
    budgets: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    seconds: float = 0.0
    status: SolveStatus = SolveStatus.OPTIMAL

    def objective(self, penalty: float = 0.0) -> float:
        """``error + penalty · cost_penalty``, what the solvers minimise."""
        return self.error + penalty * self.costs.get(PENALTY, 0.0)


def evaluate(problem: Problem, choice: Mapping[str, Hashable]) -> tuple[float, dict[str, float]]:
    """Exact totals ``(error, {metric: cost})`` of a plan (``math.fsum``: order-independent)."""
    picked = {}
    for g in problem.groups:
        if g not in choice:
            raise UsageError(f"the plan has no option for group {g!r}")
        picked[g] = problem.option_index(g, choice[g])
    error = math.fsum(problem.error[g][i] for g, i in picked.items())
    terms: dict[str, list[float]] = {m: [problem.fixed.get(m, 0.0)] for m in problem.metrics}
    for metric, table in problem.costs.items():
        terms[metric].extend(row[picked[g]] for g, row in table.items())
    for e in problem.edges:
        pair = (problem.ports[e.src][picked[e.src]], problem.ports[e.dst][picked[e.dst]])
        for metric, table in e.costs.items():
            terms[metric].append(table.get(pair, 0.0))
    return error, {m: math.fsum(values) for m, values in terms.items()}


def objective(problem: Problem, choice: Mapping[str, Hashable], penalty: float = 0.0) -> float:
    """``error + penalty · cost_penalty`` of a plan, exactly."""
    error, costs = evaluate(problem, choice)
    return error + penalty * costs.get(PENALTY, 0.0)


def ties_hold(problem: Problem, choice: Mapping[str, Hashable]) -> bool:
    """Whether every tie's groups chose options with equal ports."""
    for tie in problem.ties:
        ports = {problem.ports[g][problem.option_index(g, choice[g])] for g in tie}
        if len(ports) > 1:
            return False
    return True
