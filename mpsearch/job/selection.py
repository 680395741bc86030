"""Measure the few best plans and ship the best measured one.

The solver's plan is exact for the predicted errors, but a plan's real output error is not the
sum of its groups' errors: errors compound along the network, and the refinement
(:mod:`mpsearch.job.refinement`) measures single groups only. Predictions for mixed plans were 2-3
dB optimistic on EfficientNet-Lite0, enough for the greedy walk's plan, or the plan of an earlier
refinement round, to measure better than the final optimum at some budgets (measured at bops
0.6 / 0.75 of w8a8: the best of the shortlist on the calibration data was also the best on the
held-out crops, 12.66 dB against the final ILP plan's 12.14 and greedy's 12.57, and 18.32
against 18.16 and 18.06). Plans under budgets tightened by a few percent were tried as further
contenders and never won. So the search keeps a shortlist of plans that all meet the
budgets by the exact cost model:

- the ILP's plan of every refinement round (each optimal for the errors known then);
- the greedy walk's plan (AIMET AMP's phase 2, on the same errors);
- the uniform plan that fits with the best prediction (unless it is predicted more than 3 dB
  below the ILP's plan),

exports each and runs it on the calibration data against the float model (about a second
each on EfficientNet-Lite0), and ships the plan of least measured output error
``mse = E[(y - ŷ)²]`` (ties: the earlier contender, the ILP's plan first). The choice is then
never worse on the calibration data than any plan it was shown; the evaluation data stays
held out (selection never sees it), so the measured quality the report gives is honest. A
short local search from the best contender (:mod:`mpsearch.job.polish`) then tries its
neighbours the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mpsearch.core.formats import Candidate
from mpsearch.export.qdq import QdqModel, quantize
from mpsearch.graph.calibrate import make_session
from mpsearch.quant.analysis import Analysis

__all__ = ["Contender", "Selection", "measure_plan", "paired_z", "plan_errors", "plan_key",
           "plan_mse", "select"]

log = logging.getLogger(__name__)


def plan_key(plan: Mapping[str, Candidate]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((g, c.name) for g, c in plan.items()))


@dataclass(frozen=True, kw_only=True)
class Contender:
    """One shortlisted plan and its output error measured on the calibration data."""

    name: str
    plan: Mapping[str, Candidate]
    calibration_mse: float
    same_as: tuple[str, ...] = ()  # later shortlist entries with this very plan
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)  # per sample


@dataclass(frozen=True, kw_only=True)
class Selection:
    contenders: tuple[Contender, ...]  # in shortlist order, duplicates dropped
    best: Contender


def plan_errors(analysis: Analysis, plan: Mapping[str, Candidate],
                batches: Sequence[Mapping[str, np.ndarray]],
                reference: Sequence[Mapping[str, np.ndarray]], *,
                export: Callable[[Mapping[str, Candidate]], QdqModel] | None = None
                ) -> tuple[np.ndarray, int]:
    """The squared output error of each calibration sample (summed over every output element
    of that sample), and the number of output elements in all: ``mse = sum / count``.
    ``export``: how the plan becomes a QDQ model (default :func:`mpsearch.export.qdq.quantize`; the
    search passes a cached one)."""
    qdq = export(plan) if export is not None else quantize(analysis, plan)
    sess = make_session(qdq.model)
    names = [o.name for o in sess.get_outputs()]
    feeds = {i.name for i in sess.get_inputs()}
    per: list[np.ndarray] = []
    count = 0
    for ref, batch in zip(reference, batches, strict=True):
        got = sess.run(names, {k: v for k, v in batch.items() if k in feeds})
        rows = None
        b = min((y.shape[0] for y in got if y.ndim), default=1)  # the samples in this batch
        for name, y in zip(names, got, strict=True):
            if name not in ref:
                continue
            d = ref[name].astype(np.float64) - y
            count += d.size
            sq = (_samples_first(d, b).reshape(b, -1) ** 2).sum(axis=1)
            rows = sq if rows is None else rows + sq
        if rows is not None:
            per.append(rows)
    return (np.concatenate(per) if per else np.zeros(0)), count


def _samples_first(d: np.ndarray, b: int) -> np.ndarray:
    """``d`` with its sample axis first: axis 0 when it has the batch's ``b`` samples, else the
    first axis that does (a recurrent state output ``[layers, batch, hidden]``); an output
    without one (a scalar) is shared evenly among the samples."""
    if d.ndim and d.shape[0] == b:
        return d
    axis = next((i for i, n in enumerate(d.shape) if n == b), None)
    if axis is None:
        return np.broadcast_to(np.sqrt(np.sum(d ** 2) / b), (b,))
    return np.moveaxis(d, axis, 0)


def plan_mse(analysis: Analysis, plan: Mapping[str, Candidate],
             batches: Sequence[Mapping[str, np.ndarray]],
             reference: Sequence[Mapping[str, np.ndarray]], *,
             export: Callable[[Mapping[str, Candidate]], QdqModel] | None = None) -> float:
    """``E[(y - ŷ)²]`` over every output element of the calibration batches (the measure the
    sensitivities use, so it compares with their predictions)."""
    return measure_plan(analysis, plan, batches, reference, export=export)[0]


def measure_plan(analysis: Analysis, plan: Mapping[str, Candidate],
                 batches: Sequence[Mapping[str, np.ndarray]],
                 reference: Sequence[Mapping[str, np.ndarray]], *,
                 export: Callable[[Mapping[str, Candidate]], QdqModel] | None = None
                 ) -> tuple[float, np.ndarray]:
    """The plan's output MSE and each sample's squared error (:func:`plan_errors`), from one
    run."""
    per, count = plan_errors(analysis, plan, batches, reference, export=export)
    return float(per.sum()) / max(count, 1), per


def paired_z(worse: np.ndarray, better: np.ndarray) -> float:
    """How many standard errors ``better`` beats ``worse`` by, sample by sample (the mean of
    the per-sample differences over its standard error; 0 when they are equal)."""
    d = np.asarray(worse, dtype=np.float64) - np.asarray(better, dtype=np.float64)
    if d.size < 2 or not d.any():
        return 0.0
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    return math.inf * float(np.sign(d.mean())) if se == 0 else float(d.mean()) / se


def select(analysis: Analysis, shortlist: Sequence[tuple[str, Mapping[str, Candidate]]],
           batches: Sequence[Mapping[str, np.ndarray]],
           reference: Sequence[Mapping[str, np.ndarray]], *,
           progress: Callable[[int], None] | None = None,
           export: Callable[[Mapping[str, Candidate]], QdqModel] | None = None) -> Selection:
    """Measure every distinct plan of ``shortlist`` (name, plan) and pick the least error."""
    seen: dict[tuple, int] = {}
    out: list[Contender] = []
    for name, plan in shortlist:
        key = plan_key(plan)
        if key in seen:
            c = out[seen[key]]
            out[seen[key]] = dataclasses.replace(c, same_as=(*c.same_as, name))
        else:
            seen[key] = len(out)
            mse, per = measure_plan(analysis, plan, batches, reference, export=export)
            out.append(Contender(name=name, plan=dict(plan), calibration_mse=mse, samples=per))
            log.info("shortlist %s: calibration mse %.4g", name, out[-1].calibration_mse)
        if progress:
            progress(1)
    if not out:
        raise ValueError("empty shortlist")
    best = min(out, key=lambda c: c.calibration_mse)  # min keeps the first of equals
    return Selection(contenders=tuple(out), best=best)
