"""The allocation core against brute force on small random problems (real cvxpy + HiGHS solves)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

from mpsearch.core.errors import InfeasibleBudgetError, UsageError
from mpsearch.solve.greedy import greedy, greedy_path
from mpsearch.solve.ilp import smallest, solve
from mpsearch.solve.pareto import front
from mpsearch.solve.problem import PENALTY, Edge, Problem, evaluate, ties_hold

PORTS = ("a8", "a16", "f8")
METRICS = ("latency_s", "bops")


def random_problem(rng: np.random.Generator) -> Problem:
    """2-5 groups of 2-4 options; latency (~1e-4 s) and BOPs (~1e10) costs; ties and edges."""
    n = int(rng.integers(2, 6))
    groups = tuple(f"g{i}" for i in range(n))
    options, ports, error, lat, bops = {}, {}, {}, {}, {}
    for g in groups:
        k = int(rng.integers(2, 5))
        options[g] = tuple(f"{g}c{j}" for j in range(k))
        ports[g] = tuple(PORTS[int(p)] for p in rng.integers(0, len(PORTS), k))
        error[g] = tuple(rng.uniform(0, 1, k) * rng.choice([0.01, 1.0, 100.0]))
        lat[g] = tuple(rng.uniform(1e-5, 1e-4, k))
        bops[g] = tuple(rng.uniform(1e9, 1e11, k))
    if rng.random() < 0.2:  # no ports for one group: each option is its own port
        del ports[groups[0]]
    ties = []
    if rng.random() < 0.5:
        ties.append(tuple(str(g) for g in rng.choice(groups[1:], 2 if n > 2 else 1, replace=False)))
    edges = []
    for _ in range(int(rng.integers(0, 4))):
        src, dst = (str(g) for g in rng.choice(groups, 2, replace=False))
        pairs = [(p, q) for p in PORTS for q in PORTS if p != q]
        lat_pairs = {pq: float(rng.uniform(0, 3e-5)) for pq in pairs}
        pen_pairs = {pq: float(rng.uniform(0, 0.5)) for pq in pairs}
        edges.append(Edge(src=src, dst=dst, costs={"latency_s": lat_pairs, PENALTY: pen_pairs}))
    fixed = {"latency_s": 2e-5} if rng.random() < 0.5 else {}
    return Problem(groups=groups, options=options, error=error, ports=ports, ties=tuple(ties),
                   costs={"latency_s": lat, "bops": bops}, edges=tuple(edges), fixed=fixed)


def feasible_problem(rng: np.random.Generator) -> Problem:
    """A random problem whose ties some plan can meet."""
    while True:
        problem = random_problem(rng)
        if next(plans(problem), None) is not None:
            return problem


def plans(problem: Problem, pins=None):
    """Every plan that respects the ties and pins, with its exact totals."""
    pins = pins or {}
    for combo in itertools.product(*(problem.options[g] for g in problem.groups)):
        choice = dict(zip(problem.groups, combo, strict=True))
        if all(choice[g] == o for g, o in pins.items()) and ties_hold(problem, choice):
            yield choice, *evaluate(problem, choice)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b)) + 1e-15


def within(costs, budgets) -> bool:
    return all(costs[m] <= b + 1e-9 * abs(b) for m, b in budgets.items())


def test_ilp_matches_brute_force():
    rng = np.random.default_rng(20231)
    feasible = infeasible = 0
    for _ in range(200):
        problem = random_problem(rng)
        pins = {}
        if rng.random() < 0.3:
            g = problem.groups[int(rng.integers(len(problem.groups)))]
            pins = {g: problem.options[g][int(rng.integers(len(problem.options[g])))]}
        penalty = float(rng.choice([0.0, 0.7]))
        every = list(plans(problem, pins))
        if not every:  # the pin contradicts a tie
            with pytest.raises(UsageError, match="no plan respects the ties"):
                solve(problem, {}, pins=pins)
            continue
        budgets = {}
        for m in METRICS:
            values = [c[m] for _, _, c in every]
            budgets[m] = float(rng.uniform(min(values), max(values)))
        ok = [(e + penalty * c.get(PENALTY, 0.0), c) for _, e, c in every if within(c, budgets)]
        if not ok:
            infeasible += 1
            with pytest.raises(InfeasibleBudgetError) as caught:
                solve(problem, budgets, pins=pins, penalty=penalty)
            for m in METRICS:
                least = min(c[m] for _, _, c in every)
                assert f"(smallest reachable {least:.6g})" in str(caught.value)
            continue
        feasible += 1
        sol = solve(problem, budgets, pins=pins, penalty=penalty)
        assert close(sol.objective(penalty), min(v for v, _ in ok))
        assert within(sol.costs, budgets)
        assert ties_hold(problem, sol.choice)
        assert all(sol.choice[g] == o for g, o in pins.items())
        assert (sol.error, dict(sol.costs)) == evaluate(problem, sol.choice)
    assert feasible > 50 and infeasible > 20


def test_smallest_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(20):
        problem = random_problem(rng)
        every = list(plans(problem))
        if every:
            for m in METRICS:
                assert close(smallest(problem, m), min(c[m] for _, _, c in every))


def test_tie_break_picks_the_cheapest_optimum():
    problem = Problem(groups=("a", "b"), options={"a": ("x", "y"), "b": ("u", "v")},
                      error={"a": (1.0, 1.0), "b": (0.0, 2.0)},
                      costs={"bops": {"a": (5.0, 3.0), "b": (1.0, 1.0)}})
    assert solve(problem, {}, tie_break="bops").choice == {"a": "y", "b": "u"}


def test_front_covers_every_plan():
    rng = np.random.default_rng(11)
    checked = 0
    while checked < 4:
        problem = random_problem(rng)
        every = list(plans(problem))
        if len(every) < 8:
            continue
        checked += 1
        penalty = 0.5
        fr = front(problem, "bops", points=len(every), penalty=penalty)
        pts = fr.points
        assert [p.cost for p in pts] == sorted(p.cost for p in pts)
        for a, b in itertools.pairwise(pts):  # non-dominated: dearer means strictly better
            assert b.cost > a.cost and b.error < a.error
        for _, e, c in every:
            f = e + penalty * c.get(PENALTY, 0.0)
            assert any(p.cost <= c["bops"] * (1 + 1e-9) and p.error <= f * (1 + 1e-9) + 1e-15
                       for p in pts)
        for p in pts:
            assert close(p.error, p.solution.objective(penalty))
            assert p.source in ("lagrangian", "constrained")
        mid = (pts[0].cost + pts[-1].cost) / 2
        best = fr.best_within(mid)
        ok = [e + penalty * c.get(PENALTY, 0.0) for _, e, c in every if c["bops"] <= mid]
        assert close(best.error, min(ok))
        with pytest.raises(InfeasibleBudgetError):
            fr.best_within(pts[0].cost * 0.5)


def test_front_respects_other_budgets():
    rng = np.random.default_rng(5)
    problem = feasible_problem(rng)
    every = list(plans(problem))
    cap = float(np.median([c["latency_s"] for _, _, c in every]))
    fr = front(problem, "bops", budgets={"latency_s": cap}, points=10)
    assert all(p.solution.costs["latency_s"] <= cap * (1 + 1e-9) for p in fr.points)
    ok = [e for _, e, c in every if c["latency_s"] <= cap]
    assert close(fr.points[-1].error, min(ok))
    with pytest.raises(UsageError):
        front(problem, "bops", budgets={"bops": 1.0})


def test_greedy_meets_budgets_and_never_beats_the_ilp():
    rng = np.random.default_rng(3)
    met = 0
    for _ in range(40):
        problem = random_problem(rng)
        every = list(plans(problem))
        if not every:
            continue
        budgets = {m: float(np.quantile([c[m] for _, _, c in every], q))
                   for m, q in zip(METRICS, (0.5, 0.9), strict=True)}
        try:
            g = greedy(problem, budgets, penalty=0.3)
        except InfeasibleBudgetError:
            continue
        met += 1
        assert within(g.costs, budgets) and ties_hold(problem, g.choice)
        best = solve(problem, budgets, penalty=0.3)
        assert g.objective(0.3) >= best.objective(0.3) * (1 - 1e-9)
    assert met > 15


def test_greedy_path_walks_down_the_metric():
    rng = np.random.default_rng(9)
    problem = feasible_problem(rng)
    path = greedy_path(problem, "bops")
    assert len(path) >= 2
    start = path[0]
    for g in problem.groups:  # starts at least error (modulo ties)
        if not any(g in t for t in problem.ties):
            least = int(np.argmin(problem.error[g]))
            assert start.choice[g] == problem.options[g][least]
    costs = [s.costs["bops"] for s in path]
    assert all(b < a for a, b in itertools.pairwise(costs))
    assert all(ties_hold(problem, s.choice) for s in path)


def test_pins_and_ties_hold_in_every_solver():
    problem = Problem(
        groups=("a", "b", "c"),
        options={g: ("i4", "i8", "f16") for g in "abc"},
        ports={"a": ("x", "x", "y"), "b": ("x", "y", "y"), "c": ("x", "y", "y")},
        error={g: (4.0, 1.0, 0.0) for g in "abc"},
        costs={"bops": {g: (1.0, 2.0, 4.0) for g in "abc"}},
        ties=(("a", "b"),),
    )
    pins = {"c": "i8"}
    for sol in (solve(problem, {"bops": 7.0}, pins=pins), greedy(problem, {"bops": 7.0}, pins=pins),
                *(p.solution for p in front(problem, "bops", pins=pins, points=5).points)):
        assert sol.choice["c"] == "i8" and ties_hold(problem, sol.choice)
    # tied a, b: port x is (i4|i8, i4), port y is (f16, i8|f16); a + b may cost 4 at most
    assert solve(problem, {"bops": 6.0}, pins=pins).choice == {"a": "i8", "b": "i4", "c": "i8"}
    with pytest.raises(UsageError, match="not an option"):
        solve(problem, {}, pins={"c": "fp8"})
    with pytest.raises(UsageError, match="no plan respects the ties and the pins"):
        solve(problem, {}, pins={"a": "f16", "b": "i4"})


def test_infeasible_message_names_every_budget():
    problem = Problem(groups=("a",), options={"a": ("i4", "i8")}, error={"a": (1.0, 0.0)},
                      costs={"bops": {"a": (10.0, 20.0)}, "latency_s": {"a": (2e-3, 1e-3)}},
                      fixed={"latency_s": 5e-4})
    with pytest.raises(InfeasibleBudgetError) as caught:
        solve(problem, {"bops": 5.0, "latency_s": 1e-3})
    text = str(caught.value)
    assert "bops <= 5 (smallest reachable 10)" in text
    assert "latency_s <= 0.001 (smallest reachable 0.0015)" in text
    assert text.endswith("raise the budget or allow more formats")
    with pytest.raises(InfeasibleBudgetError, match="not all together"):
        solve(problem, {"bops": 15.0, "latency_s": 1.6e-3})


@pytest.mark.parametrize("bad, message", [
    (dict(error={"a": (1.0,)}), "error of group 'a' has 1 values for 2 options"),
    (dict(error={"a": (-1.0, 0.0)}), "error of group 'a' is negative"),
    (dict(error={"a": (math.nan, 0.0)}), "error of group 'a' is not finite"),
    (dict(error={"a": (1.0, 0.0), "z": (1.0, 0.0)}), "error names unknown group 'z'"),
    (dict(ties=(("a", "z"),)), "a tie names unknown group 'z'"),
    (dict(edges=(Edge(src="a", dst="z", costs={}),)), "an edge names unknown group 'z'"),
    (dict(costs={"bops": {"a": (1.0,)}}), "bops cost of group 'a' has 1 values for 2 options"),
])
def test_problem_validation(bad, message):
    args = dict(groups=("a",), options={"a": ("i4", "i8")}, error={"a": (1.0, 0.0)})
    with pytest.raises(UsageError, match=re.escape(message)):
        Problem(**{**args, **bad})


def test_unknown_metric_and_bad_arguments():
    problem = Problem(groups=("a",), options={"a": ("i4", "i8")}, error={"a": (1.0, 0.0)},
                      costs={"bops": {"a": (1.0, 2.0)}})
    with pytest.raises(UsageError, match="unknown metric"):
        solve(problem, {"energy_j": 1.0})
    with pytest.raises(UsageError, match="penalty"):
        solve(problem, {}, penalty=-1.0)
    with pytest.raises(UsageError, match="cost"):
        Edge(src="a", dst="a", costs={"bops": {("x", "y"): -1.0}})


@pytest.mark.parametrize(("text", "needle"), [
    ("bpos=0.75", "did you mean 'bops=0.75'"), ("latncy=0.7", "did you mean 'latency=0.7'"),
    ("speed=2", "not KEY=VALUE with a known KEY"), ("bops=-1", "not a positive number")])
def test_budget_keys_are_forgiving_but_never_guessed(text, needle):
    """Keys are case-insensitive; an unknown key is refused with the nearest known one."""
    from mpsearch.solve.budget import parse_budget

    assert parse_budget("BOPS=0.75") == parse_budget("bops=0.75")
    assert parse_budget(" Size_MB = 4").key == "size_mb"
    with pytest.raises(UsageError, match=needle):
        parse_budget(text)
