"""From a model's groups, sensitivities and device costs to the allocation problem, and a plan
that meets every budget under the exact cost model.

The ILP (:mod:`mpsearch.solve.ilp`) sees, per group and candidate, the predicted output error
and the layer's latency, bit-operations, weight bytes and energy from
:class:`mpsearch.hw.cost.CostModel` (with a latency table, each group also carries its share of
the non-layer ops' time, as the cost model charges it). Ties: the groups meeting at an Add or
Concat share an activation format (the candidates' "port"). Format conversions are pairwise
costs on the edges between a producing group and the layers that read its tensor, charged when
their activation formats differ (``per_edge + bytes · per_byte`` of the profile).

The cost model decides conversions on the whole node graph (formats propagate through
non-layer ops), which the pairwise edges only approximate. So a solved plan is checked with
:meth:`CostModel.plan`; where it exceeds a budget, that budget is tightened by the excess and
the problem solved again (at most :data:`RESOLVES` times). The returned plan meets every
budget by the exact cost model, or the call fails with the smallest reachable values.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from mpsearch.core.errors import InfeasibleBudgetError, UsageError
from mpsearch.core.formats import Candidate, Format
from mpsearch.graph.layer_graph import LayerGraph
from mpsearch.hw.cost import CostModel, PlanCost, _elements
from mpsearch.solve.budget import Budget
from mpsearch.solve.ilp import smallest, solve
from mpsearch.solve.problem import PENALTY, Edge, Problem, Solution

__all__ = ["COST_METRICS", "RESOLVES", "Allocation", "Built", "allocate", "build_problem"]

log = logging.getLogger(__name__)

COST_METRICS = ("latency_s", "bops", "weight_bytes", "energy_j")
RESOLVES = 5


def _port(c: Candidate) -> Format:
    return c.activation if c.activation.is_quantized else Format.FLOAT


def _direct_producer(lg: LayerGraph, act_name: str) -> str | None:
    """The layer whose output quantizer ``act_name`` is (its output, or after a fused
    Relu/Clip), else None."""
    act = lg.activations.get(act_name)
    if act is None or act.producer is None:
        return None
    if act.producer in lg.layers:
        return act.producer
    info = lg.op_info(act.producer)
    if info is not None and info.fuses_into_producer:
        inner = [i for i in lg.nodes[act.producer].input if i in lg.activations]
        if len(inner) == 1 and lg.activations[inner[0]].producer in lg.layers:
            return lg.activations[inner[0]].producer
    return None


@dataclass(frozen=True, kw_only=True)
class Built:
    """The problem, and per edge the correction its objective adds to the summed
    single-group errors (before the constant shift that keeps edge costs non-negative)."""

    problem: Problem
    corrections: Mapping[tuple[str, str], Mapping[tuple[Format, Format], float]]
    shift: float  # the constant the edges add to every plan's objective

    def predicted_error(self, plan: Mapping[str, Candidate]) -> float:
        """Summed single-group errors plus the pairwise corrections: the plan's prediction."""
        e = sum(self.problem.error[g][self.problem.option_index(g, plan[g])]
                for g in self.problem.groups)
        for (src, dst), table in self.corrections.items():
            e += table.get((_port(plan[src]), _port(plan[dst])), 0.0)
        return max(e, 0.0)


