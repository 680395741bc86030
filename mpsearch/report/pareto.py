"""``pareto.png``: predicted quality against cost for the front, the measured front points, the
uniform plans, the greedy plan and the chosen one, with the budget drawn in."""

from __future__ import annotations

import math
import os

from mpsearch.job import PlanResult, SearchResult

__all__ = ["pareto_plot"]

_LABEL = {"latency_s": "latency", "bops": "bit-operations", "weight_bytes": "weight size",
          "energy_j": "energy"}


def pareto_plot(res: SearchResult, path: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = res.front.metric
    ref = res.costs.plan({g: res.costs.reference for g in res.analysis.graph.group_names},
                         relative=False).as_dict()[metric]

    def x(pr: PlanResult) -> float:
        return pr.cost.as_dict()[metric] / ref

    def db(mse: float) -> float:
        return 10 * math.log10(res.table.signal / mse) if mse > 0 else 100.0

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    pts = res.front.points
    ax.plot([p.cost / ref for p in pts],
            [min(db(res.built.predicted_error(p.solution.choice)), 100.0) for p in pts],
            "-o", ms=3, color="tab:blue", label="front (predicted)")
    meas = [p for p in res.front_plans if p.measured]
    if meas:
        ax.plot([x(p) for p in meas], [p.measured.sqnr_db for p in meas], "s", ms=6,
                mfc="none", color="tab:blue", label="front (measured)")
    for u in res.uniform:
        yv = u.measured.sqnr_db if u.measured else u.predicted_sqnr_db
        ax.plot([x(u)], [min(yv, 100.0)], "^", color="tab:gray", ms=7)
        ax.annotate(u.name.replace("uniform ", ""), (x(u), min(yv, 100.0)), fontsize=7,
                    xytext=(4, 2), textcoords="offset points", color="tab:gray")
    if res.greedy is not None:
        g = res.greedy
        ax.plot([x(g)], [g.measured.sqnr_db if g.measured else g.predicted_sqnr_db], "D",
                color="tab:orange", ms=7, label="greedy (AMP)")
    c = res.chosen
    ax.plot([x(c)], [c.predicted_sqnr_db], "*", color="tab:red", ms=12, mfc="none",
            label="mpsearch (predicted)")
    if c.measured:
        ax.plot([x(c)], [c.measured.sqnr_db], "*", color="tab:red", ms=14,
                label="mpsearch (measured)")
    for b in res.budgets:
        if b.metric == metric:
            ax.axvline(res.limits[metric] / ref, color="tab:red", ls="--", lw=1,
                       label=f"budget {b}")
    src = next((p.measured.data for p in [c, *meas] if p.measured), None)
    ax.set_xlabel(f"{_LABEL.get(metric, metric)} relative to all-w8a8 on {res.profile.name}")
    ax.set_ylabel("output SQNR against FP32 (dB)" + (f", measured on {src} data" if src else ""))
    ax.set_title("Pareto front: quality against cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", metadata={"Software": None})
    plt.close(fig)
