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

Measuring only where the plan departs never corrects a prediction that is too pessimistic: a
pair predicted too costly is never chosen, so never measured. On EfficientNet-Lite0 the
Hessian predicted w4a8 on the deep 1x1 convs 5-7x too costly (measured 1.9e-4 against 9.8e-4
predicted on node_Conv_865), so at bops 1.0 of w8a8 no plan left all-w8a8, where three of them
at w4a8 pay for 16-bit activations in the stem. So each round also solves once with every
unmeasured alternative to the plan's choices made ``explore`` times less harmful
(:func:`hopeful_errors`, :data:`EXPLORE`) and measures where that optimistic plan departs
too, :data:`EXPLORE_PAIRS` pairs at most (in network order; they are mostly early layers,
whose runs cost the most). With it, the bops-1.0 plan measured 24.29 dB on the 200 held-out
crops against 22.82 dB for all-w8a8 (benchmarks/effnet_search.py). The factor 3 is about two
standard deviations of the Hessian's log error there (0.5-0.7).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mpsearch.core.formats import Candidate
from mpsearch.sensitivity.table import SensitivityTable, unchanged

__all__ = ["EXPLORE", "EXPLORE_PAIRS", "Refinement", "corrected_errors", "hopeful_errors",
           "pairs_to_verify"]

log = logging.getLogger(__name__)

Key = tuple[str, Candidate]

EXPLORE = 3.0  # how much cheaper an unmeasured alternative is assumed, to decide what to measure
EXPLORE_PAIRS = 12  # exploration's pairs measured per round at most (network order)


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


def hopeful_errors(errors: Mapping[Key, float], plan: Mapping[str, Candidate],
                   known: Mapping[Key, float], factor: float = EXPLORE) -> dict[Key, float]:
    """``errors`` with every unmeasured pair that is not the plan's choice divided by
    ``factor``: the errors under which an optimistic solve shows what is worth measuring."""
    return {k: v / factor if k not in known and plan.get(k[0]) != k[1] else v
            for k, v in errors.items()}
