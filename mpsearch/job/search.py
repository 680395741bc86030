"""The job users come for: the most accurate plan that fits a device budget, found exactly,
shown against the alternatives, exported and measured.

``search`` chains the stages: ingest and calibrate once (:func:`mpsearch.quant.analysis.analyze`,
with the layer Hessians), sensitivity per group and candidate
(:func:`mpsearch.sensitivity.estimate`, cached), the allocation problem on the device's costs
(:func:`mpsearch.solve.allocate.build_problem`), the exact ILP under every budget
(:func:`mpsearch.solve.allocate.allocate`), the baselines on the same sensitivities and costs
(each uniform candidate; AIMET AMP's greedy walk, Pandey et al. 2023 phase 2), and the Pareto
front over the first budget's quantity (Lagrangian hull plus ε-constraint solves,
:mod:`mpsearch.solve.pareto`). The chosen plan, the best uniform plan that fits, the greedy
plan and a few front points are exported and measured for real, so predicted and measured
quality sit side by side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import onnx

from mpsearch.core.errors import InfeasibleBudgetError, UsageError
from mpsearch.core.formats import Candidate, parse_candidate
from mpsearch.data.dataset import Dataset, open_dataset
from mpsearch.export.qdq import QdqModel
from mpsearch.graph.evaluate import EvalResult, evaluate, reference_run
from mpsearch.graph.layer_graph import load_model
from mpsearch.hw.cost import CostModel, PlanCost
from mpsearch.hw.profile import HardwareProfile, load_profile
from mpsearch.job.pins import resolve_pins
from mpsearch.job.polish import EVALUATIONS as POLISH_EVALUATIONS
from mpsearch.job.polish import Polish
from mpsearch.job.polish import polish as polish_plan
from mpsearch.job.refinement import (
    EXPLORE,
    EXPLORE_PAIRS,
    Refinement,
    corrected_errors,
    hopeful_errors,
    pairs_to_verify,
)
from mpsearch.job.selection import Selection, measure_plan, plan_key
from mpsearch.job.selection import select as select_plan
from mpsearch.quant.analysis import Analysis, QuantizeOptions, analyze
from mpsearch.quant.gating import Search
from mpsearch.sensitivity import (
    Method,
    SensitivityCache,
    SensitivityTable,
    candidates_for,
    estimate,
    sqnr,
    table_variant,
)
from mpsearch.sensitivity.gated import GatedCandidates, gated_candidates
from mpsearch.sensitivity.run import measure_pairs
from mpsearch.sensitivity.suffix import reference_outputs
from mpsearch.solve.allocate import Allocation, Built, allocate, build_problem
from mpsearch.solve.budget import Budget, parse_budgets
from mpsearch.solve.greedy import greedy
from mpsearch.solve.pareto import Front, front

__all__ = ["Measured", "PlanResult", "SearchResult", "search"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


@dataclass(frozen=True, kw_only=True)
class Measured:
    """A plan exported and run against FP32 on the evaluation data."""

    data: str  # "evaluation" or "calibration"
    result: EvalResult

    @property
    def sqnr_db(self) -> float:
        return self.result.primary.sqnr_db

    @property
    def top1_agreement(self) -> float | None:
        return self.result.primary.top1_agreement

    def to_dict(self) -> dict:
        p = self.result.primary
        return {"data": self.data, "samples": self.result.samples, "output": p.name,
                "sqnr_db": _num(p.sqnr_db), "cosine": _num(p.cosine),
                "top1_agreement": p.top1_agreement}


@dataclass(frozen=True, kw_only=True)
class PlanResult:
    """One plan with its costs, its predicted quality and (when measured) its real one."""

    name: str
    plan: Mapping[str, Candidate]
    cost: PlanCost
    predicted_mse: float
    predicted_sqnr_db: float
    fits: bool
    measured: Measured | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.plan.values():
            out[c.name] = out.get(c.name, 0) + 1
        return dict(sorted(out.items()))


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """What :func:`search` found; ``export`` writes the chosen plan's QDQ model."""

    analysis: Analysis = field(repr=False)
    profile: HardwareProfile
    costs: CostModel = field(repr=False)
    table: SensitivityTable = field(repr=False)
    built: Built = field(repr=False)
    errors: Mapping[tuple[str, Candidate], float] = field(repr=False)
    refinement: Refinement
    method: Method
    budgets: tuple[Budget, ...]
    limits: Mapping[str, float]
    chosen: PlanResult
    allocation: Allocation = field(repr=False)
    uniform: tuple[PlanResult, ...]
    greedy: PlanResult | None
    front: Front = field(repr=False)
    front_plans: tuple[PlanResult, ...]
    model_sha256: str
    selection: Selection | None = None  # the shortlist measured on the calibration data
    polish: Polish | None = None  # the local search from the shortlist's best, if run
    gating: GatedCandidates | None = field(default=None, repr=False)  # --gating's candidates
    chosen_model: QdqModel | None = field(default=None, repr=False)  # chosen's export, if made
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def plan(self) -> Mapping[str, Candidate]:
        return self.chosen.plan

    def qdq(self) -> QdqModel:
        if self.chosen_model is not None:
            return self.chosen_model
        return self.analysis.export(self.chosen.plan)

    def export(self, path: str | os.PathLike[str]) -> None:
        onnx.save(self.qdq().model, os.fspath(path))

    def best_uniform(self) -> PlanResult | None:
        """The uniform plan that fits with the best quality (measured where measured)."""
        fits = [u for u in self.uniform if u.fits]
        if not fits:
            return None
        return max(fits, key=lambda u: u.measured.sqnr_db if u.measured else u.predicted_sqnr_db)


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _no_progress(label: str, total: int):
    return nullcontext(lambda n: None)


