"""The sensitivity heatmap: quantizer groups along the network (columns) x candidates (rows),
coloured by the SQNR of the network output when that group alone takes that candidate,
``SQNR = 10 log10(E[y^2] / E[(y - y_c)^2])``: dark cells are where a format hurts.

It draws a :class:`SensitivityTable`, so ``sensitivity.json`` read back with
``SensitivityTable.from_dict`` gives the same picture; with ``chosen`` (group -> candidate
name) the plan's choice is outlined in each row. :func:`heatmap_key` names a picture by what it
is drawn from, for a cache of drawn files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mpsearch.sensitivity.table import SensitivityTable, unchanged

__all__ = ["heatmap_key", "sensitivity_heatmap"]

CAP_DB = 100.0
DPI = 100
ANNOTATE_GROUPS = 40  # beyond this many groups a cell is too narrow for its number: the
# colour bar tells the value (EfficientNet-Lite0's 80 groups: 5 px digits otherwise)


def heatmap_key(table: SensitivityTable, *, title: str = "Single-group sensitivity",
                chosen: Mapping[str, str] | None = None) -> str:
    """A digest of everything :func:`sensitivity_heatmap` draws from: the table (not its
    timings), the arguments, this module's code and the installed matplotlib (its
    ``__init__.py``: path, size, time), found without importing it."""
    doc = {k: v for k, v in table.to_dict().items() if k != "seconds"}
    spec = importlib.util.find_spec("matplotlib")
    mpl = None
    if spec is not None and spec.origin:
        st = os.stat(spec.origin)
        mpl = [spec.origin, st.st_size, st.st_mtime_ns]
    h = hashlib.sha256(json.dumps({"table": doc, "title": title, "chosen": chosen,
                                   "dpi": DPI, "matplotlib": mpl},
                                  sort_keys=True, default=str).encode())
    try:
        h.update(Path(__file__).read_bytes())
    except OSError:  # no source file (a frozen install): its version stands for its code
        from mpsearch.core.version import __version__

        h.update(__version__.encode())
    return h.hexdigest()


def sensitivity_heatmap(table: SensitivityTable, path: str | os.PathLike[str], *,
                        title: str = "Single-group sensitivity",
                        chosen: Mapping[str, str] | None = None) -> None:
    """Write a PNG; measured values where there are any, else predicted (marked in the
    title)."""
    from matplotlib.figure import Figure  # not pyplot: half a second less to import
    from matplotlib.patches import Rectangle

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
                grid[i, j] = min(v, CAP_DB) if math.isfinite(v) else CAP_DB
    src = "measured" if table.measured and len(table.measured) >= len(table.pairs()) // 2 \
        else "Hessian-predicted"
    n, k = len(table.groups), len(cands)
    grid = grid.T  # candidates down, groups across: the network reads left to right
    # at most 14 in (1,400 px): the report shows it about 1,200 px wide, so the labels keep
    # their size; numbers in the cells only where a cell is wide enough to read them
    width = min(max(10.0, 0.16 * n + 3.0), 14.0)
    fig = Figure(figsize=(width, 2.8 + 0.5 * k), dpi=DPI)
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(k), [c.name for c in cands])
    step = max(1, n // 100)
    ax.set_xticks(range(0, n, step), [table.groups[i] for i in range(0, n, step)],
                  rotation=90, fontsize=7 if n > 30 else 8)
    if n <= ANNOTATE_GROUPS and k <= 12:
        finite = grid[np.isfinite(grid)]
        mid = float(np.nanmean(finite)) if finite.size else 0.0
        for j in range(k):
            for i in range(n):
                v = grid[j, i]
                if np.isfinite(v):
                    # inside its cell: nothing tight_layout must make room for, so it
                    # skips measuring them (300 texts on EfficientNet-Lite0, 40 ms)
                    ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=8,
                            color="black" if v > mid else "white", in_layout=False)
    if chosen:
        names = [c.name for c in cands]
        first = True
        for i, g in enumerate(table.groups):
            name = chosen.get(g)
            if name in names:
                ax.add_patch(Rectangle((i - 0.5, names.index(name) - 0.5), 1, 1, fill=False,
                                       ec="red", lw=1.6,
                                       label="the plan's choice" if first else None))
                first = False
        if not first:
            ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                      frameon=False)
    ax.set_ylabel("candidate")
    ax.set_xlabel("quantizer group, in network order")
    ax.set_title(f"{title}: {src} output SQNR in dB with one group quantized at a time "
                 "(higher is better)", fontsize=10, loc="left")
    fig.colorbar(im, ax=ax, label="SQNR dB", fraction=0.04, pad=0.01)
    fig.tight_layout()
    # tight_layout leaves a placeholder layout engine, for which savefig draws the whole
    # figure once more before drawing it for real (80 ms here); the layout is done
    fig.set_layout_engine(None)
    fig.savefig(os.fspath(path), format="png", dpi=DPI, metadata={"Software": None})
