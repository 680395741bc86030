"""The sensitivity stage: an :class:`~mpsearch.quant.analysis.Analysis`, the candidates of every
group and a method -> a :class:`~mpsearch.sensitivity.table.SensitivityTable`.

``measured`` runs every (group, candidate) for real; ``hessian`` predicts them all from the
layer Hessians and measures only the few runs its scale is fitted on; ``both`` does both, side
by side (the fit still uses only its few runs, so the prediction is the same in every mode).

The table's ``seconds`` times each step; ``layer_errors`` runs on a second thread while
``measured`` and ``gains`` run, so those times overlap (``hessian``: from the start of the gain
runs to the prediction).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from mpsearch.core.formats import Candidate
from mpsearch.core.threads import one_blas_thread
from mpsearch.data.dataset import Dataset, batch_samples
from mpsearch.quant.analysis import Analysis
from mpsearch.sensitivity.cache import SensitivityCache
from mpsearch.sensitivity.gain import layer_gains
from mpsearch.sensitivity.hessian import fit_runs, fit_scale, layer_errors
from mpsearch.sensitivity.measured import MeasureContext, measure
from mpsearch.sensitivity.suffix import reference_outputs
from mpsearch.sensitivity.table import SensitivityTable

__all__ = ["Method", "estimate", "measure_pairs", "table_variant"]

log = logging.getLogger(__name__)

FIT_RUNS = 2
ERROR_THREADS = 2  # threads computing the layer errors, beside the measured and gain runs

T = TypeVar("T")


class Method(enum.Enum):
    MEASURED = "measured"
    HESSIAN = "hessian"
    BOTH = "both"


def measure_pairs(analysis: Analysis, batches: Sequence[Mapping[str, np.ndarray]],
                  pairs: Sequence[tuple[str, Candidate]], *, workers: int = 1,
                  cache: SensitivityCache | None = None,
                  reference: Sequence[Mapping[str, np.ndarray]] | None = None,
                  progress: Callable[[int], None] | None = None
                  ) -> dict[tuple[str, Candidate], float]:
    """The single-group output MSE of each of ``pairs`` on ``batches``: from the cache where
    it has them, else measured (and added to the cache as each result arrives).
    ``reference``: the float outputs on ``batches``, when already computed."""
    lg = analysis.graph
    measured: dict[tuple[str, Candidate], float] = {}
    if cache is not None:
        old = cache.measured()
        measured = {k: old[k] for k in pairs if k in old}
    if progress and measured:
        progress(len(measured))
    todo: dict[str, list[Candidate]] = {}
    for g, c in pairs:
        if (g, c) not in measured:
            todo.setdefault(g, []).append(c)

    def done(g: str, c: Candidate, mse: float) -> None:
        measured[(g, c)] = mse
        if cache is not None:
            cache.add_measured(g, c, mse)
        if progress:
            progress(1)

    if todo:
        log.info("measuring %d single-group runs (%d cached)",
                 sum(len(v) for v in todo.values()), len(measured))
        ref = tuple(reference) if reference is not None else (
            analysis.calibration.reference_for(batches)
            or tuple(reference_outputs(lg, batches)))
        ctx = MeasureContext(graph=lg, ranges=analysis.ranges, batches=tuple(batches),
                             reference=ref)
        measure(ctx, [(g, todo[g]) for g in lg.group_names if g in todo], workers=workers,
                on_result=done)
    return measured


@contextlib.contextmanager
def _setting_on_error(event: threading.Event) -> Iterator[None]:
    try:
        yield
    except BaseException:
        event.set()
        raise


def _timed(fn: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def table_variant(method: Method, candidates: Mapping[str, Sequence[Candidate]]) -> dict:
    """What distinguishes one finished table from another in the same cache folder."""
    return {"method": method.value, "fit_runs": FIT_RUNS,
            "candidates": {g: [c.name for c in cs] for g, cs in candidates.items()}}


@one_blas_thread
def estimate(analysis: Analysis, data: Dataset,
             candidates: Mapping[str, Sequence[Candidate]], *,
             method: Method = Method.HESSIAN, workers: int = 1,
             cache: SensitivityCache | None = None,
             progress: Callable[[int], None] | None = None,
             seed: int = 0, predict: bool | None = None) -> SensitivityTable:
    """Sensitivity of every (group, candidate) on the calibration ``data``. ``progress`` is
    called with the number of (group, candidate) results finished (measured or cached).
    ``seed``: of the noise in the gain runs. ``predict``: also run the Hessian prediction
    (default: unless the method is measured; a search wants it for its input-noise terms)."""
    method = Method(method)
    lg = analysis.graph
    cands = {g: tuple(candidates.get(g, ())) for g in lg.group_names}
    pairs = [(g, c) for g in lg.group_names for c in cands[g]]
    seconds: dict[str, float] = {f"analysis_{k}": v for k, v in analysis.timings.items()}
    t0 = time.perf_counter()
    batches = tuple(data.batches(analysis.options.batch_size))
    ref = analysis.calibration.reference_for(batches) or tuple(reference_outputs(lg, batches))
    count = sum(sum(int(v.size) for v in r.values()) for r in ref)
    signal = sum(float(np.vdot(v.ravel().astype(np.float64), v.ravel().astype(np.float64)))
                 for r in ref for v in r.values()) / max(count, 1)
    samples = sum(batch_samples(b) for b in batches)
    seconds["reference"] = time.perf_counter() - t0

    runs = fit_runs(lg, cands, count=FIT_RUNS) if method is not Method.MEASURED else []
    to_measure = pairs if method is not Method.HESSIAN else runs
    predicted, relative, fit, input_noise = {}, {}, None, {}
    # A search also wants it for a measured table: its input-noise terms let the solver
    # correct what single-group errors count twice.
    if predict is None:
        predict = method is not Method.MEASURED
    predict = predict and (method is not Method.MEASURED or bool(analysis.calibration.hessians))
    stop = threading.Event()  # set when this fails (Ctrl-C): the layer errors stop early
    with ThreadPoolExecutor(max_workers=1) as pool, _setting_on_error(stop):
        # The layer errors (numpy) run on threads of their own beside the measured and the
        # gain runs, which leave most of a second core idle (ONNX Runtime on a few samples).
        # They share the RangeSetter's memo with the measured runs' export, which at worst
        # computes the same weights twice: the results do not depend on the order.
        errs_job = (pool.submit(_timed, layer_errors, lg, analysis.calibration,
                                analysis.ranges, pairs, threads=ERROR_THREADS, stop=stop)
                    if predict else None)
        t0 = time.perf_counter()
        measured = measure_pairs(analysis, batches, to_measure, workers=workers, cache=cache,
                                 reference=ref, progress=progress)
        seconds["measured"] = time.perf_counter() - t0
        if errs_job is not None:
            t0 = time.perf_counter()
            gains = layer_gains(lg, analysis.calibration, analysis.ranges.weights, batches, ref,
                                lg.group_names, seed=seed)
            seconds["gains"] = time.perf_counter() - t0
            errs, seconds["layer_errors"] = errs_job.result()
            relative = {k: e.relative for k, e in errs.items()}
            raw = {k: gains[k[0]].weight * e.weight + gains[k[0]].white * e.activation
                   + gains[k[0]].input * e.input
                   for k, e in errs.items()}
            fit_on = runs if method is Method.HESSIAN else list(measured)  # both: every pair
            usable = [k for k in fit_on if k in measured and math.isfinite(measured[k])
                      and math.isfinite(raw.get(k, 0.0))]  # an overflowing format: no fit
            fit = fit_scale(raw, {k: measured[k] for k in usable})
            predicted = {k: fit.alpha * r for k, r in raw.items()}
            for (g, c), e in errs.items():
                if c.activation.is_quantized and e.input > 0:
                    input_noise[(g, c.activation.name)] = fit.alpha * gains[g].input * e.input
            seconds["hessian"] = time.perf_counter() - t0
    if method is Method.HESSIAN:
        measured = {k: measured[k] for k in runs if k in measured}
        if progress:
            progress(len(pairs) - len(runs))
    return SensitivityTable(groups=lg.group_names, candidates=cands, signal=signal,
                            samples=samples, measured=measured, predicted=predicted,
                            relative=relative, fit=fit, seconds=seconds,
                            input_noise=input_noise)
