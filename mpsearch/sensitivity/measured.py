"""Measured sensitivity (Pandey et al. 2023; AIMET AMP phase 1): quantize one group with one
candidate, everything else float, run the calibration data, score the network output:
``mse = E[(y - y_c)²]``, ``SQNR = 10·log10(E[y²] / mse)`` (docs/design.md §3).

The model scored is exactly the QDQ model the exporter writes for that single-group plan (same
ranges, same weight integers, same int32 bias), so a measured error is what shipping that
change would cost. What makes |groups|·|candidates| runs affordable:

* **Only the affected part runs.** Nodes of the exported model that are unchanged and read only
  unchanged tensors compute what the float model computes. They are cut off; the remaining
  suffix model takes the float tensors it needs (the group's input, residual branches) as
  inputs. Those are collected for a handful of groups at a time in one float ORT pass and held
  in memory (at most :data:`FEED_BYTES`), so the calibration statistics are reused and nothing
  is re-calibrated; an early layer still runs most of the network, a late one almost nothing.
* The suffix models of a pass run side by side on threads (:func:`mpsearch.core.threads.fan_out`);
  ``workers > 1`` spreads the groups over processes instead (each with ``cores / workers`` ORT
  threads).

Results are reported one by one through ``on_result`` so a cache can keep them as they come.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from mpsearch.core.formats import Candidate, Format
from mpsearch.core.threads import fan_out_iter
from mpsearch.export.qdq import export_qdq
from mpsearch.graph.folding import DISABLED, folded
from mpsearch.graph.layer_graph import LayerGraph
from mpsearch.quant.parameters import RangeSetter
from mpsearch.sensitivity.suffix import Suffix, in_passes, suffix_model, suffix_session
from mpsearch.sensitivity.table import unchanged

__all__ = ["MeasureContext", "measure"]

log = logging.getLogger(__name__)

GROUPS_PER_PASS = 8  # groups whose suffix models are built per float pass

FLOAT = Candidate(weight=Format.FLOAT, activation=Format.FLOAT, sparsity=None)
Result = tuple[str, Candidate, float]


@dataclass(frozen=True, kw_only=True)
class MeasureContext:
    """What a measuring process needs (pickled once per worker)."""

    graph: LayerGraph
    ranges: RangeSetter
    batches: tuple[Mapping[str, np.ndarray], ...]
    reference: tuple[Mapping[str, np.ndarray], ...]  # FP32 outputs per batch
    threads: int = 0


def _noise(ref: Sequence[Mapping[str, np.ndarray]], sess, feeds: Sequence[str],
           outputs: Sequence[str], stored: Sequence[Mapping[str, np.ndarray]],
           batches: Sequence[Mapping[str, np.ndarray]]) -> float:
    total = 0.0
    for r, vals, batch in zip(ref, stored, batches, strict=True):
        feed = {f: (vals[f] if f in vals else batch[f]) for f in feeds}
        got = sess.run(list(outputs), feed)
        for name, y in zip(outputs, got, strict=True):
            d = r[name].astype(np.float64) - y
            total += float(np.vdot(d.ravel(), d.ravel()))
    return total


def _measure_groups(ctx: MeasureContext, work: Sequence[tuple[str, tuple[Candidate, ...]]],
                    on_result: Callable[[str, Candidate, float], None]) -> None:
    lg = ctx.graph
    count = sum(sum(int(v.size) for v in r.values()) for r in ctx.reference)
    base = {g: FLOAT for g in lg.group_names}

    def built(g: str, cands: tuple[Candidate, ...]) -> list[tuple[Candidate, Suffix]]:
        out = []
        for c in cands:
            if unchanged(c):
                on_result(g, c, 0.0)
            else:
                qm = export_qdq(lg, {**base, g: c}, ctx.ranges, check=False)
                fast = folded(qm.model)  # the form ORT runs fastest (int4, 16-bit)
                suf = suffix_model(lg.model, fast or qm.model, external=ctx.ranges.weights)
                out.append((c, suf if fast is None else dataclasses.replace(suf,
                                                                           disabled=DISABLED)))
        return out

    items = ((g, built(g, cands)) for g, cands in work)
    for chunk, stored in in_passes(lg, ctx.batches, items,
                                   lambda it: {f for _, s in it[1] for f in s.feeds},
                                   per_pass=GROUPS_PER_PASS):
        todo = [(g, c, suf) for g, suffixes in chunk for c, suf in suffixes]

        def run(item: tuple[str, Candidate, Suffix], threads: int,
                stored: list[dict[str, np.ndarray]] = stored) -> float:
            suf = item[2]
            if not suf.outputs:  # nothing changes on this runtime (fp16 with no weights)
                return 0.0
            sess = suffix_session(suf, ctx.ranges.weights, threads=ctx.threads or threads)
            return _noise(ctx.reference, sess, suf.feeds, suf.outputs, stored, ctx.batches)

        # side by side in this process; a worker process of the pool runs its own one by one
        results = fan_out_iter(run, todo, jobs=1 if ctx.threads else None)
        for (g, c, _), noise in zip(todo, results, strict=True):
            on_result(g, c, noise / count)


# --------------------------------------------------------------------------- parallel workers

_CTX: MeasureContext | None = None


def _init_worker(ctx: MeasureContext) -> None:
    global _CTX
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _CTX = ctx


def _worker(work: list[tuple[str, tuple[Candidate, ...]]]) -> list[Result]:
    assert _CTX is not None
    out: list[Result] = []
    _measure_groups(_CTX, work, lambda g, c, v: out.append((g, c, v)))
    return out


def measure(ctx: MeasureContext, work: Sequence[tuple[str, Sequence[Candidate]]], *,
            workers: int = 1, on_result: Callable[[str, Candidate, float], None]) -> None:
    """Measure every (group, candidates) of ``work``; each result goes to ``on_result`` as it
    is known (in the calling process)."""
    work = [(g, tuple(cs)) for g, cs in work if cs]
    if not work:
        return
    if workers <= 1:
        _measure_groups(ctx, work, on_result)
        return
    cores = os.cpu_count() or 1
    ctx = MeasureContext(graph=ctx.graph, ranges=ctx.ranges, batches=ctx.batches,
                         reference=ctx.reference, threads=max(1, cores // workers))
    # Small tasks (two groups each) keep every worker busy and let a cache save often.
    tasks = [work[k:k + 2] for k in range(0, len(work), 2)]
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(ctx,))
    try:
        pending = {pool.submit(_worker, t) for t in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                for g, c, v in f.result():
                    on_result(g, c, v)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