def search(model: str | os.PathLike[str] | onnx.ModelProto,
           profile: str | os.PathLike[str] | HardwareProfile,
           data: str | os.PathLike[str] | Dataset, *,
           budget: str | Sequence[str | Budget] | Mapping[str, float],
           eval_data: str | os.PathLike[str] | Dataset | None = None,
           method: Method | str = Method.HESSIAN,
           candidates: Sequence[Candidate | str] | None = None,
           sparsity: str = "none",
           gating: str | None = None,
           pin: Mapping[str, str | Candidate] | None = None,
           keep_float: Iterable[str] = (),
           convert_penalty: float = 0.0,
           front_points: int = 2,
           measure: bool = True,
           all_uniform: bool = False,
           refine: int = 3,
           explore: float = EXPLORE,
           select: bool = True,
           polish: int = POLISH_EVALUATIONS,
           seed: int = 0,
           options: QuantizeOptions | None = None,
           cache_dir: str | os.PathLike[str] | None = None, use_cache: bool = True,
           workers: int = 1,
           progress: Progress | None = None) -> SearchResult:
    """The most accurate plan of ``model`` on ``profile`` within ``budget`` (e.g.
    ``"latency=0.7"``, ``["bops=0.9", "size_mb=4"]`` or ``{"latency": 0.7}``).

    ``pin``: layer -> candidate it must take; ``keep_float``: layers left in float.
    ``sparsity``: which of the profile's sparse candidates the groups may also take ("none",
    "2:4", "unstructured", "all"; :func:`mpsearch.sensitivity.table.legal_candidates`).
    ``gating``: "gates" (Bayesian-Bits gates) or "exact" adds, per group whose output channels
    can be pruned, the (bit-width, channels kept) configurations of a ``λ`` sweep as candidates
    (:mod:`mpsearch.sensitivity.gated`); None: none.
    ``refine``: rounds of measuring the pairs the plan departs from w8a8 on and solving again
    (:mod:`mpsearch.job.refinement`; 0: trust the predictions). ``select``: measure a shortlist of
    plans that fit (the ILP's of every refinement round, greedy's, the
    best uniform one) on the calibration data and ship the best measured
    (:mod:`mpsearch.job.selection`; False: ship the ILP's plan).
    ``convert_penalty``: error charged per format conversion between adjacent layers, as a
    fraction of the all-w8a8 plan's predicted error (0, the default: conversions cost only
    their latency).

    ``data``: calibration data (also what sensitivities are measured on); ``eval_data``: where
    the exported plans are measured (default: the calibration data). ``front_points``: how many
    Pareto-front points besides the chosen plan are exported and measured (those nearest the
    budget, where the measured front matters; spread evenly when the budget bounds nothing,
    as for ``mpsearch pareto``). ``measure=False``
    skips every evaluation. Of the uniform plans that fit, the one predicted best is measured
    (``all_uniform=True``: all of them). ``seed`` seeds everything random (the noise of the
    gain runs).
    """
    progress = progress or _no_progress
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    budgets = parse_budgets([budget] if isinstance(budget, (str, Budget)) else budget)
    if not budgets:
        raise UsageError("no budget given", fix="pass e.g. --budget latency=0.7")
    if not convert_penalty >= 0:
        raise UsageError(f"convert penalty {convert_penalty} is negative",
                         fix="pass 0 or a positive number")
    method = Method(method)
    if gating is not None and gating not in {s.value for s in Search}:
        raise UsageError(f"unknown gating search '{gating}'",
                         fix=f"use one of {', '.join(s.value for s in Search)}, or None")
    model_proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    sha = hashlib.sha256(model_proto.SerializeToString(deterministic=True)).hexdigest()
    prof = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    calib = data if isinstance(data, Dataset) else open_dataset(data, model_proto,
                                                                name="calibration")
    evald = None
    if eval_data is not None:
        evald = eval_data if isinstance(eval_data, Dataset) else open_dataset(
            eval_data, model_proto, name="evaluation")
    opts = options or QuantizeOptions()
    with progress("calibrating", len(calib)) as advance:
        analysis = analyze(model_proto, calib, options=opts, hessians=True, progress=advance)
    lg = analysis.graph
    costs = CostModel(lg, prof)
    only = None if candidates is None else tuple(
        c if isinstance(c, Candidate) else parse_candidate(c) for c in candidates)
    cands = candidates_for(lg, costs, only, sparsity=sparsity)
    gated = None
    if gating is not None:
        with progress(f"gating ({gating})", None):
            gated = gated_candidates(analysis, costs, cands, metric=budgets[0].metric,
                                     search=Search(gating))
        for g, extra in gated.by_group.items():
            cands[g] = (*cands[g], *extra)
    pins = resolve_pins(analysis, costs, cands, pin or {}, keep_float)
    for g, c in pins.items():
        if c not in cands[g]:
            cands[g] = (*cands[g], c)
    seconds["calibrate"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    cache = None
    if use_cache:
        cache = SensitivityCache.for_settings(cache_dir, model=model_proto,
                                              batches=calib.batches(opts.batch_size),
                                              options=opts, seed=seed)
    variant = table_variant(method, cands)
    cached = cache.table(variant) if cache is not None else None
    if cached is not None:
        table = SensitivityTable.from_dict(cached)
    else:
        with progress(f"sensitivity ({method.value})",
                      sum(len(v) for v in cands.values())) as advance:
            table = estimate(analysis, calib, cands, method=method, workers=workers,
                             cache=cache, progress=advance, seed=seed, predict=True)
        if cache is not None:
            cache.save_table(variant, table.to_dict())
    seconds["sensitivity"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    errors = {(g, c): table.error(g, c) for g in lg.group_names for c in cands[g]}
    known = dict(table.measured)
    rounds: list[int] = []
    round_plans: list[dict[str, Candidate]] = []
    scales: dict[str, float] = {}
    batches = tuple(calib.batches(opts.batch_size))
    ref_out = None
    for r in range(refine + 1):
        ref_error = sum(errors.get((g, costs.reference), 0.0) for g in lg.group_names)
        built = build_problem(lg, costs, cands, errors, input_noise=table.input_noise,
                              convert_weight=convert_penalty * ref_error)
        alloc = allocate(built.problem, costs, budgets, pins=pins, penalty=1.0)
        round_plans.append(dict(alloc.plan))
        todo = pairs_to_verify(alloc.plan, costs.reference, cands, known) if r < refine else []
        if r < refine and explore > 1:  # also what the plan would be if the unmeasured
            hopeful = hopeful_errors(errors, alloc.plan, known, explore)  # were better
            hb = build_problem(lg, costs, cands, hopeful, input_noise=table.input_noise,
                               convert_weight=convert_penalty * ref_error)
            try:
                other = allocate(hb.problem, costs, budgets, pins=pins, penalty=1.0).plan
            except InfeasibleBudgetError:
                other = {}
            todo += [k for k in pairs_to_verify(other, costs.reference, cands, known)
                     if k not in todo][:EXPLORE_PAIRS]
        if not todo:
            break
        if ref_out is None:
            ref_out = (analysis.calibration.reference_for(batches)
                       or reference_outputs(lg, batches))
        with progress(f"verifying the plan (round {r + 1})", len(todo)) as advance:
            known.update(measure_pairs(analysis, batches, todo, workers=workers, cache=cache,
                                       reference=ref_out, progress=advance))
        rounds.append(len(todo))
        errors, scales = corrected_errors(table, known, cands)
    refinement = Refinement(measured={k: v for k, v in known.items()
                                      if k not in table.measured},
                            rounds=tuple(rounds), scales=scales)
    problem, penalty = built.problem, 1.0  # the edges' pairwise term counts in full
    limits = alloc.limits
    seconds["refine"] = time.perf_counter() - t1

    def result(name: str, plan: Mapping[str, Candidate]) -> PlanResult:
        cost = costs.plan(plan)
        mse = built.predicted_error(plan)
        fits = all(cost.as_dict()[m] <= lim * (1 + 1e-9) for m, lim in limits.items())
        return PlanResult(name=name, plan=dict(plan), cost=cost, predicted_mse=mse,
                          predicted_sqnr_db=sqnr(table.signal, mse), fits=fits)

    chosen = result("mpsearch", alloc.plan)
    uniform = []
    for c in sorted({c for cs in cands.values() for c in cs}, key=lambda c: c.name):
        if all(c in cands[g] for g in lg.group_names):
            uniform.append(result(f"uniform {c.name}", {g: c for g in lg.group_names}))
    greedy_plan = None
    try:
        gsol = greedy(problem, limits, pins=pins, penalty=penalty)
        greedy_plan = result("greedy (AMP)", dict(gsol.choice))
    except InfeasibleBudgetError:
        log.info("the greedy walk found no plan within the budgets")
    metric = budgets[0].metric
    others = {m: v for m, v in limits.items() if m != metric}
    # The front's ILPs run on a second thread while the shortlist and the polish run their
    # plans in ONNX Runtime, which releases the GIL (the front is needed only after them).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="front")
    front_job = pool.submit(front, problem, metric, budgets=others, points=FRONT_SOLVES,
                            pins=pins, penalty=penalty)
    pool.shutdown(wait=False)
    seconds["solve"] = time.perf_counter() - t1

    exported: dict[tuple, QdqModel] = {}  # each plan exported once (shortlist, measurement)

    def export(plan: Mapping[str, Candidate]) -> QdqModel:
        key = plan_key(plan)
        if key not in exported:
            exported[key] = analysis.export(plan)
        return exported[key]

    selection, polished = None, None
    if select:
        t1 = time.perf_counter()
        shortlist = _shortlist(round_plans, chosen.predicted_sqnr_db, greedy_plan, uniform,
                               pins)
        if ref_out is None:
            ref_out = (analysis.calibration.reference_for(batches)
                       or reference_outputs(lg, batches))
        with progress("measuring the shortlist", len(shortlist)) as advance:
            selection = select_plan(analysis, shortlist, batches, ref_out, progress=advance,
                                    export=export)
        chosen = result("mpsearch", selection.best.plan)
        seconds["select"] = time.perf_counter() - t1
        if polish > 0:
            t1 = time.perf_counter()
            with progress("polishing on measured error", polish) as advance:
                polished = polish_plan(
                    selection.best.plan, selection.best.calibration_mse,
                    selection.best.samples, name=selection.best.name, built=built,
                    costs=costs, limits=limits, pins=pins, evaluations=polish, progress=advance,
                    tried=[c.plan for c in selection.contenders],
                    measure=lambda plan: measure_plan(analysis, plan, batches, ref_out,
                                                      export=export))
            chosen = result("mpsearch", polished.plan)
            seconds["polish"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    fr = front_job.result()
    seconds["front (waited)"] = time.perf_counter() - t1
    front_plans = tuple(result(f"front {i}", dict(p.solution.choice))
                        for i, p in enumerate(_front_sample(fr, front_points, limits[metric],
                                                            chosen.plan)))
    if measure:
        t1 = time.perf_counter()
        which = "evaluation" if evald is not None else "calibration"
        ds = evald if evald is not None else calib
        fitting = [u for u in uniform if u.fits]
        if not all_uniform:  # the uniform plan that fits with the best predicted quality
            fitting = sorted(fitting, key=lambda u: -u.predicted_sqnr_db)[:1]
        todo = [chosen, *([greedy_plan] if greedy_plan else []), *fitting, *front_plans]
        done: dict[tuple, Measured] = {}
        with progress("measuring plans", len(todo)) as advance:
            fp32 = reference_run(analysis.original, ds.batches(opts.batch_size))
            for pr in todo:
                key = plan_key(pr.plan)
                if key not in done:
                    done[key] = Measured(data=which, result=evaluate(
                        analysis.original, export(pr.plan).model, labels=ds.labels,
                        reference_outputs=fp32))
                advance(1)

        def with_measured(pr: PlanResult) -> PlanResult:
            m = done.get(plan_key(pr.plan))
            return dataclasses.replace(pr, measured=m) if m else pr

        chosen = with_measured(chosen)
        greedy_plan = with_measured(greedy_plan) if greedy_plan else None
        uniform = [with_measured(u) for u in uniform]
        front_plans = tuple(with_measured(p) for p in front_plans)
        seconds["measure"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    return SearchResult(analysis=analysis, profile=prof, costs=costs, table=table,
                        built=built, errors=errors, refinement=refinement, method=method,
                        budgets=budgets, limits=limits, chosen=chosen,
                        allocation=alloc,
                        uniform=tuple(uniform), greedy=greedy_plan, front=fr,
                        front_plans=front_plans, model_sha256=sha, selection=selection,
                        polish=polished,
                        chosen_model=exported.get(plan_key(chosen.plan)),
                        gating=gated, seconds=seconds)


FRONT_SOLVES = 20  # solves per side of the front, Lagrangian and ε-constraint (30: 1.5x the time)
UNIFORM_MARGIN_DB = 3.0  # a uniform plan predicted this far below the ILP's is not measured


def _shortlist(round_plans: Sequence[Mapping[str, Candidate]], ilp_db: float,
               greedy_plan: PlanResult | None, uniform: Sequence[PlanResult],
               pins: Mapping[str, Candidate]) -> list[tuple[str, Mapping[str, Candidate]]]:
    """Plans that meet every limit by the exact cost model and keep every pin, the final ILP
    plan first (every round's plan met the same budgets and pins; ``ilp_db``: the final plan's
    predicted SQNR)."""
    out: list[tuple[str, Mapping[str, Candidate]]] = [("ILP", round_plans[-1])]
    out += [(f"ILP round {i + 1}", p) for i, p in enumerate(round_plans[:-1])]
    if greedy_plan is not None and greedy_plan.fits:
        out.append(("greedy", greedy_plan.plan))
    fitting = sorted((u for u in uniform
                      if u.fits and all(u.plan[g] == c for g, c in pins.items())),
                     key=lambda u: -u.predicted_sqnr_db)
    if fitting and fitting[0].predicted_sqnr_db >= ilp_db - UNIFORM_MARGIN_DB:
        out.append((fitting[0].name, fitting[0].plan))
    return out


def _front_sample(fr: Front, count: int, limit: float, chosen: Mapping[str, Candidate]):
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
