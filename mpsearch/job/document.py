"""``plan.json`` and ``plan.csv``: the chosen plan as a documented contract (README, "plan.json").

Every number is in SI units (seconds, bytes, joules) with its ratio to the all-w8a8 plan on the
same device next to it. The document holds no timings, dates or absolute paths, so the same
inputs and seed give the same bytes. ``SCHEMA`` names the version; fields are only ever added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from mpsearch.hw.cost import METRICS, PlanCost
from mpsearch.job.result import Measured
from mpsearch.job.search import PlanResult, SearchResult
from mpsearch.job.selection import plan_key
from mpsearch.sensitivity.table import sqnr

__all__ = ["SCHEMA", "plan_document", "plan_frame"]

SCHEMA = "mpsearch.plan/1"
# a plan that measures this far below its prediction is flagged, with the layers behind it
PREDICTION_SLACK_DB = 3.0
# a layer whose single-layer error measured this far above its prediction is named behind it
DEPARTURE_DB = 0.5


def _num(v: float | None, digits: int = 6) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _totals(cost: PlanCost) -> dict:
    d = cost.as_dict()
    out = {m: {"value": _num(d[m]), "relative_to_w8a8": _num(cost.relative.get(m))}
           for m in METRICS}
    out["conversions"] = cost.conversions
    return out


def _db(res: SearchResult, plan) -> float:
    mse = res.built.predicted_error(plan)
    return 10 * math.log10(res.table.signal / mse) if mse > 0 else math.inf


def _plan_summary(pr: PlanResult) -> dict:
    return {"name": pr.name, "fits": pr.fits, "formats": pr.counts(),
            "totals": _totals(pr.cost), "predicted_sqnr_db": _num(pr.predicted_sqnr_db, 4),
            "measured": _measured(pr)}


def _measured(pr: PlanResult) -> dict | None:
    """The plan's headline figure (evaluation data, else check part, else fitted part), with
    the figure on every part under ``figures``."""
    if pr.measured is None:
        return None

    def one(m: Measured) -> dict:
        return {k: (_num(v, 6) if isinstance(v, float) else
                    [_num(x, 4) for x in v] if isinstance(v, list) else v)
                for k, v in m.to_dict().items()}

    return {**one(pr.measured), "figures": {m.data.value: one(m) for m in pr.figures}}


def _placeholder_costs(res: SearchResult) -> list[str]:
    """The metrics whose figures rest on numbers the profile calls placeholders (its
    ``source`` says so): latency when no measured latency table of this model is used and the
    compute, memory or overhead figures are placeholders; energy when its figures are."""
    prof = res.profile

    def placeholder(source: str) -> bool:
        return "placeholder" in source.lower()

    out = []
    if res.costs.table is None and any(placeholder(s) for s in (
            prof.compute.source, prof.memory.source, prof.overhead_source)):
        out.append("latency_s")
    if placeholder(prof.energy.source):
        out.append("energy_j")
    return out


def _comparisons(res: SearchResult) -> list[dict]:
    """The chosen plan against uniform w8a8, the best measured uniform plan that fits and the
    greedy plan, on the same samples: the SQNR difference and its paired interval, and
    whether the interval excludes zero (module :mod:`mpsearch.graph.evaluate`)."""
    mine = res.chosen.measured
    if mine is None:
        return []
    ref = f"uniform {res.costs.reference.name}"
    fitting = [u for u in res.uniform if u.fits and u.measured is not None]
    best_u = max(fitting, key=lambda u: u.measured.sqnr_db, default=None)
    others = [u for u in res.uniform if u.name == ref and u.measured is not None]
    if best_u is not None and best_u.name != ref:
        others.append(best_u)
    if res.greedy is not None and res.greedy.measured is not None:
        others.append(res.greedy)
    out = []
    for o in others:
        m = o.measured
        same = plan_key(o.plan) == plan_key(res.plan)
        d, ci = (0.0, None) if same else mine.result.versus(m.result)
        out.append({"name": o.name, "role": "best uniform that fits" if o is best_u else
                    "reference" if o.name == ref else "baseline",
                    "fits": o.fits, "data": m.data.value, "samples": m.result.samples,
                    "metric": "sqnr_db", "difference_db": _num(d, 3),
                    "ci_db": [_num(v, 3) for v in ci] if ci else None,
                    "significant": bool(ci and (ci[0] > 0 or ci[1] < 0)), "same_plan": same,
                    "top1_difference": (None if mine.top1_agreement is None
                                        or m.top1_agreement is None else
                                        _num(mine.top1_agreement - m.top1_agreement, 4))})
    return out


def _prediction_check(res: SearchResult) -> dict | None:
    """Where the chosen plan measured more than :data:`PREDICTION_SLACK_DB` below its
    prediction: by how much, and the layers whose own measured error departs most from its
    prediction by :data:`DEPARTURE_DB` or more (single-group runs, where the search measured
    them); None otherwise."""
    m = res.chosen.measured
    short = res.chosen.predicted_sqnr_db - m.sqnr_db if m is not None else math.nan
    if not (math.isfinite(short) and short > PREDICTION_SLACK_DB):
        return None
    rows = []
    for g, c in res.plan.items():
        meas = res.table.measured.get((g, c), res.refinement.measured.get((g, c)))
        pred = res.table.predicted.get((g, c))
        if meas and pred and meas > 0 and pred > 0:
            d = 10 * math.log10(meas / pred)
            if d >= DEPARTURE_DB:  # a layer that measured as predicted is not behind it
                rows.append((d, g, c))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return {"short_by_db": _num(short, 3), "threshold_db": PREDICTION_SLACK_DB,
            "data": m.data.value,
            "layers": [{"group": g, "candidate": c.name, "measured_over_predicted_db": _num(d, 3)}
                       for d, g, c in rows[:5]],
            "note": "errors that compound within the plan, or data unlike the calibration data, "
                    "the sum of single-layer errors does not see"}


def _selection(res: SearchResult) -> dict | None:
    """The shortlist measured on the check part (mpsearch/job/selection.py)."""
    sel = res.selection
    if sel is None:
        return None
    return {"data": sel.data, "chosen": sel.best.name, "reason": sel.reason,
            "contenders": [{"name": c.name, "same_as": list(c.same_as),
                            "check_sqnr_db": _num(sqnr(sel.signal, c.check_mse), 4),
                            "predicted_sqnr_db": _num(_db(res, c.plan), 4),
                            "relative": {m: _num(v, 6) for m, v in
                                         sorted(res.costs.plan(c.plan).relative.items())}}
                           for c in sel.contenders]}


def _polish(res: SearchResult) -> dict | None:
    """The local search from the shortlist's best (mpsearch/job/polish.py)."""
    po = res.polish
    if po is None:
        return None
    sig = res.selection.signal if res.selection else res.table.signal
    return {"data": res.selection.data if res.selection else "fit", "start": po.start,
            "start_sqnr_db": _num(sqnr(sig, po.start_mse), 4),
            "sqnr_db": _num(sqnr(sig, po.check_mse), 4),
            "evaluations": len(po.steps),
            "steps": [{"changes": [{"layer": g, "from": a.name, "to": b.name}
                                   for g, a, b in st.changes],
                       "check_sqnr_db": _num(sqnr(sig, st.check_mse), 4),
                       "accepted": st.accepted} for st in po.steps]}


