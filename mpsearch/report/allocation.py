"""Where the bits went: one bar per quantizer group along the network, its height the layer's
multiply-accumulates (log scale), its colour the candidate the plan gave it; below, the output
SQNR with that group alone at that candidate, ``10 log10(E[y^2] / E[(y - y_c)^2])``, as the
search used it (predicted, or measured where the refinement measured it, marked): low points
are the groups that eat the error budget.

Drawn from ``plan.json``'s ``layers`` records, so ``mpsearch report`` redraws it from a run's
files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["allocation_plot", "candidate_colors"]

DPI = 100

# One colour per candidate, the same in every chart and table: cool colours for fewer bits,
# warm ones for more, grey for float.
_KNOWN = {"w4a8": "#f28e2b", "w4a16": "#edc948", "w8a8": "#4e79a7", "w8a16": "#59a14f",
          "w16a16": "#b07aa1", "fp16": "#e15759", "fp8": "#ff9da7", "float": "#9d9d9d"}
_SPARE = ("#76b7b2", "#9c755f", "#bab0ac", "#d37295", "#a0cbe8", "#8cd17d", "#86bcb6")


def candidate_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per candidate name (unknown names take spare colours in sorted order)."""
    out: dict[str, str] = {}
    spare = iter(_SPARE * (1 + len(names) // len(_SPARE)))
    for n in sorted(set(names)):
        out[n] = _KNOWN.get(n) or next(spare)
    return out


def _order(names: Sequence[str]) -> list[str]:
    known = list(_KNOWN)
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def allocation_plot(layers: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
                    title: str = "Per-layer allocation along the network") -> None:
    """Write the allocation chart of ``plan.json``'s ``layers`` records to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(layers)
    names = [str(r.get("group", i)) for i, r in enumerate(layers)]
    cands = [str(r.get("candidate", "?")) for r in layers]
    colors = candidate_colors(cands)
    macs = [max(float(r.get("macs") or 0), 1.0) for r in layers]
    pred = [_finite(r.get("predicted_sqnr_db")) for r in layers]
    # measured single-group MSE -> dB with the signal implied by the predicted pair
    meas: list[float | None] = []
    for r, p in zip(layers, pred, strict=True):
        pm, mm = _finite(r.get("predicted_mse")), _finite(r.get("measured_single_mse"))
        signal = pm * 10 ** (p / 10) if p is not None and pm else None
        meas.append(10 * math.log10(signal / mm) if signal and mm and mm > 0 else None)

    width = min(max(11.0, 0.2 * n + 3.0), 20.0)
    fig, (top, bot) = plt.subplots(2, 1, figsize=(width, 6.4), dpi=DPI, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    xs = list(range(n))
    top.bar(xs, macs, color=[colors[c] for c in cands], width=0.8, edgecolor="none")
    top.set_yscale("log")
    top.set_ylabel("MACs per inference (log)")
    top.set_title(title, fontsize=11)
    top.grid(axis="y", alpha=0.3)
    counts = {c: cands.count(c) for c in set(cands)}
    top.legend(handles=[Patch(color=colors[c], label=f"{c} ({counts[c]})") for c in _order(cands)],
               fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False,
               title="format (groups)", title_fontsize=8, alignment="left")

    pts = [(x, y) for x, y in zip(xs, pred, strict=True) if y is not None]
    if pts:
        bot.plot([x for x, _ in pts], [y for _, y in pts], "-", color="0.55", lw=1, zorder=1)
        bot.scatter([x for x, _ in pts], [y for _, y in pts], s=22, zorder=2,
                    c=[colors[cands[x]] for x, _ in pts], edgecolors="0.3", linewidths=0.5,
                    label="the search's estimate")
    mp = [(x, y) for x, y in zip(xs, meas, strict=True) if y is not None]
    if mp:
        bot.scatter([x for x, _ in mp], [y for _, y in mp], s=40, marker="s",
                    facecolors="none", edgecolors="black", linewidths=0.8, zorder=3,
                    label="measured (not predicted)")
    bot.set_ylabel("output SQNR with this\ngroup alone quantized (dB)")
    bot.grid(alpha=0.3)
    if pts or mp:
        bot.legend(fontsize=8, loc="best")
    bot.set_xticks(xs)
    step = max(1, n // 90)
    bot.set_xticklabels([nm if i % step == 0 else "" for i, nm in enumerate(names)],
                        rotation=90, fontsize=7 if n > 30 else 8)
    bot.set_xlim(-0.6, n - 0.4)
    bot.set_xlabel("quantizer group, in network order")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
