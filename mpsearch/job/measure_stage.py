"""Which plans a search measures against FP32, and the stage that measures them.

The shortlist the selection weighs (:func:`shortlist`: the ILP's plans, greedy's, the uniform
plans that fit within :data:`UNIFORM_MARGIN_DB` of the best), the front points marked as
measured on the report's figure (:func:`front_sample`), and the measure stage
(:func:`measure_plans`): the shipped plan, its baselines and the reference on every part of the
data (fit, check, evaluation), the front points on the last part, one ONNX Runtime session per
plan, the plans side by side (:func:`mpsearch.core.threads.fan_out`).

Apart from :mod:`mpsearch.job.search` as :mod:`mpsearch.job.target_search` is: the functions
take the job, read what its stages left (``job.chosen``, ``job.uniform``, ``job.front_plans``)
and write the measured results back to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mpsearch.core.formats import Candidate
from mpsearch.core.threads import fan_out
from mpsearch.graph.evaluate import evaluate, reference_run
from mpsearch.graph.folding import measuring_session, requantized_by_ort
from mpsearch.job.result import DataRole, Measured, PlanResult
from mpsearch.job.selection import plan_key
from mpsearch.solve.pareto import Front

__all__ = ["UNIFORM_MARGIN_DB", "fitting_uniform", "front_sample", "measure_plans",
           "shortlist", "warn_requantized"]

UNIFORM_MARGIN_DB = 3.0  # uniform plans predicted this far below the best fitting one: not
# measured (w4a8 is predicted 20 dB below w8a8 on EfficientNet-Lite0)


def warn_requantized(job: Any) -> None:
    """On ONNX Runtime's CPU EP, a layer the plan keeps float between quantized
    activations is quantized to int8 by ORT itself (:func:`requantized_by_ort`): say so,
    and how to keep it float."""
    if job.profile.runtime != "ort-cpu":
        return
    names = requantized_by_ort(job.export(job.chosen.plan).model)
    if names:
        job._warn(f"ONNX Runtime's CPU EP quantizes the float weights of {len(names)} "
                  f"layer(s) the plan leaves unquantized ({', '.join(names[:3])}"
                  f"{' ...' if len(names) > 3 else ''}) to int8 per tensor, as they read a "
                  "quantized activation (its WeightBiasQuantization pass; the figures here "
                  "include it); to run them float, create the session with "
                  "disabled_optimizers=['WeightBiasQuantization']")


def measure_plans(job: Any) -> None:
    """The measure stage: every plan the run reports on, against FP32, on each part of the
    data (module docstring); the job's plans get their figures."""
    mc = job.config.measurement
    if job.evald is None:
        job._warn("no evaluation data (--eval-data): the plan is measured only on --data "
                  "(its check part chose it, the rest fitted it), which flatters it; pass "
                  "--eval-data from other sources (other photos, speakers, texts)")
    with job._stage("measure"):
        parts = [(DataRole.FIT, job.calib), (DataRole.CHECK, job.check),
                 (DataRole.EVALUATION, job.evald)]
        parts = [(r, ds) for r, ds in parts if ds is not None]
        ref = job.costs.reference
        fitting = [u for u in job.uniform if u.fits]
        if not mc.all_uniform:  # those the shortlist weighed, and the reference
            fitting = fitting_uniform(job.uniform, job.pins)
        reference = [u for u in job.uniform if u.name == f"uniform {ref.name}"]
        named = [job.chosen, *([job.greedy] if job.greedy else []), *reference, *fitting]
        plans = {plan_key(pr.plan): pr.plan for pr in (*named, *job.front_plans)}
        # the front's other points mark the figure's measured front: the last part only
        # (the evaluation data where there is some), 16% of this stage on the demo
        every_part = {plan_key(pr.plan) for pr in named}
        original = job.analysis.original
        last = len(parts) - 1
        parts_of = {k: range(len(parts)) if k in every_part else [last] for k in plans}
        with job.progress("measuring plans", sum(map(len, parts_of.values()))) as advance:
            checked = job.check if job.check is not None else job.calib
            fp32 = fan_out(lambda part, threads: (
                job.check_fp32() if part[1] is checked else reference_run(
                    original, part[1].batches(job.config.quantize.batch_size),
                    threads=threads)), parts)
            models = {k: job.export(plan).model for k, plan in plans.items()}

            def run(key: tuple, threads: int) -> list[Measured]:
                sess = measuring_session(models[key], threads=threads)  # one per plan
                out = []
                for p in parts_of[key]:
                    (role, ds), ref = parts[p], fp32[p]
                    out.append(Measured(data=role, result=evaluate(
                        original, sess, labels=ds.labels, reference_outputs=ref)))
                    advance(1)
                return out

            done = dict(zip(plans, fan_out(run, list(plans)), strict=True))

        def with_measured(pr: PlanResult) -> PlanResult:
            figs = tuple(done.get(plan_key(pr.plan), ()))
            if not figs:
                return pr
            return dataclasses.replace(pr, measured=figs[-1], figures=figs)

        job.chosen = with_measured(job.chosen)
        job.greedy = with_measured(job.greedy) if job.greedy else None
        job.uniform = [with_measured(u) for u in job.uniform]
        job.front_plans = tuple(with_measured(p) for p in job.front_plans)


def shortlist(round_plans: Sequence[Mapping[str, Candidate]], greedy_plan: PlanResult | None,
               uniform: Sequence[PlanResult], pins: Mapping[str, Candidate]
               ) -> list[tuple[str, Mapping[str, Candidate]]]:
    """Plans that meet every limit by the exact cost model and keep every pin, the final ILP
    plan first (every round's plan met the same budgets and pins), then greedy's, then every
    uniform plan that fits predicted within :data:`UNIFORM_MARGIN_DB` of the best such one."""
    out: list[tuple[str, Mapping[str, Candidate]]] = [("ILP", round_plans[-1])]
    out += [(f"ILP round {i + 1}", p) for i, p in enumerate(round_plans[:-1])]
    if greedy_plan is not None and greedy_plan.fits:
        out.append(("greedy", greedy_plan.plan))
    return out + [(u.name, u.plan) for u in fitting_uniform(uniform, pins)]


def fitting_uniform(uniform: Sequence[PlanResult], pins: Mapping[str, Candidate]
                     ) -> list[PlanResult]:
    """The uniform plans that fit and keep every pin, predicted within
    :data:`UNIFORM_MARGIN_DB` of the best of them, best predicted first."""
    fitting = sorted((u for u in uniform
                      if u.fits and all(u.plan[g] == c for g, c in pins.items())),
                     key=lambda u: -u.predicted_sqnr_db)
    return [u for u in fitting
            if u.predicted_sqnr_db >= fitting[0].predicted_sqnr_db - UNIFORM_MARGIN_DB]


def front_sample(fr: Front, count: int, limit: float, chosen: Mapping[str, Candidate]):
    """``count`` front points to measure: those nearest ``limit`` in log-cost (the chosen plan
    left out, it is measured anyway), or, when the limit lies beyond the whole front, spread
    evenly by cost with the ends included."""
    pts = [p for p in fr.points if dict(p.solution.choice) != dict(chosen)]
    if count <= 0 or not pts:
        return []
    if len(pts) <= count:
        return pts
    if limit < pts[-1].cost:
        near = sorted(pts, key=lambda p: abs(math.log(max(p.cost, 1e-300) / limit)))[:count]
        return sorted(near, key=lambda p: p.cost)
    idx = sorted({round(i * (len(pts) - 1) / (count - 1)) for i in range(count)}) \
        if count > 1 else [len(pts) // 2]
    return [pts[i] for i in idx]
