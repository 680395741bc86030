"""numpy's BLAS on one thread while a stage runs (:func:`one_blas_thread`).

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
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

__all__ = ["blas_threads", "one_blas_thread"]

P = ParamSpec("P")
R = TypeVar("R")


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
