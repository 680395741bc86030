"""``pareto.png``: output SQNR against one cost (relative to all-w8a8 on the same device) for
the predicted front, the measured front points, the uniform plans, the greedy plan and the
chosen one, with the budget drawn in.

Everything is read from the ``plan.json`` document (that
:func:`mpsearch.job.document.plan_document` writes), so ``mpsearch report RUN_DIR`` redraws the
same figure from a run's files. The cost axis is
logarithmic (base 2): 0.5x, 1x, 2x and 4x of the w8a8 cost are equally far apart, which keeps
the front (usually 0.5-1.2x) readable next to the 16-bit uniform plans (2-4x).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["METRIC_LABELS", "front_plot"]

METRIC_LABELS = {"latency_s": "latency", "bops": "bit-operations", "weight_bytes": "weight size",
                 "activation_bytes": "activation traffic", "energy_j": "energy"}
SQNR_CAP_DB = 100.0  # lossless plans (infinite SQNR) are drawn here
DPI = 100


def _cap(db: float | None) -> float | None:
    if db is None or (isinstance(db, float) and math.isnan(db)):
        return None
    return min(float(db), SQNR_CAP_DB)


def _rel(summary: Mapping[str, Any], metric: str) -> float | None:
    v = summary.get("totals", {}).get(metric, {}).get("relative_to_w8a8")
    return None if v is None else float(v)


def _measured_db(summary: Mapping[str, Any]) -> float | None:
    m = summary.get("measured")
    return _cap(m.get("sqnr_db")) if m else None


def _ticks(lo: float, hi: float) -> list[float]:
    """Round ratios on a log axis: quarters on a wide axis, eighths on a narrow one."""
    wide = math.log2(hi / lo) > 2
    cands = (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 16) if wide else (
        0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1.125, 1.25, 1.5, 1.75, 2, 2.5, 3, 4)
    return [t for t in cands if lo <= t <= hi]


def front_plot(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw the front of a ``plan.json`` document (or a ``pareto.json`` one) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    front = doc.get("front", {})
    metric = front.get("metric", "bops")
    fig, ax = plt.subplots(figsize=(11, 5.6), dpi=DPI)
    xs_all: list[float] = []

    pts = [(p["relative_to_w8a8"], _cap(p.get("predicted_sqnr_db")))
           for p in front.get("points", []) if p.get("relative_to_w8a8")]
    pts = [(x, y) for x, y in pts if y is not None]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", ms=3, lw=1.2,
                color="tab:blue", label="front (predicted)", zorder=2)
        xs_all += [x for x, _ in pts]
    meas = [(x, _cap(p.get("predicted_sqnr_db")), _measured_db(p)) for p in front.get(
        "measured", []) if (x := _rel(p, metric)) is not None]
    meas = [m for m in meas if m[2] is not None]
    if meas:
        for x, yp, ym in meas:
            if yp is not None:
                ax.plot([x, x], [yp, ym], ":", color="tab:blue", lw=0.8, zorder=1)
        ax.plot([m[0] for m in meas], [m[2] for m in meas], "s", ms=6, mfc="white",
                color="tab:blue", label="front (measured)", zorder=3)
        xs_all += [m[0] for m in meas]

    uniform_done = False
    for b in doc.get("baselines", []):
        x = _rel(b, metric)
        if x is None:
            continue
        ym, yp = _measured_db(b), _cap(b.get("predicted_sqnr_db"))
        y = ym if ym is not None else yp
        if y is None:
            continue
        xs_all.append(x)
        name = b.get("name", "")
        if name.startswith("uniform"):
            ax.plot([x], [y], "^", ms=7, color="tab:gray", mfc="tab:gray" if ym is not None
                    else "white", zorder=3,
                    label=None if uniform_done else "uniform (filled: measured)")
            uniform_done = True
            ax.annotate(name.replace("uniform ", ""), (x, y), fontsize=8, xytext=(5, -3),
                        textcoords="offset points", color="dimgray")
        else:
            ax.plot([x], [y], "D", ms=6, color="tab:orange", mfc="tab:orange" if ym is not None
                    else "white", zorder=7,
                    label=f"{name}" + (" (measured)" if ym is not None else " (predicted)"))

    cx = doc.get("totals", {}).get(metric, {}).get("relative_to_w8a8")
    q = doc.get("quality", {})
    cp, cm = _cap(q.get("predicted_sqnr_db")), _measured_db(q)
    if cx is not None and cp is not None:
        xs_all.append(cx)
        ax.plot([cx], [cp], "*", color="tab:red", ms=13, mfc="white", zorder=5,
                label="mpsearch plan (predicted)")
        if cm is not None:
            ax.plot([cx, cx], [cp, cm], "-", color="tab:red", lw=0.8, zorder=4)
            ax.plot([cx], [cm], "*", color="tab:red", ms=15, zorder=6,
                    label="mpsearch plan (measured)")
    reach = 2 * max(xs_all, default=math.inf)  # `pareto` passes a budget no plan reaches
    for b in doc.get("budgets", []):
        lim = b.get("limit_relative_to_w8a8")
        if b.get("metric") == metric and lim and lim <= reach:
            ax.axvline(lim, color="tab:red", ls="--", lw=1, label=f"budget {b.get('budget')}",
                       zorder=1)
            xs_all.append(lim)

    if xs_all:
        lo, hi = min(xs_all), max(xs_all)
        ax.set_xscale("log", base=2)
        ax.set_xlim(lo / 1.12, hi * 1.12)
        ticks = _ticks(lo / 1.12, hi * 1.12)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}x" for t in ticks])
    src = next((m.get("data") for m in [q.get("measured")]
                + [p.get("measured") for p in front.get("measured", [])] if m), None)
    profile = doc.get("profile", {}).get("name", "the device")
    ax.set_xlabel(f"{METRIC_LABELS.get(metric, metric)} relative to all-w8a8 on {profile} "
                  "(log scale)")
    ax.set_ylabel("output SQNR against FP32 (dB)"
                  + (f"\nmeasured on the {src} data" if src else ""))
    ax.set_title("Quality against cost: the Pareto front, the baselines and the chosen plan",
                 fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
