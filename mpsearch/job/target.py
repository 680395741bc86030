"""A quality target instead of a cost budget: the cheapest plan whose measured quality meets it.

What AIMET AMP (``allowed_accuracy_drop``) and NNCF's accuracy-aware mode offer. ``--target
sqnr=25`` (output SQNR against FP32, dB, at least), ``--target sqnr_drop=0.5`` (at most 0.5 dB
below uniform w8a8's SQNR, measured on the same samples: what a run without a budget ships),
``--target top1_drop=1%`` (top-1
disagreement with FP32, at most) or, with labels, ``--target accuracy_drop=0.5%`` (FP32's
accuracy minus the plan's, at most) asks for the plan of least cost on one axis (the first
``--budget``'s quantity, which then caps it, else bit-operations) whose quality *on the check
part* meets the target (:mod:`mpsearch.job.selection`): never on the samples it was fitted on,
and never on the evaluation data, which stays held out to report it.

How: the exact ILP already gives, for every cost limit, the plan of least predicted error, and
the search (refinement, shortlist) makes it the best measured plan there. Quality measured that
way grows with the limit, so :func:`bisect` finds the least limit that meets the target by
bisection in log-cost between the cheapest plan the device allows and the dearest, starting
from the limit where the *predicted* front first meets it, then the cheapest (if the start
met it) or the dearest limit (if not) to bracket it, then halving the bracket (each step one
search without the polish, the measured pairs cached). Predictions are optimistic on mixed
plans, so the start is rarely the answer; the four halvings left of six steps narrow the
bracket to a sixteenth of its log-width. The plan shipped is the
search at the least limit that met the target, polished (the polish only lowers measured
error). A target no plan meets is an error that names the best quality reached and the
uniform plan that comes closest.

Plain Python: the bisection of a monotone measured function over one scalar is a few lines,
and each evaluation is a whole search, which no root finder would call fewer times.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from mpsearch.core.errors import UsageError

__all__ = ["TARGET_KEYS", "STEPS", "Step", "Target", "bisect", "parse_target"]

STEPS = 6  # searches at most while bisecting
TOLERANCE = 0.015  # stop when the bracket is this narrow, relative


@dataclass(frozen=True)
class _Key:
    label: str
    unit: str
    higher_is_better: bool


TARGET_KEYS = {
    "sqnr": _Key("output SQNR against FP32", "dB", True),
    # dB below uniform w8a8's SQNR on the check part: the default of a run without a budget
    "sqnr_drop": _Key("output SQNR below uniform w8a8's", "dB", True),
    "top1_drop": _Key("top-1 disagreement with FP32", "%", False),
    "accuracy_drop": _Key("accuracy drop against FP32, on the labels", "%", False),
}


@dataclass(frozen=True, kw_only=True)
class Target:
    """``key=value`` as the user gave it; drops are fractions (``1%`` is 0.01)."""

    key: str
    value: float

    def __str__(self) -> str:
        if self.key in ("sqnr", "sqnr_drop"):
            return f"{self.key}={self.value:g}"
        return f"{self.key}={100 * self.value:g}%"

    @property
    def label(self) -> str:
        return TARGET_KEYS[self.key].label

    def met(self, quality: float) -> bool:
        """Whether a measured ``quality`` (dB, or a drop as a fraction) meets the target."""
        if not math.isfinite(quality):
            return quality > 0 if TARGET_KEYS[self.key].higher_is_better else quality < 0
        return (quality >= self.value if TARGET_KEYS[self.key].higher_is_better
                else quality <= self.value + 1e-12)

    def shown(self, quality: float) -> str:
        return f"{quality:.2f} dB" if self.key == "sqnr" else f"{100 * quality:.2f}%"

    def against(self, reference_db: float) -> Target:
        """``sqnr_drop=d`` as the SQNR it asks for, given uniform w8a8's; others as they are."""
        if self.key != "sqnr_drop":
            return self
        return Target(key="sqnr", value=reference_db - self.value)


def parse_target(text: str) -> Target:
    """``sqnr=25``, ``top1_drop=1%`` (or ``0.01``), ``accuracy_drop=0.5%``."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*=\s*([^%\s]+)\s*(%?)\s*", str(text))
    example = "--target sqnr=25, --target top1_drop=1%, --target accuracy_drop=0.5%"
    if not m:
        raise UsageError(f"target '{text}' is not KEY=VALUE", fix=f"write e.g. {example}")
    key, raw, pct = m.group(1).lower(), m.group(2), m.group(3)
    if key not in TARGET_KEYS:
        import difflib

        near = difflib.get_close_matches(key, TARGET_KEYS, n=1)
        raise UsageError(f"unknown target '{m.group(1)}'"
                         + (f" (did you mean '{near[0]}'?)" if near else ""),
                         fix=f"use one of {', '.join(TARGET_KEYS)}: {example}")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"target {key}={raw}{pct}: '{raw}' is not a number",
                         fix=f"write e.g. {example}") from None
    if not math.isfinite(value):
        raise UsageError(f"target {key}={raw}{pct} is not a finite number",
                         fix=f"write e.g. {example}")
    if key in ("sqnr", "sqnr_drop"):
        if pct:
            raise UsageError(f"target {key} is in dB, not %",
                             fix=f"write e.g. --target {key}={'25' if key == 'sqnr' else '0.5'}")
        if key == "sqnr_drop" and value < 0:
            raise UsageError(f"target sqnr_drop={raw} is negative",
                             fix="give the dB the plan may lose against uniform w8a8, e.g. 0.5")
        return Target(key=key, value=value)
    value = value / 100 if pct else value
    if not 0 <= value < 1:
        raise UsageError(f"target {key}={raw}{pct} must be a drop between 0% and 100%",
                         fix=f"write e.g. {example}")
    return Target(key=key, value=value)


@dataclass(frozen=True, kw_only=True)
class Step:
    """One search of the bisection: the cost limit (x w8a8), the quality its plan measured on
    the check part, and whether that meets the target."""

    limit: float
    quality: float
    met: bool


def bisect(target: Target, attempt: Callable[[float], float], *, lo: float, hi: float,
           start: float, steps: int = STEPS, tolerance: float = TOLERANCE
           ) -> tuple[float | None, list[Step]]:
    """The least limit in ``[lo, hi]`` whose plan meets ``target`` (``attempt(limit)``: the
    measured quality of the search's plan at that limit), found in log-space from ``start``;
    None when even ``hi`` does not. Returns it with every step taken, in order."""
    if not 0 < lo <= hi:
        raise ValueError(f"bad bracket [{lo}, {hi}]")
    done: list[Step] = []

    def run(limit: float) -> bool:
        q = attempt(limit)
        done.append(Step(limit=limit, quality=q, met=target.met(q)))
        return done[-1].met

    ok: float | None = None
    fail = lo if lo == hi else None
    x = min(max(start, lo), hi)
    while len(done) < steps:
        if run(x):
            ok = x
            if x <= lo * (1 + 1e-12):
                break
        else:
            fail = x
            if x >= hi * (1 - 1e-12):
                break
        low = fail if fail is not None else lo
        high = ok if ok is not None else hi
        if ok is not None and fail is not None and high / low <= 1 + tolerance:
            break
        if fail is None:  # nothing failed yet: does the cheapest plan meet it?
            x = lo
        elif ok is None:  # nothing met it yet: does the dearest?
            x = hi
        else:
            x = math.sqrt(low * high)
    if ok is None and not any(s.limit >= hi * (1 - 1e-12) for s in done) and run(hi):
        ok = hi  # the step budget ran out before the dearest plan was tried
    return ok, done
