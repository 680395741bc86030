"""The terminal: progress bars on stderr (none for scripts, CI and ``--quiet``), notes, tables."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Ui", "eval_table", "fmt"]


class Ui:
    """Where a command prints: ``out`` (stdout: tables, or the ``--json`` document) and ``err``
    (stderr: progress, notes, errors)."""

    def __init__(self, *, quiet: bool, as_json: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.as_json = as_json
        self.out = Console(soft_wrap=True)
        self.err = Console(stderr=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if self.quiet or not self.err.is_terminal:
            yield lambda n: None  # scripts and CI: no bars (-v logs each stage instead)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.err,
                      transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)

    def note(self, text: str) -> None:
        if not self.quiet and not self.as_json:
            self.err.print(text)


def fmt(v: float | None, spec: str = ".2f", pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{100 * v:.1f}%" if pct else format(v, spec)


def eval_table(ui: Ui, result: Any, title: str) -> None:
    """Per output of an :class:`~mpsearch.graph.evaluate.EvalResult`: SQNR, cosine, agreement."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("output", "SQNR dB", "cosine", "top-1 agree", "top-5 contain", "accuracy",
                "FP32 accuracy"):
        t.add_column(col, justify="right" if col != "output" else "left")
    for o in result.outputs:
        t.add_row(o.name, fmt(o.sqnr_db), fmt(o.cosine, ".5f"), fmt(o.top1_agreement, pct=True),
                  fmt(o.top5_containment, pct=True), fmt(o.accuracy, pct=True),
                  fmt(o.accuracy_fp32, pct=True))
    ui.out.print(t)
    ui.out.print(f"{result.samples} evaluation samples")
