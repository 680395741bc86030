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
    """Draw the front of a ``plan.json`` document (or a ``pareto.json`` one) into a PNG: on
    the left the region that matters, :data:`ZOOM` of the w8a8 cost (widened to hold the
    budget and the plan), on the right the whole range; markers that fall on one spot are
    named beside it ("= greedy (AMP)")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = doc.get("front", {})
    metric = front.get("metric", "bops")
    fig, (zoom, full) = plt.subplots(1, 2, figsize=(12.5, 5.6), dpi=DPI,
                                     gridspec_kw={"width_ratios": [3, 2]})
    xs, ys = _draw(full, doc, metric, legend=False)
    zx, zy = _draw(zoom, doc, metric, legend=True)
    if xs:
        _x_axis(full, min(xs) / 1.12, max(xs) * 1.35)  # room for the labels at the right
        full.set_ylim(*_y_range(ys))
    # widened to hold the chosen plan and the budgets on this axis
    keep = [doc.get("totals", {}).get(metric, {}).get("relative_to_w8a8")]
    keep += [b.get("limit_relative_to_w8a8") for b in doc.get("budgets", [])
             if b.get("metric") == metric]
    keep = [k for k in keep if k and k < 8 * ZOOM[1]]
    lo = min([ZOOM[0], *[k / 1.1 for k in keep]])
    hi = max([ZOOM[1], *[k * 1.1 for k in keep]])
    _x_axis(zoom, lo, hi)
    inside = [y for x, y in zip(zx, zy, strict=False) if lo <= x <= hi]  # budgets: no y
    if inside:
        zoom.set_ylim(*_y_range(inside))
    q = doc.get("quality", {})
    src = next((m.get("data") for m in [q.get("measured")]
                + [p.get("measured") for p in front.get("measured", [])] if m), None)
    profile = doc.get("profile", {}).get("name", "the device")
    label = METRIC_LABELS.get(metric, metric)
    zoom.set_xlabel(f"{label} relative to all-w8a8 on {profile}")
    full.set_xlabel(f"{label} x w8a8 (log scale), the whole range")
    zoom.set_ylabel("output SQNR against FP32 (dB)"
                    + (f"\nmeasured on the {src} data" if src else ""))
    zoom.set_title(f"Around the budget ({lo:.2g}-{hi:.2g}x)", fontsize=10)
    full.set_title("Every plan weighed", fontsize=10)
    fig.suptitle("Quality against cost: the Pareto front, the baselines and the chosen plan",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)


ZOOM = (0.4, 1.2)  # the left panel's cost range, x w8a8, before it is widened to fit


def _y_range(ys: list[float]) -> tuple[float, float]:
    lo, hi = min(ys), max(ys)
    pad = max(1.0, 0.08 * (hi - lo))
    return lo - pad, hi + pad


def _x_axis(ax: Any, lo: float, hi: float) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ticks = _ticks(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.grid(alpha=0.3, which="both")


def _draw(ax: Any, doc: Mapping[str, Any], metric: str, *, legend: bool
          ) -> tuple[list[float], list[float]]:
    """Every plan of ``doc`` on ``ax``; returns the x and the y of each point drawn (pairs,
    in the same order), the budget lines' x after them in the first list."""
    front = doc.get("front", {})
    xs_all: list[float] = []
    ys_all: list[float] = []
    spots: list[tuple[float, float, str]] = []  # named markers, to tell coinciding ones

    def name_spot(x: float, y: float, name: str) -> None:
        if not legend:  # the overview panel: too small for labels beside markers
            return
        for sx, sy, other in spots:
            if abs(math.log2(x / sx)) < 0.02 and abs(y - sy) < 0.4:
                ax.annotate(f"{name} here too\n(= {other})", (x, y), fontsize=8,
                            xytext=(-10, -8), ha="right", va="top",
                            textcoords="offset points", color="dimgray")
                return
        spots.append((x, y, name))

    pts = [(p["relative_to_w8a8"], _cap(p.get("predicted_sqnr_db")))
           for p in front.get("points", []) if p.get("relative_to_w8a8")]
    pts = [(x, y) for x, y in pts if y is not None]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", ms=3, lw=1.2,
                color="tab:blue", label="front (predicted)", zorder=2)
        xs_all += [x for x, _ in pts]
        ys_all += [y for _, y in pts]
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
        ys_all += [m[2] for m in meas]

    cx = doc.get("totals", {}).get(metric, {}).get("relative_to_w8a8")
    q = doc.get("quality", {})
    cp, cm = _cap(q.get("predicted_sqnr_db")), _measured_db(q)
    if cx is not None and cp is not None:
        xs_all += [cx] if cm is None else [cx, cx]
        ys_all += [cp] + ([cm] if cm is not None else [])
        ax.plot([cx], [cp], "*", color="tab:red", ms=13, mfc="white", zorder=5,
                label="mpsearch plan (predicted)")
        if cm is not None:
            ax.plot([cx, cx], [cp, cm], "-", color="tab:red", lw=0.8, zorder=4)
            ax.plot([cx], [cm], "*", color="tab:red", ms=15, zorder=6,
                    label="mpsearch plan (measured)")
            spots.append((cx, cm, "mpsearch plan"))
        else:
            spots.append((cx, cp, "mpsearch plan"))

    uniform_done = False
    labelled: list[tuple[float, float]] = []  # uniform labels drawn, to stack those that meet
    for b in doc.get("baselines", []):
        x = _rel(b, metric)
        if x is None:
            continue
        ym, yp = _measured_db(b), _cap(b.get("predicted_sqnr_db"))
        y = ym if ym is not None else yp
        if y is None:
            continue
        xs_all.append(x)
        ys_all.append(y)
        name = b.get("name", "")
        if name.startswith("uniform"):
            ax.plot([x], [y], "^", ms=7, color="tab:gray", mfc="tab:gray" if ym is not None
                    else "white", zorder=3,
                    label=None if uniform_done else "uniform (filled: measured)")
            uniform_done = True
            below = sum(abs(math.log2(x / lx)) < 0.05 and abs(y - ly) < 2.5
                        for lx, ly in labelled)  # fp16 and w16a16 both at 4x, 100 dB
            labelled.append((x, y))
            ax.annotate(name.replace("uniform ", ""), (x, y), fontsize=8,
                        xytext=(5, -3 - 10 * below), textcoords="offset points",
                        color="dimgray")
        else:
            ax.plot([x], [y], "D", ms=6, color="tab:orange", mfc="tab:orange" if ym is not None
                    else "white", zorder=7,
                    label=f"{name}" + (" (measured)" if ym is not None else " (predicted)"))
            name_spot(x, y, name)

    reach = 2 * max(xs_all, default=math.inf)  # `pareto` passes a budget no plan reaches
    for b in doc.get("budgets", []):
        lim = b.get("limit_relative_to_w8a8")
        if b.get("metric") == metric and lim and lim <= reach:
            ax.axvline(lim, color="tab:red", ls="--", lw=1, label=f"budget {b.get('budget')}",
                       zorder=1)
            xs_all.append(lim)
    if legend:
        ax.legend(fontsize=8, loc="upper left", framealpha=0.9)  # quality rises with cost
    return xs_all, ys_all