def plan_frame(res: SearchResult) -> pd.DataFrame:
    """One row per quantizer group along the network: formats, costs, predicted error."""
    lg, costs, table = res.analysis.graph, res.costs, res.table
    rows = []
    for g in lg.group_names:
        c = res.plan[g]
        lc = costs.layer(g, c)
        layer = lg.layers[g]
        mse = res.errors[(g, c)]
        rows.append({
            "group": g, "op_type": layer.op_type, "candidate": c.name,
            "weight_format": c.weight.name, "activation_format": c.activation.name,
            "macs": lc.macs, "latency_s": _num(lc.latency_s), "latency_from": lc.latency_from,
            "bops": _num(lc.bops), "weight_bytes": _num(lc.weight_bytes),
            "activation_bytes": _num(lc.activation_bytes), "energy_j": _num(lc.energy_j),
            "predicted_mse": _num(mse), "predicted_sqnr_db": _num(sqnr(table.signal, mse), 4),
            "measured_single_mse": _num(table.measured.get((g, c),
                                                           res.refinement.measured.get((g, c)))),
        })
    return pd.DataFrame(rows)


def plan_document(res: SearchResult, *, model: str, profile: str,
                  extra: Mapping[str, object] | None = None) -> dict:
    """The ``plan.json`` document (``model``/``profile``: as the user named them)."""
    lg = res.analysis.graph
    ref = res.costs.plan({g: res.costs.reference for g in lg.group_names}, relative=False)
    frame = plan_frame(res)
    doc = {
        "schema": SCHEMA,
        "model": {"path": model, "sha256": res.model_sha256, "groups": len(lg.group_names),
                  "layers": len(lg.layers)},
        "profile": {"path": profile, "name": res.profile.name,
                    "reference": res.costs.reference.name,
                    "placeholder_costs": _placeholder_costs(res)},
        "budgets": [{"budget": str(b), "metric": b.metric, "relative": b.relative,
                     "limit": _num(res.limits[b.metric]),
                     "limit_relative_to_w8a8": _num(res.limits[b.metric]
                                                    / ref.as_dict()[b.metric])}
                    for b in res.budgets],
        "sensitivity": {"method": res.method.value,
                        "samples": res.table.samples,
                        "fit_alpha": _num(res.table.fit.alpha) if res.table.fit else None},
        "layers": frame.to_dict(orient="records"),
        "totals": _totals(res.chosen.cost),
        "quality": {"predicted_sqnr_db": _num(res.chosen.predicted_sqnr_db, 4),
                    "predicted_mse": _num(res.chosen.predicted_mse),
                    "measured": _measured(res.chosen),
                    "prediction_check": _prediction_check(res),
                    "comparisons": _comparisons(res)},
        "data": {**dict(res.samples), "warnings": list(res.warnings)},
        "target": None if res.target is None else {
            "target": str(res.target), "key": res.target.key, "value": res.target.value,
            "label": res.target.label, "axis": res.budgets[0].metric,
            "as_sqnr": None if res.target_effective is None else res.target_effective.value,
            "limit_relative_to_w8a8": _num(res.budgets[0].value, 6),
            "steps": [{"limit_relative_to_w8a8": _num(s.limit, 6),
                       "quality": _num(s.quality, 6), "met": s.met}
                      for s in res.target_steps]},
        "gating": None if res.gating is None else {
            "search": res.gating.search.value, "seconds": _num(res.gating.seconds, 3),
            "candidates": {g: [c.name for c in cs] for g, cs in res.gating.by_group.items()},
            "masks_not_energy_order": res.gating.mask_differs},
        "solver": {"status": res.allocation.solution.status.value,
                   "resolves": res.allocation.resolves},
        "selection": _selection(res),
        "polish": _polish(res),
        "refinement": {"rounds": list(res.refinement.rounds),
                       "pairs_measured": len(res.refinement.measured),
                       "scales": {k: _num(v, 4) for k, v in sorted(res.refinement.scales.items())}},
        "baselines": [_plan_summary(u) for u in res.uniform]
        + ([_plan_summary(res.greedy)] if res.greedy else []),
        "front": {"metric": res.front.metric,
                  "points": [{"cost": _num(p.cost),
                              "relative_to_w8a8": _num(p.cost / ref.as_dict()[res.front.metric]),
                              "predicted_sqnr_db": _num(_db(res, p.solution.choice), 4),
                              "source": p.source} for p in res.front.points],
                  "measured": [_plan_summary(p) for p in res.front_plans]},
        "float_ops": [{"node": f.node, "op": f.op_type, "reason": f.reason}
                      for f in lg.float_ops],
        "candidates_dropped": [{"group": r.group, "candidate": r.candidate.name,
                                "reason": r.reason} for r in res.dropped],
        "specialized": [s.to_dict() for s in res.specialized],
    }
    if extra:
        doc.update(extra)
    return doc
