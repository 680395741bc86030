"""Timing models on ONNX Runtime's CPU execution provider: sessions, round-robin visits with
warm-up, wall-clock and profiler kernel times, medians (used by :mod:`mpsearch.device.latency`).

Every model is visited once per round, the timed repeats split among ``ROUNDS`` rounds, so a
slow spell of this shared machine falls on every model alike. A layer's time is the kernel time
ORT's profiler records (layout reorders excluded), a whole model's the wall clock.
"""

from __future__ import annotations

import bisect
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["LAYOUT_OPS", "MIN_KERNEL_S", "ROUNDS", "Job", "kernel_seconds", "make_feed",
           "median_latencies", "run_rounds", "session", "split_repeats", "visit"]

LAYOUT_OPS = frozenset({"Transpose", "ReorderInput", "ReorderOutput"})
ROUNDS = 30  # visits to each model; the repeats are split among them
MIN_KERNEL_S = 1e-7  # a kernel's time is not zero, even where the profiler's cost hides it


def session(model: bytes, threads: int,
             profile_prefix: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def make_feed(sess: ort.InferenceSession,
              values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: values[i.name] for i in sess.get_inputs()}


def split_repeats(repeats: int, rounds: int) -> list[int]:
    """The timed runs of each round."""
    rounds = max(1, min(rounds, repeats))
    base, extra = divmod(repeats, rounds)
    return [base + (r < extra) for r in range(rounds)]


@dataclass(kw_only=True)
class Job:
    """One model to time, by the wall clock or by ORT's kernel times, and its timings."""

    blob: bytes
    values: Mapping[str, np.ndarray]
    wall: bool
    times: list[float] = field(default_factory=list)
    nodes: int = 0  # kernels summed per run (kernel-timed jobs)

    def seconds(self, per_node: float = 0.0) -> float:
        """The median, less ``per_node`` for each kernel summed (the profiler's own cost), but
        at least ``MIN_KERNEL_S`` per kernel (below the profiler's 1 µs resolution)."""
        return max(statistics.median(self.times) - self.nodes * per_node,
                   MIN_KERNEL_S * self.nodes)


def kernel_seconds(profile_file: str) -> list[tuple[float, int]]:
    """Per run, the summed kernel time of every node except inserted layout changes, and the
    number of nodes summed."""
    with open(profile_file, encoding="utf-8") as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [r[0] for r in runs]
    totals = [0.0] * len(runs)
    nodes = [0] * len(runs)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if e.get("args", {}).get("op_name") in LAYOUT_OPS:
            continue
        k = bisect.bisect_right(starts, e["ts"]) - 1
        if k >= 0 and e["ts"] <= runs[k][1]:
            totals[k] += e["dur"]
            nodes[k] += 1
    return [(t * 1e-6, n) for t, n in zip(totals, nodes, strict=True)]


def visit(job: Job, *, warmup: int, timed: int, threads: int, prefix: str) -> None:
    """A fresh session, ``warmup`` untimed runs, ``timed`` timed runs back to back; closed."""
    if job.wall:
        sess = session(job.blob, threads)
        feed = make_feed(sess, job.values)
        for r in range(warmup + timed):
            t0 = time.perf_counter()
            sess.run(None, feed)
            dt = time.perf_counter() - t0
            if r >= warmup:
                job.times.append(dt)
        return
    sess = session(job.blob, threads, prefix)
    binding = sess.io_binding()
    copies = []
    for i in sess.get_inputs():
        src = np.ascontiguousarray(job.values[i.name])
        buf = np.empty_like(src)
        binding.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(buf))
        copies.append((buf, src))
    for o in sess.get_outputs():
        binding.bind_output(o.name)
    for _ in range(warmup + timed):
        for buf, src in copies:  # hot in the cache, as just written by the producer
            np.copyto(buf, src)
        sess.run_with_iobinding(binding)
    profile_file = sess.end_profiling()
    runs = kernel_seconds(profile_file)[warmup:]
    os.remove(profile_file)
    if len(runs) != timed:
        raise RuntimeError(f"ORT's profile has {len(runs)} timed runs, expected {timed}")
    job.times.extend(t for t, _ in runs)
    job.nodes = max(n for _, n in runs) if runs else 0


def run_rounds(jobs: Sequence[Job], *, warmup: int, repeats: int, threads: int,
                rounds: int = ROUNDS, tick: Callable[[int], None] | None = None) -> list[float]:
    """Visit every job once per round (each visit with a fresh session: ORT's idle sessions
    keep their pool threads spinning, and a lone layer timed with ten idle sessions open took
    1.8x as long); the median of each job's timed runs."""
    with tempfile.TemporaryDirectory(prefix="mpsearch-measure-") as tmp:
        for rnd, timed in enumerate(split_repeats(repeats, rounds)):
            for k, job in enumerate(jobs):
                visit(job, warmup=warmup, timed=timed, threads=threads,
                       prefix=os.path.join(tmp, f"r{rnd}j{k}"))
                if tick:
                    tick(1)
    return [statistics.median(j.times) for j in jobs]


def median_latencies(models: Sequence[onnx.ModelProto], feed: Mapping[str, np.ndarray], *,
                     warmup: int = 5, repeats: int = 30, threads: int = 0,
                     rounds: int = ROUNDS) -> list[float]:
    """Wall-clock median seconds of one ``run()`` of each model on ``feed`` (inputs a model
    does not take are ignored), batch as in ``feed``. The repeats are split into ``rounds``
    visits to each model in turn, so that a change of load on the machine hits every model
    alike; each visit opens a fresh session, runs ``warmup`` untimed runs and then its timed
    runs back to back, and closes it."""
    jobs = [Job(blob=m.SerializeToString(), values=feed, wall=True) for m in models]
    return run_rounds(jobs, warmup=warmup, repeats=repeats, threads=threads, rounds=rounds)
