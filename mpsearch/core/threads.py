"""numpy's BLAS on one thread while a stage runs (:func:`one_blas_thread`), and independent
ONNX Runtime runs side by side (:func:`fan_out`).

The calibration and sensitivity stages call BLAS many times on small matrices (per-layer
Hessians, GPTQ's blocks, the quadratic forms ``tr(δW H δWᵀ)``), next to ONNX Runtime's own
threads and to each other (they run side by side). OpenBLAS splits even an 80×480 by 480×480
product over its threads, which then wait for each other at every call; on a shared 2-core
machine they wait for a thread that is not running. Measured there beside one other busy
process: that product 24 ms on two threads against 0.7 ms on one; EfficientNet-Lite0's
calibration pass with the Hessians 10.8 -> 6.5 s, its layer errors 13.7 -> 4.4 s. Idle, the
same pass takes as long either way. Results are the same but for the summation order of a
few long BLAS dot products (1e-14 relative), and no longer depend on the number of cores.

Uses threadpoolctl (the limit is process-wide and restored on exit); without it, a no-op.

:func:`fan_out` runs several models at once on threads of this process, each session on
``cores // jobs`` intra-op threads: ONNX Runtime releases the GIL while it runs, and one session
does not keep two cores busy on small batches. Measured on the 2-core machine, EfficientNet-
Lite0's QDQ model at batch 8: 6.0 ms per image on one thread, 3.9 on two, 3.0 for two sessions of
one thread side by side. Threads, not processes: the models and data are already in memory.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["blas_threads", "fan_out", "fan_out_iter", "one_blas_thread"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


@contextlib.contextmanager
def blas_threads(n: int = 1) -> Iterator[None]:
    """numpy's BLAS on at most ``n`` threads inside the block."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its own thread count
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def one_blas_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` with numpy's BLAS on one thread while it runs (module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with blas_threads(1):
            return fn(*args, **kwargs)

    return wrapper


def fan_out(fn: Callable[[T, int], R], items: Sequence[T], *, jobs: int | None = None) -> list[R]:
    """``fn(item, threads)`` for every item, in order (:func:`fan_out_iter`)."""
    return list(fan_out_iter(fn, items, jobs=jobs))


def fan_out_iter(fn: Callable[[T, int], R], items: Sequence[T], *, jobs: int | None = None
                 ) -> Iterator[R]:
    """``fn(item, threads)`` for every item, up to ``jobs`` (default: the cores) at once, each
    told how many ONNX Runtime threads its session takes (0, ORT's default, where one item runs
    alone); the results in the items' order, each as soon as it and those before it are done
    (so a cache can keep them as they come). The first exception raised is raised here and
    the items not started are cancelled."""
    cores = os.cpu_count() or 1
    jobs = max(1, min(len(items), jobs or cores))
    if jobs == 1:
        for item in items:
            yield fn(item, 0)
        return
    threads = max(1, cores // jobs)
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fan-out")
    try:
        futures = [pool.submit(fn, item, threads) for item in items]
        for f in futures:
            yield f.result()
    except BaseException:  # Ctrl-C included: do not wait for the items not started
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
