"""Allocation: pick one option per group to minimise predicted error within cost budgets.

Model-agnostic: a :class:`~mpsearch.solve.problem.Problem` names groups, their options (any
hashable labels), errors, costs, ties and edges; nothing there knows about ONNX.
:func:`mpsearch.solve.ilp.solve` is exact (cvxpy MILP with HiGHS),
:func:`mpsearch.solve.pareto.front` sweeps one metric, :func:`mpsearch.solve.greedy.greedy` is
AIMET AMP's baseline; :mod:`.budget` reads the user's budgets and :mod:`.allocate` builds the
problem from a layer graph and a device's costs.

May import: core, graph, hw.
"""
