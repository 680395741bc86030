"""numpy's BLAS on one thread inside a stage, its own thread count again after it."""

from __future__ import annotations

import numpy  # noqa: F401 - loads numpy's BLAS, which the first test inspects (alone, too)
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


def test_fan_out_keeps_order_splits_the_cores_and_raises():
    import os

    from mpsearch.core.threads import fan_out

    cores = os.cpu_count() or 1
    got = fan_out(lambda x, threads: (x * x, threads), list(range(5)))
    assert [g[0] for g in got] == [0, 1, 4, 9, 16]
    want = 0 if cores == 1 else max(1, cores // min(5, cores))
    assert {g[1] for g in got} == {want}
    assert fan_out(lambda x, threads: threads, [7]) == [0]  # one alone: ORT's default

    def boom(x, threads):
        if x == 2:
            raise ValueError("item 2")
        return x

    with pytest.raises(ValueError, match="item 2"):
        fan_out(boom, [1, 2, 3])


def test_plans_measured_side_by_side_equal_one_by_one(tmp_path):
    # real ORT sessions of two different QDQ plans: on threads of one intra-op thread each
    # they give the very figures they give run one after the other with ORT's default
    import numpy as np
    from models import images, mbconv

    from mpsearch import analyze, open_dataset, parse_candidate
    from mpsearch.core.threads import fan_out
    from mpsearch.export.qdq import quantize
    from mpsearch.graph.evaluate import evaluate, reference_run

    model = mbconv()
    np.savez(tmp_path / "c.npz", x=images(32, seed=1))
    ds = open_dataset(tmp_path / "c.npz", model)
    a = analyze(model, ds)
    qdq = [quantize(a, parse_candidate(c)).model for c in ("w8a8", "w4a8", "w8a16")]
    ref = reference_run(model, ds.batches(8))
    alone = [evaluate(model, q, reference_outputs=ref) for q in qdq]
    side = fan_out(lambda q, t: evaluate(model, q, reference_outputs=ref, threads=t), qdq)
    for x, y in zip(alone, side, strict=True):
        assert x.primary.sqnr_db == y.primary.sqnr_db
        assert np.array_equal(x.powers[x.primary.name][1], y.powers[y.primary.name][1])
    assert alone[1].primary.sqnr_db < alone[0].primary.sqnr_db  # three different plans


def test_the_shortlist_bar_counts_each_entry_once(tmp_path):
    # plans measured side by side: a plan listed twice is measured once and the progress
    # reaches exactly the shortlist's length
    import numpy as np
    from models import images, mbconv

    from mpsearch import analyze, open_dataset, parse_candidate
    from mpsearch.graph.evaluate import reference_run
    from mpsearch.job.selection import select

    model = mbconv()
    np.savez(tmp_path / "c.npz", x=images(16, seed=1))
    ds = open_dataset(tmp_path / "c.npz", model)
    a = analyze(model, ds)
    plans = {c: {g: parse_candidate(c) for g in a.graph.group_names} for c in ("w8a8", "w4a8")}
    batches = tuple(ds.batches(8))
    reference = [out for _, out in reference_run(model, batches)]
    seen = []
    sel = select(a, [("a", plans["w8a8"]), ("b", plans["w4a8"]), ("c", plans["w8a8"])],
                 batches, reference, progress=seen.append)
    assert sum(seen) == 3
    assert [c.name for c in sel.contenders] == ["a", "b"]
    assert sel.contenders[0].same_as == ("c",)
    assert sel.contenders[0].check_mse < sel.contenders[1].check_mse
