"""numpy's BLAS on one thread inside a stage, its own thread count again after it."""

from __future__ import annotations

import pytest

from mpsearch.core.threads import one_blas_thread

threadpoolctl = pytest.importorskip("threadpoolctl")


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_one_blas_thread_inside_and_restored_after():
    before = _blas_threads()

    @one_blas_thread
    def stage(x: int) -> tuple[int, list[int]]:
        return x + 1, _blas_threads()

    out, inside = stage(1)
    assert out == 2
    assert inside and all(n == 1 for n in inside)
    assert _blas_threads() == before

    @one_blas_thread
    def failing() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        failing()
    assert _blas_threads() == before
