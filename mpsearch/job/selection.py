"""Measure the few best plans on samples nothing was fitted on, and ship the best of them.

The solver's plan is exact for the predicted errors, but a plan's real output error is not the
sum of its groups' errors: errors compound along the network, and the refinement
(:mod:`mpsearch.job.refinement`) measures single groups only. Predictions for mixed plans were 2-3
dB optimistic on EfficientNet-Lite0, enough for the greedy walk's plan, or the plan of an earlier
refinement round, to measure better than the final optimum at some budgets. So the search
keeps a shortlist of plans that all meet the budgets by the exact cost model:

- the ILP's plan of every refinement round (each optimal for the errors known then);
- the greedy walk's plan (AIMET AMP's phase 2, on the same errors);
- every uniform plan that fits and is predicted within 3 dB of the best such one,

exports each and runs it against the float model, and ships the plan of least measured output
error ``mse = E[(y - ŷ)²]`` (ties: the earlier contender, the ILP's plan first).

**Where it is measured.** Not on the samples the ranges, rounding and sensitivities were
fitted on: choosing there learns those samples. On EfficientNet-Lite0 at bops 1.0, greedy's
plan measured 25.4 dB on the 64 calibration crops against uniform w8a8's 22.5 dB, was
shipped, and measured 21.4 dB on 300 other crops against uniform's 22.8 dB. So
:func:`hold_out` sets aside a seeded fraction of the data (:data:`CHECK_FRACTION`; the *check
part*) that calibration never sees; the shortlist and the polish (:mod:`mpsearch.job.polish`)
are measured on it. Too little data for a check part of :data:`MIN_CHECK` samples: no split,
and a warning that the choice is made on fitted samples. The fitted part is what ships, not
refitted on all the data afterwards: the figures then describe the shipped bytes, and the
quarter held out costs little (EfficientNet-Lite0 calibrated on 48 of its 64 crops: uniform
w8a8 20.72 dB on the evaluation photos against 20.71 dB with all 64, w8a16 30.51 against
30.30).

**Uniform wins unless beaten.** A mixed plan is shipped only when it beats the best measured
uniform contender by :data:`SELECT_Z` standard errors of the per-sample differences
(:func:`paired_z`); otherwise that uniform plan ships, and the selection says so
(:attr:`Selection.reason`). Sixteen check samples rarely tell 0.1 dB apart, and a uniform plan
is what a user would ship without mpsearch: the shipped plan is never worse than it on the
check part. A sample's error below :data:`FLOAT_FLOOR_DB` under the mean output power counts
as that floor: on saturated outputs (a softmax at 1.0) the plans differ there only by
float32 rounding, which no other data would repeat.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mpsearch.core.formats import Candidate
from mpsearch.core.threads import fan_out
from mpsearch.data.dataset import Dataset, batch_samples, split
from mpsearch.export.qdq import QdqModel, quantize
from mpsearch.graph.folding import measuring_session
from mpsearch.quant.analysis import Analysis

__all__ = ["CHECK_FRACTION", "FLOAT_FLOOR_DB", "MIN_CHECK", "SELECT_Z", "Contender", "HeldOut",
           "Selection", "hold_out", "measure_plan", "paired_z", "plan_errors", "plan_key",
           "plan_mse", "select"]

log = logging.getLogger(__name__)

CHECK_FRACTION = 0.25  # of --data held out to choose between plans on (--check)
MIN_CHECK = 4  # samples at least in the check part, and in the fitted part
SELECT_Z = 1.0  # a mixed plan must beat the best uniform one by this many standard errors
# Below this SQNR's worth of error a plan's outputs are float32's own rounding of the FP32
# model's: two plans there are not told apart (PaddleOCR's text-direction classifier: 134 and
# 143 dB on 4 saturated check samples "1.0 standard errors" apart, 27.3 and 22.6 dB on others)
FLOAT_FLOOR_DB = 120.0


@dataclass(frozen=True, kw_only=True)
class HeldOut:
    """The calibration data split into what is fitted on and what plans are chosen on."""

    fit: Dataset
    check: Dataset | None  # None: too few samples, plans are chosen on ``fit``
    warning: str | None = None


def hold_out(ds: Dataset, fraction: float, *, seed: int) -> HeldOut:
    """``ds`` split by sample into a fitted part and a check part of ``round(fraction *
    len(ds))`` samples (seeded by ``seed``; :func:`mpsearch.data.dataset.split`); no split,
    with the reason, when ``fraction`` is 0 or either part would have fewer than
    :data:`MIN_CHECK` samples."""
    if fraction <= 0:
        return HeldOut(fit=ds, check=None, warning=(
            "no check part (--check 0): plans are chosen on the samples they were "
            "calibrated on, which flatters them"))
    n_check = round(fraction * len(ds))
    if n_check < MIN_CHECK or len(ds) - n_check < MIN_CHECK:
        return HeldOut(fit=ds, check=None, warning=(
            f"{ds.name} data {ds.path} has {len(ds)} samples, too few to hold out a check "
            f"part of {MIN_CHECK} or more (--check {fraction:g}): plans are chosen on the "
            f"samples they were calibrated on, which flatters them; pass "
            f"{math.ceil(MIN_CHECK / fraction) if fraction else MIN_CHECK} or more"))
    parts = split(ds, fraction, seed=seed, name="check")
    return HeldOut(fit=parts.calibration, check=parts.evaluation)


def plan_key(plan: Mapping[str, Candidate]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((g, c.name) for g, c in plan.items()))


@dataclass(frozen=True, kw_only=True)
class Contender:
    """One shortlisted plan and its output error measured on the check part."""

    name: str
    plan: Mapping[str, Candidate]
    check_mse: float
    uniform: bool = False  # one candidate everywhere
    same_as: tuple[str, ...] = ()  # later shortlist entries with this very plan
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)  # per sample


@dataclass(frozen=True, kw_only=True)
class Selection:
    contenders: tuple[Contender, ...]  # in shortlist order, duplicates dropped
    best: Contender
    reason: str  # why ``best`` ships, in words
    signal: float  # mean square of the FP32 outputs the errors are measured against
    data: str = "check"  # which part: "check", or "fit" where there is no check part


def plan_errors(analysis: Analysis, plan: Mapping[str, Candidate],
                batches: Sequence[Mapping[str, np.ndarray]],
                reference: Sequence[Mapping[str, np.ndarray]], *,
                export: Callable[[Mapping[str, Candidate]], QdqModel] | None = None,
                threads: int = 0) -> tuple[np.ndarray, int]:
    """The squared output error of each calibration sample (summed over every output element
    of that sample), and the number of output elements in all: ``mse = sum / count``.
    ``export``: how the plan becomes a QDQ model (default :func:`mpsearch.export.qdq.quantize`; the
    search passes a cached one). ``threads``: the session's ORT threads (0: ORT's default)."""
    qdq = export(plan) if export is not None else quantize(analysis, plan)
    sess = measuring_session(qdq.model, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    feeds = {i.name for i in sess.get_inputs()}
    per: list[np.ndarray] = []
    count = 0
    for ref, batch in zip(reference, batches, strict=True):
        got = sess.run(names, {k: v for k, v in batch.items() if k in feeds})
        rows = None
        # the samples in this batch: its own count, not an output's leading dim (a recurrent
        # state output [1, 1, 128] beside per-window outputs [N] has none)
        b = batch_samples(batch)
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
                 export: Callable[[Mapping[str, Candidate]], QdqModel] | None = None,
                 threads: int = 0) -> tuple[float, np.ndarray]:
    """The plan's output MSE and each sample's squared error (:func:`plan_errors`), from one
    run; an error below :data:`FLOAT_FLOOR_DB` under the sample's signal counts as that floor
    (module docstring)."""
    per, count = plan_errors(analysis, plan, batches, reference, export=export, threads=threads)
    if per.size:
        per = np.maximum(per, _signal(reference) * count / per.size
                         * 10.0 ** (-FLOAT_FLOOR_DB / 10.0))
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
    """Measure every distinct plan of ``shortlist`` (name, plan) on ``batches`` and pick the
    least error; a mixed plan only when it beats the best uniform one by :data:`SELECT_Z`
    (module docstring)."""
    seen: dict[tuple, int] = {}
    out: list[Contender] = []
    for name, plan in shortlist:
        key = plan_key(plan)
        if key in seen:
            c = out[seen[key]]
            out[seen[key]] = dataclasses.replace(c, same_as=(*c.same_as, name))
            if progress:
                progress(1)
        else:
            seen[key] = len(out)
            out.append(Contender(name=name, plan=dict(plan), check_mse=math.nan,
                                 uniform=len(set(plan.values())) == 1))
    # exported here, one by one (the exporter's memo of rounded weights is not shared across
    # threads); only the sessions run side by side
    qdq = [export(c.plan) if export is not None else quantize(analysis, c.plan) for c in out]

    def run(k: int, threads: int) -> tuple[float, np.ndarray]:
        got = measure_plan(analysis, out[k].plan, batches, reference, export=lambda _: qdq[k],
                           threads=threads)
        if progress:  # (a repeated plan advanced the bar when it was found)
            progress(1)
        return got

    for k, (mse, per) in enumerate(fan_out(run, range(len(out)))):
        out[k] = dataclasses.replace(out[k], check_mse=mse, samples=per)
        log.info("shortlist %s: check mse %.4g", out[k].name, mse)
    if not out:
        raise ValueError("empty shortlist")
    n = len(out[0].samples) if out[0].samples is not None else 0
    best = min(out, key=lambda c: c.check_mse)  # min keeps the first of equals
    reason = f"least output error on {n} samples"
    uniform = [c for c in out if c.uniform]
    if uniform and not best.uniform and n < 2:
        reason += " (too few to test it against the uniform plans)"
    elif uniform and not best.uniform:
        top = min(uniform, key=lambda c: c.check_mse)
        z = paired_z(top.samples, best.samples)
        if z < SELECT_Z:
            reason = (f"{top.name}: the best mixed plan ({best.name}) beat it by only "
                      f"{z:.2f} standard errors on {n} samples (needs {SELECT_Z:g})")
            best = top
        else:
            reason += f", {z:.1f} standard errors better than {top.name}"
    return Selection(contenders=tuple(out), best=best, reason=reason,
                     signal=_signal(reference))


def _signal(reference: Sequence[Mapping[str, np.ndarray]]) -> float:
    """The mean square of every FP32 output element, the measure the errors are divided by."""
    total = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for r in reference
                for v in r.values())
    count = sum(np.asarray(v).size for r in reference for v in r.values())
    return total / max(count, 1)
