"""Measured sensitivity (Pandey et al. 2023; AIMET AMP phase 1): quantize one group with one
candidate, everything else float, run the calibration data, score the network output:
``mse = E[(y - y_c)²]``, ``SQNR = 10·log10(E[y²] / mse)`` (DESIGN.md §3).

The model scored is exactly the QDQ model the exporter writes for that single-group plan (same
ranges, same weight integers, same int32 bias), so a measured error is what shipping that
change would cost. What makes |groups|·|candidates| runs affordable:

* **Only the affected part runs.** Nodes of the exported model that are unchanged and read only
  unchanged tensors compute what the float model computes. They are cut off; the remaining
  suffix model takes the float tensors it needs (the group's input, residual branches) as
  inputs. Those are collected for a handful of groups at a time in one float ORT pass and held
  in memory (at most :data:`FEED_BYTES`), so the calibration statistics are reused and nothing
  is re-calibrated; an early layer still runs most of the network, a late one almost nothing.
* ``workers > 1`` spreads the groups over processes (each with ``cores / workers`` ORT
  threads).

Results are reported one by one through ``on_result`` so a cache can keep them as they come.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from mpsearch.calibrate import make_session, run_collectors
from mpsearch.export.qdq import export_qdq
from mpsearch.formats import Candidate, Format
from mpsearch.graph import LayerGraph
from mpsearch.params import RangeSetter
from mpsearch.sensitivity.table import unchanged

__all__ = ["FEED_BYTES", "MeasureContext", "Suffix", "downstream_model", "measure",
           "reference_outputs", "suffix_model"]

log = logging.getLogger(__name__)

FEED_BYTES = 512 << 20  # float tensors held for one chunk of groups
GROUPS_PER_PASS = 8  # groups whose suffix models are built per float pass

FLOAT = Candidate(weight=Format.FLOAT, activation=Format.FLOAT, sparsity=None)
Result = tuple[str, Candidate, float]


@dataclass(frozen=True, kw_only=True)
class Suffix:
    model: bytes
    feeds: tuple[str, ...]  # float tensors it reads
    outputs: tuple[str, ...]  # the graph outputs it computes (others equal the float model's)


def suffix_model(float_model: onnx.ModelProto, qdq: onnx.ModelProto) -> Suffix:
    """The part of ``qdq`` that differs from ``float_model``, with the unchanged float tensors
    it reads as inputs."""
    orig = {n.name: (n.op_type, tuple(n.input), tuple(n.output)) for n in float_model.graph.node}
    clean = {i.name for i in float_model.graph.input}
    clean |= {t.name for t in float_model.graph.initializer}
    dirty: list[onnx.NodeProto] = []
    for n in qdq.graph.node:  # topological order
        same = orig.get(n.name) == (n.op_type, tuple(n.input), tuple(n.output))
        if same and all(not i or i in clean for i in n.input):
            clean.update(n.output)
        else:
            dirty.append(n)
    return _cut(qdq, dirty, _elem_types(float_model))


def downstream_model(model: onnx.ModelProto, tensor: str) -> Suffix:
    """The nodes of ``model`` that depend on ``tensor``, with ``tensor`` (and the other float
    tensors they read) as inputs."""
    changed = {tensor}
    dirty = []
    for n in model.graph.node:
        if any(i in changed for i in n.input):
            dirty.append(n)
            changed.update(n.output)
    return _cut(model, dirty, _elem_types(model))


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type
            for v in [*g.input, *g.value_info, *g.output] if v.type.tensor_type.elem_type}


def _cut(model: onnx.ModelProto, dirty: list[onnx.NodeProto],
         types: Mapping[str, int]) -> Suffix:
    inits = {t.name: t for t in model.graph.initializer}
    produced = {o for n in dirty for o in n.output}
    feeds, used = [], set()
    for n in dirty:
        for i in n.input:
            if not i or i in produced or i in used:
                continue
            used.add(i)
            if i not in inits:
                feeds.append(i)
    outputs = [o for o in model.graph.output if o.name in produced]
    graph = helper.make_graph(
        dirty, "suffix",
        [helper.make_tensor_value_info(f, types.get(f, onnx.TensorProto.FLOAT), None)
         for f in feeds],
        outputs, [inits[i] for i in sorted(used) if i in inits])
    m = helper.make_model(graph, opset_imports=model.opset_import,
                          ir_version=model.ir_version)
    return Suffix(model=m.SerializeToString(), feeds=tuple(feeds),
                  outputs=tuple(o.name for o in outputs))


class _Store:
    """A calibration collector that keeps the values of some tensors, batch by batch."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self.batches: list[dict[str, np.ndarray]] = []

    def tensors(self) -> Iterable[str]:
        return self.names

    def update(self, values: Mapping[str, np.ndarray]) -> None:
        self.batches.append({n: np.array(values[n]) for n in self.names if n in values})


def reference_outputs(lg: LayerGraph, batches: Sequence[Mapping[str, np.ndarray]]
                      ) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in lg.model.graph.output]
    store = _Store(names)
    run_collectors(lg, batches, [store])
    return store.batches


@dataclass(frozen=True, kw_only=True)
class MeasureContext:
    """What a measuring process needs (pickled once per worker)."""

    graph: LayerGraph
    ranges: RangeSetter
    batches: tuple[Mapping[str, np.ndarray], ...]
    reference: tuple[Mapping[str, np.ndarray], ...]  # FP32 outputs per batch
    threads: int = 0


def _bytes_per_sample(lg: LayerGraph, t: str) -> int:
    a = lg.activations.get(t)
    shape = a.shape if a is not None else None
    if not shape:
        return 4 << 10
    return 4 * int(np.prod([d or 1 for d in shape[1:]]))


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
    n_samples = sum(len(next(iter(b.values()))) for b in ctx.batches)
    i = 0
    while i < len(work):
        chunk: list[tuple[str, Candidate, Suffix]] = []
        feeds: set[str] = set()
        groups = 0
        while i < len(work) and groups < GROUPS_PER_PASS:
            g, cands = work[i]
            built = []
            for c in cands:
                if unchanged(c):
                    on_result(g, c, 0.0)
                    continue
                qm = export_qdq(lg, {**base, g: c}, ctx.ranges)
                built.append((g, c, suffix_model(lg.model, qm.model)))
            new = {f for _, _, s in built for f in s.feeds} - feeds
            size = sum(_bytes_per_sample(lg, f) for f in feeds | new) * n_samples
            if chunk and size > FEED_BYTES:
                break  # this group starts the next pass
            chunk.extend(built)
            feeds |= new
            groups += 1
            i += 1
        inputs = {x.name for x in lg.model.graph.input}
        store = _Store(feeds - inputs)
        if store.names:
            run_collectors(lg, ctx.batches, [store])
        stored = store.batches or [{} for _ in ctx.batches]
        for g, c, suf in chunk:
            if not suf.outputs:  # nothing changes on this runtime (fp16 with no weights)
                on_result(g, c, 0.0)
                continue
            sess = make_session(suf.model, threads=ctx.threads)
            noise = _noise(ctx.reference, sess, suf.feeds, suf.outputs, stored, ctx.batches)
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
