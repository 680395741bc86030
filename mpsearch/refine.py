"""Trust, then verify: measure what the chosen plan rests on, and solve again.

An exact solver over predicted errors exploits their mistakes (the optimizer's curse): among
hundreds of (group, candidate) pairs it picks exactly those whose errors are predicted too
small. So after each solve, the pairs the plan departs on (its groups away from w8a8, at their
chosen candidate and at w8a8) are measured for real
(:func:`mpsearch.sensitivity.run.measure_pairs`, a fraction of a second each, cached), the
unmeasured predictions are rescaled per candidate by the median ratio measured/predicted seen
so far, and the problem is solved again, until the plan departs only on measured pairs or
``rounds`` run out. The final plan is then the exact optimum of errors that are measured
wherever it differs from w8a8.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mpsearch.formats import Candidate
from mpsearch.sensitivity.table import SensitivityTable, unchanged

__all__ = ["Refinement", "corrected_errors", "pairs_to_verify"]

log = logging.getLogger(__name__)

Key = tuple[str, Candidate]


@dataclass(frozen=True, kw_only=True)
class Refinement:
    """What verification measured, round by round, and the per-candidate scales it found."""

    measured: Mapping[Key, float]
    rounds: tuple[int, ...]  # pairs measured in each round
    scales: Mapping[str, float]  # candidate name -> measured / predicted (median)


def corrected_errors(table: SensitivityTable, measured: Mapping[Key, float],
                     candidates: Mapping[str, Sequence[Candidate]]
                     ) -> tuple[dict[Key, float], dict[str, float]]:
    """Measured where measured; elsewhere predicted times its candidate's median ratio
    measured/predicted (the overall median for candidates with fewer than two)."""
    ratios: dict[str, list[float]] = {}
    for (g, c), m in measured.items():
        p = table.predicted.get((g, c))
        if p and p > 0 and m > 0:
            ratios.setdefault(c.name, []).append(math.log(m / p))
    every = [r for rs in ratios.values() for r in rs]
    overall = math.exp(statistics.median(every)) if every else 1.0
    scales = {c: math.exp(statistics.median(rs)) if len(rs) >= 2 else overall
              for c, rs in ratios.items()}
    out: dict[Key, float] = {}
    for g, cs in candidates.items():
        for c in cs:
            if (g, c) in measured:
                out[(g, c)] = measured[(g, c)]
            elif (g, c) in table.measured:
                out[(g, c)] = table.measured[(g, c)]
            elif (g, c) in table.predicted:
                out[(g, c)] = table.predicted[(g, c)] * scales.get(c.name, overall)
            else:
                out[(g, c)] = table.error(g, c)
    return out, scales


def pairs_to_verify(plan: Mapping[str, Candidate], reference: Candidate,
                    candidates: Mapping[str, Sequence[Candidate]],
                    known: Mapping[Key, float]) -> list[Key]:
    """The plan's pairs away from ``reference``, and those groups at ``reference``, that are
    not measured yet (network order)."""
    out = []
    for g, c in plan.items():
        if c == reference or unchanged(c):
            continue
        for k in ((g, c), (g, reference)):
            if k[1] in candidates[g] and k not in known and k not in out:
                out.append(k)
    return out
