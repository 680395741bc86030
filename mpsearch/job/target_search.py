"""The search for a quality target (:mod:`mpsearch.job.target`): the least cost limit whose
searched plan meets the target on the check part, by bisection, each step one search of the
job without its polish.

Apart from :mod:`mpsearch.job.search` because it is a loop *around* the job's stages (refine,
baselines, select), not a stage of its own; it drives them through the job's methods and
reads what they leave (``job.chosen``, ``job.uniform``), and returns what the job keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Candidate
from mpsearch.graph.evaluate import evaluate
from mpsearch.job.target import Step, Target, bisect
from mpsearch.sensitivity.table import sqnr
from mpsearch.solve.budget import BUDGET_KEYS, Budget
from mpsearch.solve.ilp import smallest, solve
from mpsearch.solve.pareto import FRONT_SOLVES, front

__all__ = ["TargetMet", "meet_target", "quality", "relative_key"]


@dataclass(frozen=True, kw_only=True)
class TargetMet:
    """The budgets of the cheapest search that met the target, the target as the SQNR it
    asked for (``sqnr_drop``; None otherwise) and every step of the bisection."""

    budgets: tuple[Budget, ...]
    effective: Target | None
    steps: tuple[Step, ...]


def relative_key(metric: str) -> str:
    """The budget key that limits ``metric`` relative to all-w8a8 (``bops``, ``latency``...)."""
    return next(k for k, v in BUDGET_KEYS.items() if v.metric == metric and v.relative)


def quality(job: Any, plan: Mapping[str, Candidate], t: Target) -> float:
    """``plan``'s quality in ``t``'s terms on the job's check part (else its fitted part):
    SQNR in dB, or a drop as a fraction."""
    ds = job.check if job.check is not None else job.calib
    m = evaluate(job.analysis.original, job.export(plan).model, labels=ds.labels,
                 reference_outputs=job.check_fp32()).primary
    if t.key in ("sqnr", "sqnr_drop"):
        return m.sqnr_db
    if t.key == "top1_drop":
        if m.top1_agreement is None:
            raise UsageError(f"target {t} needs a classifier output; output '{m.name}' is not "
                             "one", fix="use --target sqnr=")
        return 1.0 - m.top1_agreement
    return m.accuracy_fp32 - m.accuracy


def meet_target(job: Any) -> TargetMet:
    """The cheapest search of ``job`` whose plan meets ``job.config.target`` on the check
    part: the axis limit found by bisection, the other budgets as given. Raises a UsageError
    naming the best quality reached and the closest uniform plan when no limit meets it."""
    t, lg, costs = job.config.target, job.analysis.graph, job.costs
    effective = None
    if t.key == "sqnr_drop":  # relative to uniform w8a8 on the same check samples
        ref_plan = {g: costs.reference for g in lg.group_names}
        t = effective = t.against(quality(job, ref_plan, t))
    metric = job.metric
    key = relative_key(metric)
    caps = tuple(b for b in job.config.budgets if b.metric != metric)
    ref = costs.plan({g: costs.reference for g in lg.group_names}, relative=False).as_dict()
    built = job._allocate_problem({(g, c): job.table.error(g, c) for g in lg.group_names
                                   for c in job.cands[g]})
    cap_limits = {b.metric: b.limit(ref) for b in caps}
    lo = smallest(built.problem, metric, pins=job.pins, budgets=cap_limits) / ref[metric]
    best = solve(built.problem, cap_limits, pins=job.pins, penalty=1.0)
    hi = costs.plan(dict(best.choice)).relative[metric]
    axis = next((b for b in job.config.budgets if b.metric == metric), None)
    if axis is not None:
        hi = min(hi, axis.limit(ref) / ref[metric])
    hi = max(hi, lo)
    start = 1.0
    if t.key == "sqnr":  # where the predicted front first meets it
        fr = front(built.problem, metric, budgets=cap_limits, points=FRONT_SOLVES,
                   pins=job.pins, penalty=1.0)
        meets = [p.cost / ref[metric] for p in fr.points
                 if sqnr(job.table.signal, p.solution.error) >= t.value]
        start = min(meets) if meets else hi

    def attempt(limit: float) -> float:
        job.budgets = (Budget(key=key, value=limit), *caps)
        with job.progress(f"target {t}: searching at {key} <= {limit:.3f} x w8a8", None):
            job.refine()
            job.baselines()
            if job.config.refinement.select:
                job.select(with_polish=False)
        return quality(job, job.chosen.plan, t)

    with job._stage("target"):
        limit, steps = bisect(t, attempt, lo=lo, hi=hi, start=start)
    if limit is None:
        raise _missed(job, t, steps)
    # rounded up to 3 decimals, as a user would write it (never below what met it)
    limit = min(math.ceil(limit * 1000 - 1e-9) / 1000, max(hi, limit))
    return TargetMet(budgets=(Budget(key=key, value=limit), *caps), effective=effective,
                     steps=tuple(steps))


def _missed(job: Any, t: Target, steps: Sequence[Step]) -> UsageError:
    higher = t.key == "sqnr"
    top = max(steps, key=lambda s: s.quality if higher else -s.quality)
    uniform = [(quality(job, u.plan, t), u) for u in job.uniform]
    q, u = max(uniform, key=lambda qu: qu[0] if higher else -qu[0])
    return UsageError(
        f"no plan meets target {t} on the check part: the best reached {t.shown(top.quality)}"
        f" at {job.metric} <= {top.limit:.3g} x w8a8; the closest uniform plan is {u.name}"
        f" with {t.shown(q)} at {u.cost.relative[job.metric]:.3g} x w8a8",
        fix="lower the target, or allow more formats in the profile")
