"""Allocation: pick one option per group to minimise predicted error within cost budgets.

Model-agnostic: a :class:`Problem` names groups, their options (any hashable labels), errors,
costs, ties and edges; nothing here knows about ONNX. ``ilp.solve`` is exact (cvxpy MILP with
HiGHS), ``pareto.front`` sweeps one metric, ``greedy.greedy`` is AIMET AMP's baseline.
"""

from __future__ import annotations

from mpsearch.solve.greedy import greedy, greedy_path
from mpsearch.solve.ilp import TOLERANCE, smallest, solve
from mpsearch.solve.pareto import Front, FrontPoint, front
from mpsearch.solve.problem import (
    PENALTY,
    Edge,
    Problem,
    Solution,
    evaluate,
    objective,
    ties_hold,
)

__all__ = [
    "PENALTY",
    "TOLERANCE",
    "Edge",
    "Front",
    "FrontPoint",
    "Problem",
    "Solution",
    "evaluate",
    "front",
    "greedy",
    "greedy_path",
    "objective",
    "smallest",
    "solve",
    "ties_hold",
]