def build_problem(lg: LayerGraph, costs: CostModel,
                  candidates: Mapping[str, Sequence[Candidate]],
                  error: Mapping[tuple[str, Candidate], float], *,
                  input_noise: Mapping[tuple[str, str], float] | None = None,
                  convert_weight: float = 0.0) -> Built:
    """The :class:`Problem` of ``lg`` on ``costs``' device with the predicted ``error``.

    Single-group errors count a tensor's rounding noise twice when its producer and consumer
    both quantize it (the producer's output quantizer and the consumer's input quantizer are
    one Q/DQ pair in the exported model), and they credit a 16-bit producer with less noise
    that its 8-bit consumer puts back. With ``input_noise`` (the consumer's input-noise share,
    per activation format), each producer-consumer edge corrects the sum by ``-N(finer)``: the
    tensor carries the coarser format's noise once. ``convert_weight``: error charged per
    conversion (``--convert-penalty``). Both enter the ILP as the objective's pairwise term."""
    groups = tuple(g for g in lg.group_names if candidates.get(g))
    missing = [g for g in lg.group_names if not candidates.get(g)]
    if missing:
        raise UsageError(f"group {missing[0]} has no candidate to choose from",
                         fix="allow a format for its op in the profile")
    opts = {g: tuple(candidates[g]) for g in groups}
    table = costs.table
    cost_rows: dict[str, dict[str, tuple[float, ...]]] = {m: {} for m in COST_METRICS}
    for g in groups:
        lcs = [costs.layer(g, c) for c in opts[g]]
        cost_rows["latency_s"][g] = tuple(lc.latency_s + costs.other_ops_s({g: c})
                                          for lc, c in zip(lcs, opts[g], strict=True))
        cost_rows["bops"][g] = tuple(lc.bops for lc in lcs)
        cost_rows["weight_bytes"][g] = tuple(lc.weight_bytes for lc in lcs)
        cost_rows["energy_j"][g] = tuple(lc.energy_j for lc in lcs)
    p = costs.profile
    per_byte = table.conversion_s_per_byte if table else p.conversion.per_byte_s
    per_edge = 0.0 if table else p.conversion.per_edge_s
    ports = {g: tuple(_port(c) for c in opts[g]) for g in groups}
    noise = dict(input_noise or {})
    edges, corrections, shift = [], {}, 0.0
    seen: set[tuple[str, str]] = set()
    for act in lg.activations.values():
        srcs = ({act.producer} if act.producer in lg.layers else set(act.source_groups))
        srcs &= set(groups)
        direct = _direct_producer(lg, act.name)
        elements = _elements(act.shape)
        for dst in act.consumers:
            if dst not in opts:
                continue
            for src in sorted(srcs):
                if src == dst or (src, dst) in seen:
                    continue
                seen.add((src, dst))
                lat, corr = {}, {}
                for a in sorted(set(ports[src]), key=lambda f: f.name):
                    for b in sorted(set(ports[dst]), key=lambda f: f.name):
                        if a != b and a.is_quantized and b.is_quantized:
                            lat[(a, b)] = per_edge + elements * (a.bits + b.bits) / 8 * per_byte
                        if src == direct and a.is_quantized and b.is_quantized:
                            corr[(a, b)] = -min(noise.get((dst, a.name), 0.0),
                                                noise.get((dst, b.name), 0.0))
                low = min(corr.values(), default=0.0)
                pen = {}
                for a in set(ports[src]):
                    for b in set(ports[dst]):
                        v = corr.get((a, b), 0.0) - low
                        if (a, b) in lat:
                            v += convert_weight
                        if v > 0:
                            pen[(a, b)] = v
                if any(corr.values()):
                    corrections[(src, dst)] = corr
                    shift += -low
                if lat or pen:
                    edges.append(Edge(src=src, dst=dst, costs={"latency_s": lat, PENALTY: pen}))
    ties = tuple(tuple(sorted(t & set(groups))) for t in lg.tie_classes()
                 if len(t & set(groups)) > 1)
    problem = Problem(groups=groups, options=opts,
                      error={g: tuple(float(error.get((g, c), 0.0)) for c in opts[g])
                             for g in groups},
                      costs=cost_rows, ports=ports, ties=ties, edges=tuple(edges))
    return Built(problem=problem, corrections=corrections, shift=shift)


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """A plan that meets the budgets by the exact cost model."""

    plan: Mapping[str, Candidate]
    predicted_error: float  # the sum of the groups' predicted errors
    cost: PlanCost
    limits: Mapping[str, float]  # metric -> the limit the budgets set
    solution: Solution  # the ILP's last solve (its costs are the pairwise approximation)
    resolves: int


def allocate(problem: Problem, costs: CostModel, budgets: Sequence[Budget], *,
             pins: Mapping[str, Hashable] | None = None, penalty: float = 1.0) -> Allocation:
    """The least-error plan of ``problem`` within ``budgets`` (``penalty``: the weight of the
    edges' pairwise objective term, 1 for a :class:`Built` problem)."""
    pins = dict(pins or {})
    ref = costs.plan({g: costs.reference for g in costs.lg.group_names}, relative=False)
    limits = {b.metric: b.limit(ref.as_dict()) for b in budgets}
    work = dict(limits)
    sol = None
    for attempt in range(RESOLVES + 1):
        try:
            sol = solve(problem, work, pins=pins, penalty=penalty, tie_break="latency_s")
        except InfeasibleBudgetError:
            if attempt == 0:
                raise _infeasible(problem, costs, budgets, pins, ref) from None
            break
        plan = dict(sol.choice)
        exact = costs.plan(plan)
        over = {m: exact.as_dict()[m] - lim for m, lim in limits.items()
                if exact.as_dict()[m] > lim * (1 + 1e-9)}
        if not over:
            return Allocation(plan=plan, predicted_error=sol.error, cost=exact, limits=limits,
                              solution=sol, resolves=attempt)
        log.debug("plan exceeds %s by the exact cost model; tightening", over)
        for m, excess in over.items():
            work[m] = work[m] - excess * 1.01
    raise InfeasibleBudgetError(
        "no plan found that meets " + ", ".join(str(b) for b in budgets)
        + " once format conversions are counted exactly",
        fix="raise the budget slightly or pass --convert-penalty to discourage conversions")


def _infeasible(problem: Problem, costs: CostModel, budgets: Sequence[Budget],
                pins: Mapping[str, Hashable], ref: PlanCost) -> InfeasibleBudgetError:
    parts = []
    for b in budgets:
        low = smallest(problem, b.metric, pins=pins)
        parts.append(f"{b} (smallest reachable {b.key}="
                     f"{b.in_user_units(low, ref.as_dict()):.4g})")
    return InfeasibleBudgetError(
        "no plan meets the budget: " + "; ".join(parts),
        fix="raise the budget to at least the smallest reachable value, or allow more formats "
            "in the profile")
