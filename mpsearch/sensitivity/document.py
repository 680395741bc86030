"""The sensitivity table as files: ``sensitivity.json`` (the table with what it was computed
from) and ``sensitivity.csv`` (one row per group and candidate), as ``mpsearch sensitivity``
and ``mpsearch run`` write them."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

from mpsearch.graph.layer_graph import LayerGraph
from mpsearch.sensitivity.run import Method
from mpsearch.sensitivity.table import SensitivityTable

__all__ = ["CSV_COLUMNS", "sensitivity_document", "write_csv", "write_rows"]


def sensitivity_document(table: SensitivityTable, *, model: object, profile: object, data: object,
                         method: Method, timings: bool = True) -> dict:
    """``sensitivity.json``: the table with what it was computed from (paths as given);
    ``timings=False`` leaves out the stage timings (``seconds``), so the same inputs give the
    same bytes."""
    doc = {"model": str(model), "profile": str(profile), "data": str(data),
           "method": method.value, **table.to_dict()}
    if not timings:
        doc.pop("seconds", None)
    return doc


CSV_COLUMNS = ("group", "op_type", "depthwise", "candidate", "measured_mse",
               "measured_sqnr_db", "predicted_mse", "predicted_sqnr_db", "layer_relative_error")


def _csv_cell(v: object) -> object:
    """As pandas' ``to_csv(float_format="%.6g")`` writes it: None and NaN empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def write_csv(path: str | os.PathLike[str], table: SensitivityTable, lg: LayerGraph) -> None:
    """``sensitivity.csv``: :meth:`SensitivityTable.rows` with each group's op type."""
    rows = table.rows()
    for r in rows:
        layer = lg.layers[r["group"]]
        r["op_type"] = layer.op_type
        r["depthwise"] = layer.depthwise
    write_rows(path, rows)


def write_rows(path: str | os.PathLike[str], rows: Sequence[dict]) -> None:
    """Rows with the :data:`CSV_COLUMNS` keys as CSV, the bytes ``DataFrame.to_csv`` with
    ``float_format="%.6g"`` writes."""
    # The csv module, not pandas: the same bytes for 300 rows, without pandas' import (0.15 s
    # of a cached re-run that takes 1 s).
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator=os.linesep)
        w.writerow(CSV_COLUMNS)
        w.writerows([_csv_cell(r[c]) for c in CSV_COLUMNS] for r in rows)
