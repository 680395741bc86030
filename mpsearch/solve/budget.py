"""Budgets as users write them (``latency=0.7``, ``size_mb=4``), turned into hard limits on the
cost model's metrics.

A relative budget is a fraction of the all-w8a8 plan on the same device (the device's 8-bit
integer pair, :func:`mpsearch.hw.cost.reference_candidate`); an absolute one is in the unit its
name says. Several budgets hold at once (QBitOpt: the constraint is met exactly, no penalty
weight to tune).

=============  ===============  ==========================================================
key            metric           meaning
=============  ===============  ==========================================================
``latency``    ``latency_s``    latency relative to all-w8a8
``latency_ms`` ``latency_s``    latency in milliseconds
``bops``       ``bops``         bit-operations (MACs · weight bits · activation bits),
                                relative to all-w8a8
``size``       ``weight_bytes`` weight (and bias) bytes relative to all-w8a8
``size_mb``    ``weight_bytes`` weight bytes in MB (10⁶ bytes)
``energy``     ``energy_j``     energy per inference relative to all-w8a8
``energy_mj``  ``energy_j``     energy per inference in millijoules
=============  ===============  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mpsearch.core.errors import UsageError

__all__ = ["BUDGET_KEYS", "Budget", "parse_budget", "parse_budgets"]


@dataclass(frozen=True)
class _Key:
    metric: str
    relative: bool
    unit: float  # multiplier from the user's unit to the metric's
    label: str


BUDGET_KEYS: Mapping[str, _Key] = {
    "latency": _Key("latency_s", True, 1.0, "latency (x w8a8)"),
    "latency_ms": _Key("latency_s", False, 1e-3, "latency (ms)"),
    "bops": _Key("bops", True, 1.0, "bit-operations (x w8a8)"),
    "size": _Key("weight_bytes", True, 1.0, "weight size (x w8a8)"),
    "size_mb": _Key("weight_bytes", False, 1e6, "weight size (MB)"),
    "energy": _Key("energy_j", True, 1.0, "energy (x w8a8)"),
    "energy_mj": _Key("energy_j", False, 1e-3, "energy (mJ)"),
}


@dataclass(frozen=True, kw_only=True)
class Budget:
    """One hard limit: ``key=value`` as the user gave it."""

    key: str
    value: float

    @property
    def metric(self) -> str:
        return BUDGET_KEYS[self.key].metric

    @property
    def relative(self) -> bool:
        return BUDGET_KEYS[self.key].relative

    def limit(self, reference: Mapping[str, float]) -> float:
        """The limit in the metric's unit; ``reference``: the all-w8a8 plan's totals."""
        k = BUDGET_KEYS[self.key]
        if k.relative and not reference[k.metric] > 0:
            raise UsageError(f"budget {self} is relative to the all-w8a8 plan's {k.metric}, "
                             f"which is {reference[k.metric]:g} on this model (no layer's cost "
                             "in it could be counted)",
                             fix="give a budget of another quantity, or an absolute one "
                                 "(latency_ms=, size_mb=, energy_mj=)")
        return self.value * (reference[k.metric] if k.relative else k.unit)

    def in_user_units(self, metric_value: float, reference: Mapping[str, float]) -> float:
        """``metric_value`` expressed like this budget (relative, or ms, MB, mJ)."""
        k = BUDGET_KEYS[self.key]
        return metric_value / (reference[k.metric] if k.relative else k.unit)

    def __str__(self) -> str:
        return f"{self.key}={self.value:g}"


def parse_budget(text: str) -> Budget:
    """``KEY=VALUE``; keys are case-insensitive (``BOPS=0.75``), and an unknown one is answered
    with the nearest known key (``bpos`` -> ``bops``)."""
    key, sep, value = text.partition("=")
    key = key.strip().lower()
    if not sep or key not in BUDGET_KEYS:
        import difflib

        near = difflib.get_close_matches(key, BUDGET_KEYS, n=1, cutoff=0.5) if sep else []
        raise UsageError(f"budget '{text}' is not KEY=VALUE with a known KEY"
                         + (f" (did you mean '{near[0]}={value.strip()}'?)" if near else ""),
                         fix="use one of " + ", ".join(f"{k}=" for k in BUDGET_KEYS)
                             + " e.g. --budget latency=0.7")
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise UsageError(f"budget '{text}': {value!r} is not a positive number",
                         fix=f"give a positive number, e.g. {key}=0.7")
    return Budget(key=key, value=v)


def parse_budgets(texts: Iterable[str | Budget] | Mapping[str, float]) -> tuple[Budget, ...]:
    """Budgets from ``["latency=0.7", ...]``, ``{"latency": 0.7}`` or Budget objects; one per
    metric at most."""
    if isinstance(texts, Mapping):
        items = [parse_budget(f"{k}={v}") for k, v in texts.items()]
    else:
        items = [t if isinstance(t, Budget) else parse_budget(t) for t in texts]
    seen: dict[str, Budget] = {}
    for b in items:
        if b.metric in seen:
            raise UsageError(f"budgets {seen[b.metric]} and {b} both limit {b.metric}",
                             fix="give one budget per quantity")
        seen[b.metric] = b
    return tuple(items)
