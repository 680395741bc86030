"""The job users come for: the most accurate plan that fits a device budget, found exactly,
shown against the alternatives, exported and measured.

:func:`search` chains the stages, each a method of :class:`_Job` that owns what it computes:

1. ingest and calibrate once, with the layer Hessians (:func:`mpsearch.quant.analysis.analyze`),
   and the candidates every group may take on the device, the gating sweeps' and the pins
   (:meth:`_Job.prepare`);
2. sensitivity per group and candidate (:func:`mpsearch.sensitivity.run.estimate`, cached;
   :meth:`_Job.sensitivity`);
3. the allocation problem on the device's costs and the exact ILP under every budget
   (:mod:`mpsearch.solve.allocate`), in rounds that measure what the plan rests on
   (:mod:`mpsearch.job.refinement`; :meth:`_Job.refine`);
4. the baselines on the same sensitivities and costs (each uniform candidate; AIMET AMP's greedy
   walk, Pandey et al. 2023 phase 2) and the Pareto front over the first budget's quantity
   (Lagrangian hull plus ε-constraint solves, :mod:`mpsearch.solve.pareto`, on a second thread;
   :meth:`_Job.baselines`);
5. the best measured plan of a shortlist and a measured local search from it, both on the
   *check part* of the data, which calibration never saw (:func:`~mpsearch.job.selection.
   hold_out`; :mod:`mpsearch.job.selection`, :mod:`mpsearch.job.polish`; :meth:`_Job.select`);
6. the chosen plan, uniform w8a8 (the reference every cost is relative to), the best uniform
   plan that fits, the greedy plan and a few front points exported and measured for real on
   the fitted part, the check part and the evaluation data, each with an interval over
   samples, so predicted and measured quality sit side by side (:meth:`_Job.measure`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import onnx

from mpsearch.core.errors import InfeasibleBudgetError, UsageError
from mpsearch.core.formats import Candidate, parse_candidate
from mpsearch.data.dataset import Dataset
from mpsearch.data.images import Preprocess
from mpsearch.data.synthetic import WARNING as SYNTHETIC_WARNING
from mpsearch.export.qdq import QdqModel, quantize
from mpsearch.graph.evaluate import reference_run
from mpsearch.graph.ingest import load_model
from mpsearch.hw.cost import CostModel
from mpsearch.hw.profile import HardwareProfile, load_profile
from mpsearch.job.config import SearchConfig
from mpsearch.job.inputs import check_reachable, constant_warning, control_flow, open_data
from mpsearch.job.measure_stage import front_sample, measure_plans, shortlist, warn_requantized
from mpsearch.job.pins import resolve_pins
from mpsearch.job.polish import polish
from mpsearch.job.refinement import (
    EXPLORE_PAIRS,
    Refinement,
    corrected_errors,
    hopeful_errors,
    pairs_to_verify,
)
from mpsearch.job.result import PlanResult, SearchResult
from mpsearch.job.selection import HeldOut, Selection, hold_out, measure_plan, plan_key, select
from mpsearch.job.target import Step, Target
from mpsearch.job.target_search import meet_target
from mpsearch.quant.analysis import analyze
from mpsearch.sensitivity.cache import SensitivityCache
from mpsearch.sensitivity.gated import gated_candidates
from mpsearch.sensitivity.run import estimate, measure_pairs, table_variant
from mpsearch.sensitivity.suffix import reference_outputs
from mpsearch.sensitivity.table import Refusal, SensitivityTable, candidates_for, sqnr
from mpsearch.solve.allocate import Allocation, Built, allocate, build_problem
from mpsearch.solve.budget import Budget
from mpsearch.solve.greedy import greedy
from mpsearch.solve.pareto import FRONT_SOLVES, Front, front

__all__ = ["Progress", "SearchData", "search"]

log = logging.getLogger(__name__)

# label, total (None: unknown) -> a context that yields advance(n)
Progress = Callable[[str, int | None], AbstractContextManager[Callable[[int], None]]]


DataLike = str | os.PathLike[str] | Dataset


@dataclass(frozen=True, kw_only=True)
class SearchData:
    """The data of a search: ``calibration`` (split into the part ranges, rounding and
    sensitivities are fitted on and the check part plans are chosen on,
    :func:`mpsearch.job.selection.hold_out`) and ``evaluation`` (held out of everything; the
    exported plans are measured on it too; None: only on the two parts)."""

    calibration: DataLike
    evaluation: DataLike | None = None
    # input -> the model axis its samples go to, or None for an input given once (a state, a
    # sample rate); inputs not named: inferred (mpsearch.data.spec.DataSpec.from_model)
    sample_axes: Mapping[str, int | None] = dataclasses.field(default_factory=dict)
    synthetic: bool = False  # calibration data made up (mpsearch.data.synthetic): warned of
    preprocess: Preprocess | None = None  # how folders of images become samples


def _no_progress(label: str, total: int | None):
    return nullcontext(lambda n: None)


def search(model: str | os.PathLike[str] | onnx.ModelProto,
           profile: str | os.PathLike[str] | HardwareProfile,
           data: DataLike | SearchData, config: SearchConfig, *,
           progress: Progress | None = None) -> SearchResult:
    """The most accurate plan of ``model`` on ``profile`` within ``config.budgets``.

    ``data``: the calibration data, or a :class:`SearchData` with evaluation data beside it;
    ``config``: every setting (:class:`~mpsearch.job.config.SearchConfig`, validated when it
    was built); ``progress``: called as ``with progress(label, total) as advance:`` around each
    long stage (the command line draws bars with it).
    """
    return _Job(model, profile, data, config, progress or _no_progress).run()


class _Job:
    """One search: its inputs, then what each stage finds, in order (module docstring)."""

    def __init__(self, model: str | os.PathLike[str] | onnx.ModelProto,
                 profile: str | os.PathLike[str] | HardwareProfile,
                 data: DataLike | SearchData, config: SearchConfig,
                 progress: Progress) -> None:
        self.config, self.progress = config, progress
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.model = model if isinstance(model, onnx.ModelProto) else load_model(model)
        self.sha256 = hashlib.sha256(self.model.SerializeToString(deterministic=True)).hexdigest()
        self.profile = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        data = data if isinstance(data, SearchData) else SearchData(calibration=data)
        self.sample_axes = dict(data.sample_axes)
        self.preprocess = data.preprocess
        calib = self._dataset(data.calibration, "calibration")
        chooses = config.refinement.select  # the polish runs only after the selection
        held = (hold_out(calib, config.refinement.check, seed=config.seed) if chooses
                else HeldOut(fit=calib, check=None))
        self.calib, self.check = held.fit, held.check  # calib: what everything is fitted on
        self.warnings: list[str] = []  # what weakens the figures, in plan.json and the report
        if data.synthetic:
            self._warn(SYNTHETIC_WARNING)
        self.held_warning = held.warning  # said when the shortlist is measured
        self.evald = (None if data.evaluation is None
                      else self._dataset(data.evaluation, "evaluation"))
        self.model, self.specialized, warned = control_flow(
            self.model, specialize=config.specialize_if,
            no_control_flow=self.profile.runtime == "qnn-htp", calib=self.calib,
            others=(self.check, self.evald), batch_size=config.quantize.batch_size)
        for text in warned:
            self._warn(text)
        self.exported: dict[tuple, QdqModel] = {}  # each plan exported once
        self._reference: Sequence[Mapping] | None = None
        self._check: tuple[tuple[Mapping, ...], Sequence[Mapping]] | None = None
        self._check_fp32: list | None = None  # FP32 outputs on the check part, for targets

    def _warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)

    def _check_constant(self, batches: Sequence[Mapping], ds: Dataset, part: str) -> None:
        text = constant_warning(batches, ds, part)
        if text:
            self._warn(text)

    def _dataset(self, d: DataLike, name: str) -> Dataset:
        return open_data(d, self.model, name=name, sample_axes=self.sample_axes,
                         preprocess=self.preprocess, progress=self.progress)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t

    def run(self) -> SearchResult:
        self.budgets: tuple[Budget, ...] = tuple(self.config.budgets)
        self.metric = self.budgets[0].metric if self.budgets else "bops"  # the front's axis
        self.target_steps: tuple[Step, ...] = ()
        self.effective_target: Target | None = None  # sqnr_drop as the SQNR it asks for
        if self.config.target is not None and self.config.target.key == "accuracy_drop" \
                and self.calib.labels is None:
            raise UsageError(f"target {self.config.target} needs labels in --data",
                             fix="store a 'labels' array (one class per sample) in the data, "
                                 "or use --target top1_drop= (agreement with FP32)")
        self.prepare()
        self.sensitivity()
        if self.config.target is not None:
            met = meet_target(self)
            self.budgets, self.effective_target = met.budgets, met.effective
            self.target_steps = met.steps
        self.refine()
        self.baselines()
        self.start_front()
        if self.config.refinement.select:
            self.select()
        warn_requantized(self)
        with self._stage("front (waited)"):
            self.front: Front = self.front_job.result()
        self.front_plans = tuple(
            self.result(f"front {i}", dict(p.solution.choice))
            for i, p in enumerate(front_sample(self.front, self.config.measurement.front_points,
                                                self.limits[self.metric], self.chosen.plan)))
        if self.config.measurement.enabled:
            measure_plans(self)  # 6. measured against FP32
        self.seconds["total"] = time.perf_counter() - self.t0
        log.info("seconds per stage: %s", ", ".join(f"{k} {v:.1f}" for k, v in
                                                   self.seconds.items()))
        return SearchResult(
            config=self.config, analysis=self.analysis, profile=self.profile, costs=self.costs,
            table=self.table, built=self.built, errors=self.errors, refinement=self.refinement,
            budgets=self.budgets, limits=self.limits, chosen=self.chosen,
            allocation=self.alloc, uniform=tuple(self.uniform), greedy=self.greedy,
            front=self.front, front_plans=self.front_plans, model_sha256=self.sha256,
            selection=self.selection, polish=self.polished,
            chosen_model=self.exported.get(plan_key(self.chosen.plan)), gating=self.gated,
            dropped=self.dropped, specialized=self.specialized,
            sample_axes={i.name: i.sample_axis for i in (self.evald or self.calib).spec.inputs},
            seconds=self.seconds, warnings=tuple(self.warnings), target=self.config.target,
            target_steps=self.target_steps, target_effective=self.effective_target,
            samples={"fit": len(self.calib), "check": len(self.check) if self.check else 0,
                     "evaluation": len(self.evald) if self.evald else 0})

    # -- 1. analysis, candidates, pins

    def prepare(self) -> None:
        cfg, cc = self.config, self.config.candidates
        if cc.gating is None:  # gating adds cheaper options; pins and keep-float only remove
            check_reachable(self.model, self.calib, self.profile, self.config.candidates,
                            self.budgets)
        with self.progress("calibrating", len(self.calib)) as advance:
            self.analysis = analyze(self.model, self.calib, options=cfg.quantize, hessians=True,
                                    progress=advance)
        lg = self.analysis.graph
        self.costs = CostModel(lg, self.profile)
        cands = candidates_for(lg, self.costs, cc.only, sparsity=cc.sparsity)
        self.gated = None
        if cc.gating is not None:
            with self.progress(f"gating ({cc.gating.value})", None):
                self.gated = gated_candidates(self.analysis, self.costs, cands,
                                              metric=self.metric, search=cc.gating)
            for g, extra in self.gated.by_group.items():
                cands[g] = (*cands[g], *extra)
        self.pins = resolve_pins(self.analysis, self.costs, cands, cc.pin, cc.keep_float)
        for g, c in self.pins.items():
            if c not in cands[g]:
                cands[g] = (*cands[g], c)
        self.cands = cands
        self.batches = tuple(self.calib.batches(cfg.quantize.batch_size))
        self._check_constant(self.batches, self.calib,
                             "fitted part" if self.check is not None else "calibration data")
        self.seconds["calibrate"] = time.perf_counter() - self.t0

    def reference(self) -> Sequence[Mapping]:
        """The FP32 outputs on the calibration batches (from the calibration pass when it kept
        them), computed once."""
        if self._reference is None:
            lg, batches = self.analysis.graph, self.batches
            self._reference = (self.analysis.calibration.reference_for(batches)
                               or reference_outputs(lg, batches))
        return self._reference

    def checking(self) -> tuple[Sequence[Mapping], Sequence[Mapping]]:
        """The batches plans are chosen on and the FP32 outputs on them: the check part, or the
        fitted batches when there is none."""
        if self.check is None:
            return self.batches, self.reference()
        if self._check is None:
            b = tuple(self.check.batches(self.config.quantize.batch_size))
            self._check_constant(b, self.check, "check part")
            self._check = (b, reference_outputs(self.analysis.graph, b))
        return self._check

    # -- 2. sensitivity

    def sensitivity(self) -> None:
        cfg = self.config
        with self._stage("sensitivity"):
            self.cache = None
            if cfg.cache.enabled:
                self.cache = SensitivityCache.for_settings(
                    cfg.cache.dir, model=self.model,
                    batches=self.calib.batches(cfg.quantize.batch_size), options=cfg.quantize,
                    seed=cfg.seed)
            variant = table_variant(cfg.method, self.cands)
            cached = self.cache.table(variant) if self.cache is not None else None
            if cached is not None:
                table = SensitivityTable.from_dict(cached)
                dropped = tuple(Refusal(group=g, candidate=parse_candidate(c), reason=why)
                                for g, c, why in cached.get("dropped", []))
            else:
                with self.progress(f"sensitivity ({cfg.method.value})",
                                   sum(len(v) for v in self.cands.values())) as advance:
                    table = estimate(self.analysis, self.calib, self.cands, method=cfg.method,
                                     workers=cfg.workers, cache=self.cache, progress=advance,
                                     seed=cfg.seed, predict=True)
                table, dropped = table.finite()
                if self.cache is not None:
                    self.cache.save_table(variant, table.to_dict() | {"dropped": [
                        [r.group, r.candidate.name, r.reason] for r in dropped]})
            self.table, more = table.finite()  # an older cache may lack a pair
            self._drop_candidates((*dropped, *more), self._avoided())

    def _avoided(self) -> tuple[Refusal, ...]:
        """The candidates ``candidates.avoid`` takes off (activation formats the device computed
        wrongly on that layer), as refusals with the reason; a pinned layer keeps its pin."""
        out = []
        for g, fmts in self.config.candidates.avoid.items():
            if g not in self.cands:
                raise UsageError(f"search.candidates.avoid names '{g}', which is no quantizable "
                                 "layer of this model",
                                 fix="see 'mpsearch inspect MODEL' for the layer names")
            out += [Refusal(group=g, candidate=c, reason=f"the device computed {c.activation} "
                            "activations of this layer wrongly (search.candidates.avoid)")
                    for c in self.cands[g] if c.activation in fmts and g not in self.pins]
        return tuple(out)

    def _drop_candidates(self, unscored: tuple[Refusal, ...],
                         avoided: tuple[Refusal, ...]) -> None:
        """Take the pairs the sensitivity stage could not score (each warned of) and those
        ``candidates.avoid`` names off the groups' candidates; a group left with none cannot
        be planned."""
        self.dropped = (*unscored, *avoided)
        if not self.dropped:
            return
        for r in unscored[:3]:
            log.warning("%s is not offered to %s: %s", r.candidate, r.group, r.reason)
        gone = {(r.group, r.candidate) for r in self.dropped}
        self.cands = {g: tuple(c for c in cs if (g, c) not in gone) for g, cs in
                      self.cands.items()}
        empty = [g for g, cs in self.cands.items() if not cs]
        if empty:
            why = next(r.reason for r in self.dropped if r.group == empty[0])
            raise UsageError(f"no candidate of group '{empty[0]}' has a finite sensitivity "
                             f"({why})", fix="allow another format for it, or --keep-float it")

    # -- 3. solve, measure what the plan rests on, solve again

    def _allocate_problem(self, errors: Mapping, *, scale_from: Mapping | None = None) -> Built:
        lg, table, ref = self.analysis.graph, self.table, self.costs.reference
        scale_from = errors if scale_from is None else scale_from
        ref_error = sum(scale_from.get((g, ref), 0.0) for g in lg.group_names)
        return build_problem(lg, self.costs, self.cands, errors, input_noise=table.input_noise,
                             convert_weight=self.config.convert_penalty * ref_error)

    def _allocate(self, errors: Mapping, *, scale_from: Mapping | None = None
                  ) -> tuple[Built, Allocation]:
        """The problem on ``errors`` and its exact plan. A conversion is charged
        ``convert_penalty`` times the all-w8a8 plan's error under ``scale_from`` (default:
        ``errors``)."""
        built = self._allocate_problem(errors, scale_from=scale_from)
        return built, allocate(built.problem, self.costs, self.budgets, pins=self.pins,
                               penalty=1.0)

    def refine(self) -> None:
        rc, lg, table = self.config.refinement, self.analysis.graph, self.table
        t1 = time.perf_counter()
        errors = {(g, c): table.error(g, c) for g in lg.group_names for c in self.cands[g]}
        known = dict(table.measured)
        rounds: list[int] = []
        self.round_plans: list[dict[str, Candidate]] = []
        scales: dict[str, float] = {}
        for r in range(rc.rounds + 1):
            built, alloc = self._allocate(errors)
            self.round_plans.append(dict(alloc.plan))
            last = r == rc.rounds
            todo = [] if last else pairs_to_verify(alloc.plan, self.costs.reference, self.cands,
                                                   known)
            if not last and rc.explore > 1:  # also where the plan would depart if the
                # unmeasured alternatives were better than predicted
                hopeful = hopeful_errors(errors, alloc.plan, known, rc.explore)
                try:
                    other = self._allocate(hopeful, scale_from=errors)[1].plan
                except InfeasibleBudgetError:
                    other = {}
                todo += [k for k in pairs_to_verify(other, self.costs.reference, self.cands,
                                                    known) if k not in todo][:EXPLORE_PAIRS]
            if not todo:
                break
            with self.progress(f"measuring the layers the plan departs on (round {r + 1})",
                               len(todo)) as advance:
                known.update(measure_pairs(self.analysis, self.batches, todo,
                                           workers=self.config.workers, cache=self.cache,
                                           reference=self.reference(), progress=advance))
            rounds.append(len(todo))
            errors, scales = corrected_errors(table, known, self.cands)
        self.errors, self.built, self.alloc = errors, built, alloc
        self.refinement = Refinement(measured={k: v for k, v in known.items()
                                               if k not in table.measured},
                                     rounds=tuple(rounds), scales=scales)
        self.limits = alloc.limits
        self.seconds["refine"] = time.perf_counter() - t1

    def result(self, name: str, plan: Mapping[str, Candidate]) -> PlanResult:
        """``plan`` with its costs and its prediction on the final errors."""
        cost = self.costs.plan(plan)
        mse = self.built.predicted_error(plan)
        fits = all(cost.as_dict()[m] <= lim * (1 + 1e-9) for m, lim in self.limits.items())
        return PlanResult(name=name, plan=dict(plan), cost=cost, predicted_mse=mse,
                          predicted_sqnr_db=sqnr(self.table.signal, mse), fits=fits)

    # -- 4. baselines and the front

    def baselines(self) -> None:
        lg, problem = self.analysis.graph, self.built.problem
        t1 = time.perf_counter()
        self.chosen = self.result("mpsearch", self.alloc.plan)
        self.uniform = []
        for c in sorted({c for cs in self.cands.values() for c in cs}, key=lambda c: c.name):
            if all(c in self.cands[g] for g in lg.group_names):
                self.uniform.append(self.result(f"uniform {c.name}",
                                                {g: c for g in lg.group_names}))
        self.greedy = None
        try:  # the edges' pairwise term counts in full, as in the ILP
            gsol = greedy(problem, self.limits, pins=self.pins, penalty=1.0)
            self.greedy = self.result("greedy (AMP)", dict(gsol.choice))
        except InfeasibleBudgetError:
            log.info("the greedy walk found no plan within the budgets")
        self.selection: Selection | None = None
        self.polished = None
        self.seconds["solve"] = time.perf_counter() - t1

    def start_front(self) -> None:
        """The front's ILPs, on a second thread while the shortlist and the polish run their
        plans in ONNX Runtime, which releases the GIL (the front is needed only after them)."""
        others = {m: v for m, v in self.limits.items() if m != self.metric}
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="front")
        self.front_job: Future[Front] = pool.submit(
            front, self.built.problem, self.metric, budgets=others, points=FRONT_SOLVES,
            pins=self.pins, penalty=1.0)
        pool.shutdown(wait=False)

    def check_fp32(self) -> Sequence:
        """The FP32 model's outputs on the check part (else the fitted part), batch by batch,
        run once: for the target's measurements and the measure stage's."""
        if self._check_fp32 is None:
            ds = self.check if self.check is not None else self.calib
            self._check_fp32 = reference_run(self.analysis.original,
                                             ds.batches(self.config.quantize.batch_size))
        return self._check_fp32

    def export(self, plan: Mapping[str, Candidate]) -> QdqModel:
        key = plan_key(plan)
        if key not in self.exported:
            self.exported[key] = quantize(self.analysis, plan)
        return self.exported[key]

    # -- 5. the best measured plan, polished

    def select(self, *, with_polish: bool = True) -> None:
        rc = self.config.refinement
        if self.held_warning:
            self._warn(self.held_warning)
            self.held_warning = None
        with self._stage("select"):
            plans = shortlist(self.round_plans, self.greedy, self.uniform, self.pins)
            batches, reference = self.checking()
            with self.progress("measuring the shortlist", len(plans)) as advance:
                self.selection = dataclasses.replace(
                    select(self.analysis, plans, batches, reference, progress=advance,
                           export=self.export),
                    data="fit" if self.check is None else "check")
            self.chosen = self.result("mpsearch", self.selection.best.plan)
        if rc.polish <= 0 or not with_polish:
            return
        best = self.selection.best
        with self._stage("polish"):
            with self.progress("polishing on measured error", rc.polish) as advance:
                self.polished = polish(
                    best.plan, best.check_mse, best.samples, name=best.name,
                    built=self.built, costs=self.costs, limits=self.limits, pins=self.pins,
                    evaluations=rc.polish, progress=advance,
                    tried=[c.plan for c in self.selection.contenders],
                    measure=lambda plan: measure_plan(self.analysis, plan, batches, reference,
                                                      export=self.export))
            self.chosen = self.result("mpsearch", self.polished.plan)

