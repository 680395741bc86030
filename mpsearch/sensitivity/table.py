"""The :class:`SensitivityTable`: for every quantizer group and legal candidate, the network
output error when that group alone takes that candidate (DESIGN.md §3).

Errors are output MSE (mean over every element of every model output), with the output's mean
square ``signal`` kept alongside, so ``SQNR = 10·log10(signal / mse)``. The measured and the
Hessian-predicted values sit side by side; :meth:`SensitivityTable.error` gives the solver the
measured value where there is one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from mpsearch.formats import Candidate, Format, parse_candidate
from mpsearch.graph import LayerGraph
from mpsearch.hw.cost import CostModel

__all__ = ["HessianFit", "SensitivityTable", "candidates_for", "sqnr", "unchanged"]

Key = tuple[str, Candidate]


def unchanged(c: Candidate) -> bool:
    """The float candidate: the model as it is (fp16 is not: its weights are rounded)."""
    return c.weight is Format.FLOAT and c.activation is Format.FLOAT


def sqnr(signal: float, mse: float) -> float:
    """SQNR in dB (inf for an exact result)."""
    if mse <= 0:
        return math.inf
    return 10.0 * math.log10(signal / mse) if signal > 0 else -math.inf


def candidates_for(lg: LayerGraph, costs: CostModel,
                   only: tuple[Candidate, ...] | None = None) -> dict[str, tuple[Candidate, ...]]:
    """Group -> the candidates its op may take on the device (restricted to ``only``)."""
    out: dict[str, tuple[Candidate, ...]] = {}
    for g in lg.group_names:
        cands = costs.candidates(g)
        if only is not None:
            cands = tuple(c for c in cands if c in only)
        out[g] = cands
    return out


@dataclass(frozen=True, kw_only=True)
class HessianFit:
    """How layer-output errors map to network-output error: ``mse = alpha · rel · signal``."""

    alpha: float
    runs: tuple[Key, ...]  # the measured (group, candidate) pairs the fit used
    log_spread: float  # standard deviation of log10(measured / predicted) on those runs


@dataclass(frozen=True, kw_only=True)
class SensitivityTable:
    groups: tuple[str, ...]
    candidates: Mapping[str, tuple[Candidate, ...]]
    signal: float  # mean square of the FP32 model outputs on the calibration data
    samples: int
    measured: Mapping[Key, float] = field(default_factory=dict)  # output MSE
    predicted: Mapping[Key, float] = field(default_factory=dict)  # Hessian estimate, MSE
    relative: Mapping[Key, float] = field(default_factory=dict)  # layer-output relative error
    fit: HessianFit | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)
    # (group, activation format name) -> output MSE of that group's input rounding noise, the
    # part of its single-group error a same-format producer's output quantizer also carries
    input_noise: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def pairs(self) -> list[Key]:
        return [(g, c) for g in self.groups for c in self.candidates[g]]

    def error(self, group: str, cand: Candidate) -> float:
        """The output MSE the solver uses: measured where available, else predicted."""
        key = (group, cand)
        if key in self.measured:
            return self.measured[key]
        if key in self.predicted:
            return self.predicted[key]
        if unchanged(cand):
            return 0.0
        raise KeyError(f"no sensitivity for group {group} candidate {cand}")

    def sqnr_db(self, group: str, cand: Candidate) -> float:
        return sqnr(self.signal, self.error(group, cand))

    def rows(self) -> list[dict]:
        """One row per (group, candidate): the CSV and the report read these."""
        out = []
        for g, c in self.pairs():
            m, p = self.measured.get((g, c)), self.predicted.get((g, c))
            out.append({
                "group": g, "candidate": c.name,
                "measured_mse": m, "measured_sqnr_db": None if m is None else sqnr(self.signal, m),
                "predicted_mse": p,
                "predicted_sqnr_db": None if p is None else sqnr(self.signal, p),
                "layer_relative_error": self.relative.get((g, c)),
            })
        return out

    def to_dict(self) -> dict:
        return {
            "signal": self.signal, "samples": self.samples,
            "groups": list(self.groups),
            "candidates": {g: [c.name for c in cs] for g, cs in self.candidates.items()},
            "fit": None if self.fit is None else {
                "alpha": self.fit.alpha, "log10_spread": self.fit.log_spread,
                "runs": [[g, c.name] for g, c in self.fit.runs]},
            "entries": [{k: _finite(v) for k, v in r.items()} for r in self.rows()],
            "seconds": dict(self.seconds),
            "input_noise": [[g, f, _finite(v)] for (g, f), v in self.input_noise.items()],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> SensitivityTable:
        cands = {g: tuple(parse_candidate(c) for c in cs) for g, cs in d["candidates"].items()}
        measured, predicted, relative = {}, {}, {}
        for e in d["entries"]:
            key = (e["group"], parse_candidate(e["candidate"]))
            if e.get("measured_mse") is not None:
                measured[key] = float(e["measured_mse"])
            if e.get("predicted_mse") is not None:
                predicted[key] = float(e["predicted_mse"])
            if e.get("layer_relative_error") is not None:
                relative[key] = float(e["layer_relative_error"])
        f = d.get("fit")
        fit = None if f is None else HessianFit(
            alpha=float(f["alpha"]), log_spread=float(f["log10_spread"]),
            runs=tuple((g, parse_candidate(c)) for g, c in f["runs"]))
        return cls(groups=tuple(d["groups"]), candidates=cands, signal=float(d["signal"]),
                   samples=int(d["samples"]), measured=measured, predicted=predicted,
                   relative=relative, fit=fit, seconds=dict(d.get("seconds", {})),
                   input_noise={(g, f): float(v) for g, f, v in d.get("input_noise", [])})


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v
