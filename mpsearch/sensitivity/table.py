"""The :class:`SensitivityTable`: for every quantizer group and legal candidate, the network
output error when that group alone takes that candidate (docs/design.md §3).

Errors are output MSE (mean over every element of every model output), with the output's mean
square ``signal`` kept alongside, so ``SQNR = 10·log10(signal / mse)``. The measured and the
Hessian-predicted values sit side by side; :meth:`SensitivityTable.error` gives the solver the
measured value where there is one.

Which candidates a group gets (:func:`legal_candidates`): those the profile lists for its op.
Sparse ones (2:4, unstructured, output channels) only when asked for (``sparsity``, default
"none"; channels only where :func:`mpsearch.graph.flow.channel_route` allows): pruning
wins over quantization only at extreme compression (Kuzmin et al. 2023, "Pruning vs
Quantization: Which is Better?"), a device without sparse kernels gains memory only, and each
sparse candidate costs sensitivity time like any other.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from mpsearch.core.formats import Candidate, Format, parse_candidate
from mpsearch.graph.flow import ChannelRefusal, channel_route
from mpsearch.graph.layer_graph import LayerGraph
from mpsearch.hw.cost import CostModel
from mpsearch.quant.prune import sparsity_refusal

__all__ = ["CandidateSet", "HessianFit", "Refusal", "SensitivityTable",
           "SparsityChoice", "candidates_for", "legal_candidates", "sqnr", "unchanged"]

log = logging.getLogger(__name__)

Key = tuple[str, Candidate]


def unchanged(c: Candidate) -> bool:
    """The float candidate: the model as it is (fp16 is not: its weights are rounded)."""
    return c.weight is Format.FLOAT and c.activation is Format.FLOAT


def sqnr(signal: float, mse: float) -> float:
    """SQNR in dB (inf for an exact result, -inf for an infinite error, nan for a nan one)."""
    if math.isnan(mse):
        return math.nan
    if mse <= 0:
        return math.inf
    if math.isinf(mse) or not signal > 0:
        return -math.inf
    return 10.0 * math.log10(signal / mse)


class SparsityChoice(enum.Enum):
    """Which of the profile's sparse candidates the groups may take besides the dense ones."""

    NONE = "none"
    SEMI_STRUCTURED = "2:4"
    UNSTRUCTURED = "unstructured"
    CHANNEL = "channel"
    ALL = "all"

    def admits(self, pattern: str) -> bool:
        """Whether a candidate pruned by ``pattern`` (``Sparsity.pattern``) is offered."""
        return self is SparsityChoice.ALL or self.value == pattern


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """An expected "no": a candidate the profile lists for this group that it does not get."""

    group: str
    candidate: Candidate
    reason: str


@dataclass(frozen=True, kw_only=True)
class CandidateSet:
    """Group -> its candidates, and the sparse candidates left out, with why."""

    by_group: Mapping[str, tuple[Candidate, ...]]
    refused: tuple[Refusal, ...] = ()


def _sparse_reason(lg: LayerGraph, group: str, c: Candidate) -> str | None:
    """Why ``group`` cannot take the sparse candidate ``c`` (None: it can)."""
    if not c.weight.is_quantized:
        return f"pruned {c.weight} weights are not exported (only integer and fp8 ones)"
    if c.sparsity.pattern == "channel":
        route = channel_route(lg, group)
        if isinstance(route, ChannelRefusal):
            return f"its output channels cannot be pruned: {route.reason} (at '{route.node}')"
    return sparsity_refusal(lg.layers[group], c.sparsity)


def legal_candidates(lg: LayerGraph, costs: CostModel, only: tuple[Candidate, ...] | None = None,
                     *, sparsity: SparsityChoice = SparsityChoice.NONE) -> CandidateSet:
    """Group -> the candidates its op may take on the device.

    ``only``: the candidates wanted (None: all the profile lists). ``sparsity``: which of the
    profile's sparse candidates are added (:class:`SparsityChoice`),
    the sparse variants of the dense candidates ``only`` keeps; a sparse candidate named in
    ``only`` is kept whatever ``sparsity`` says. Sparse candidates a layer cannot take (2:4 on a
    depthwise conv or an RGB stem, a weightless MatMul, output channels that meet a residual
    Add, ...) are left out, with the reason."""
    sparsity = SparsityChoice(sparsity)
    out: dict[str, tuple[Candidate, ...]] = {}
    refused: list[Refusal] = []
    for g in lg.group_names:
        kept: list[Candidate] = []
        for c in costs.candidates(g):
            sp = c.sparsity
            if sp is None:
                if only is None or c in only:
                    kept.append(c)
                continue
            dense = Candidate(weight=c.weight, activation=c.activation)
            named = only is not None and c in only
            chosen = sparsity.admits(sp.pattern) and (only is None or dense in only)
            if not (named or chosen):
                continue
            reason = _sparse_reason(lg, g, c)
            if reason is None:
                kept.append(c)
            else:
                refused.append(Refusal(group=g, candidate=c, reason=reason))
        out[g] = tuple(kept)
    if refused:
        log.info("%d sparse (group, candidate) pairs left out, e.g. %s %s: %s", len(refused),
                 refused[0].group, refused[0].candidate, refused[0].reason)
    return CandidateSet(by_group=out, refused=tuple(refused))


def candidates_for(lg: LayerGraph, costs: CostModel,
                   only: tuple[Candidate, ...] | None = None, *,
                   sparsity: SparsityChoice = SparsityChoice.NONE
                   ) -> dict[str, tuple[Candidate, ...]]:
    """Group -> the candidates its op may take on the device (restricted to ``only``; the
    profile's sparse candidates as ``sparsity`` says): :func:`legal_candidates` without the
    refusals."""
    return dict(legal_candidates(lg, costs, only, sparsity=sparsity).by_group)


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

    def finite(self) -> tuple[SensitivityTable, tuple[Refusal, ...]]:
        """This table without the (group, candidate) pairs whose error is not a finite number
        (a format that overflows on the layer's values: fp16 on raw int16-scale audio), and
        those pairs with the reason. A solver cannot weigh them; the other candidates of the
        group stay. A pair the table has no entry for (an older cache) goes too."""
        dropped: list[Refusal] = []
        keep: dict[str, tuple[Candidate, ...]] = {}
        for g in self.groups:
            kept = []
            for c in self.candidates[g]:
                try:
                    e = self.error(g, c)
                except KeyError:
                    dropped.append(Refusal(group=g, candidate=c,
                                           reason="no sensitivity was recorded for it"))
                    continue
                if math.isfinite(e):
                    kept.append(c)
                else:
                    dropped.append(Refusal(group=g, candidate=c, reason=(
                        f"its output error is {e} (the format overflows or saturates on this "
                        "layer's values)")))
            keep[g] = tuple(kept)
        if not dropped:
            return self, ()
        gone = {(r.group, r.candidate) for r in dropped}
        return dataclasses.replace(
            self, candidates=keep,
            measured={k: v for k, v in self.measured.items() if k not in gone},
            predicted={k: v for k, v in self.predicted.items() if k not in gone},
            relative={k: v for k, v in self.relative.items() if k not in gone}), tuple(dropped)

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
