"""The sensitivity heatmap: quantizer groups along the network (rows) × candidates (columns),
coloured by the SQNR of the network output when that group alone takes that candidate."""

from __future__ import annotations

import math
import os

import numpy as np

from mpsearch.sensitivity.table import SensitivityTable, unchanged

__all__ = ["sensitivity_heatmap"]


def sensitivity_heatmap(table: SensitivityTable, path: str | os.PathLike[str], *,
                        title: str = "Single-group sensitivity") -> None:
    """Write a PNG; measured values where there are any, else predicted (marked in the
    title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands: list = []
    for g in table.groups:
        for c in table.candidates[g]:
            if c not in cands and not unchanged(c):
                cands.append(c)
    grid = np.full((len(table.groups), len(cands)), np.nan)
    for i, g in enumerate(table.groups):
        for j, c in enumerate(cands):
            if c in table.candidates[g]:
                v = table.sqnr_db(g, c)
                grid[i, j] = min(v, 100.0) if math.isfinite(v) else 100.0
    src = "measured" if table.measured and len(table.measured) >= len(table.pairs()) // 2 \
        else "Hessian-predicted"
    h = max(4.0, 0.18 * len(table.groups) + 1.5)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(cands), h), dpi=100)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cands)), [c.name for c in cands], rotation=30, ha="right")
    step = max(1, len(table.groups) // 60)
    ax.set_yticks(range(0, len(table.groups), step),
                  [table.groups[k] for k in range(0, len(table.groups), step)], fontsize=7)
    ax.set_xlabel("candidate")
    ax.set_ylabel("quantizer group (network order)")
    ax.set_title(f"{title} ({src}, output SQNR dB)", fontsize=10)
    fig.colorbar(im, ax=ax, label="SQNR dB (higher is better)")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
