"""What a search returns: every plan it weighed with its costs, its predicted quality and (where
measured) its real one, the baselines beside the chosen plan, and what the search did on the
way (refinement, selection, polish), all frozen."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from mpsearch.core.formats import Candidate
from mpsearch.core.frozen import freeze_fields
from mpsearch.export.qdq import QdqModel, quantize
from mpsearch.graph.control import Specialized
from mpsearch.graph.evaluate import EvalResult
from mpsearch.hw.cost import CostModel, PlanCost
from mpsearch.hw.profile import HardwareProfile
from mpsearch.job.config import SearchConfig
from mpsearch.job.polish import Polish
from mpsearch.job.refinement import Refinement
from mpsearch.job.selection import Selection
from mpsearch.job.target import Step, Target
from mpsearch.quant.analysis import Analysis
from mpsearch.sensitivity.gated import GatedCandidates
from mpsearch.sensitivity.run import Method
from mpsearch.sensitivity.table import Refusal, SensitivityTable
from mpsearch.solve.allocate import Allocation, Built
from mpsearch.solve.budget import Budget
from mpsearch.solve.pareto import Front

__all__ = ["DataRole", "Measured", "PlanResult", "SearchResult"]


class DataRole(enum.Enum):
    """Which data a plan was measured on."""

    EVALUATION = "evaluation"  # held out: never seen by calibration, refinement or selection
    CHECK = "check"  # held out of calibration; the shortlist and the polish chose on it
    FIT = "fit"  # what ranges, rounding and sensitivities were fitted on


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass(frozen=True, kw_only=True)
class Measured:
    """A plan exported and run against FP32."""

    data: DataRole
    result: EvalResult

    @property
    def sqnr_db(self) -> float:
        return self.result.primary.sqnr_db

    @property
    def top1_agreement(self) -> float | None:
        return self.result.primary.top1_agreement

    @property
    def sqnr_ci(self) -> tuple[float, float] | None:
        return self.result.primary.sqnr_ci

    def to_dict(self) -> dict:
        p = self.result.primary
        return {"data": self.data.value, "samples": self.result.samples, "output": p.name,
                "sqnr_db": _num(p.sqnr_db),
                "sqnr_ci_db": [_num(v) for v in p.sqnr_ci] if p.sqnr_ci else None,
                "cosine": _num(p.cosine), "top1_agreement": p.top1_agreement}


@dataclass(frozen=True, kw_only=True)
class PlanResult:
    """One plan with its costs, its predicted quality and (when measured) its real one."""

    name: str
    plan: Mapping[str, Candidate]
    cost: PlanCost
    predicted_mse: float
    predicted_sqnr_db: float
    fits: bool
    measured: Measured | None = None  # on the evaluation data, else the check part, else fit
    figures: tuple[Measured, ...] = ()  # on each of fit, check, evaluation that exists

    def __post_init__(self) -> None:
        freeze_fields(self, "plan")

    def figure(self, role: DataRole) -> Measured | None:
        return next((m for m in self.figures if m.data is role), None)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.plan.values():
            out[c.name] = out.get(c.name, 0) + 1
        return dict(sorted(out.items()))


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """What :func:`mpsearch.job.search.search` found; ``export`` writes the chosen plan's QDQ
    model."""

    config: SearchConfig  # what the search ran with
    analysis: Analysis = field(repr=False)
    profile: HardwareProfile
    costs: CostModel = field(repr=False)
    table: SensitivityTable = field(repr=False)
    built: Built = field(repr=False)
    errors: Mapping[tuple[str, Candidate], float] = field(repr=False)  # what the solver used
    refinement: Refinement
    budgets: tuple[Budget, ...]
    limits: Mapping[str, float]
    chosen: PlanResult
    allocation: Allocation = field(repr=False)
    uniform: tuple[PlanResult, ...]
    greedy: PlanResult | None
    front: Front = field(repr=False)
    front_plans: tuple[PlanResult, ...]
    model_sha256: str
    selection: Selection | None = None  # the shortlist measured on the check part
    polish: Polish | None = None  # the local search from the shortlist's best, if run
    gating: GatedCandidates | None = field(default=None, repr=False)  # --gating's candidates
    # (group, candidate) pairs taken off because their sensitivity is not finite, with why
    dropped: tuple[Refusal, ...] = ()
    specialized: tuple[Specialized, ...] = ()  # If nodes replaced by their branch (--specialize-if)
    # every input's sample axis as the search resolved it on the evaluation (else calibration)
    # data (None: given once); the static device model has no dynamic dim left to infer it from
    sample_axes: Mapping[str, int | None] = field(default_factory=dict)
    chosen_model: QdqModel | None = field(default=None, repr=False)  # chosen's export, if made
    # samples of each part the search used: fit, check (0: none) and evaluation (0: none)
    samples: Mapping[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # what weakens the figures (too little data, no check part)
    # --target: what it asked, and each search of the bisection (mpsearch.job.target); the
    # budgets above then hold the limit it found
    target: Target | None = None
    target_steps: tuple[Step, ...] = ()
    target_effective: Target | None = None  # sqnr_drop as the SQNR it asked for
    seconds: Mapping[str, float] = field(default_factory=dict)  # per stage

    def __post_init__(self) -> None:
        freeze_fields(self, "errors", "limits", "seconds", "sample_axes", "samples")

    @property
    def method(self) -> Method:
        return self.config.method

    @property
    def plan(self) -> Mapping[str, Candidate]:
        return self.chosen.plan

    def qdq(self) -> QdqModel:
        if self.chosen_model is not None:
            return self.chosen_model
        return quantize(self.analysis, self.chosen.plan)

    def export(self, path: str | os.PathLike[str]) -> None:
        onnx.save(self.qdq().model, os.fspath(path))

    def best_uniform(self) -> PlanResult | None:
        """The uniform plan that fits with the best quality (measured where measured)."""
        fits = [u for u in self.uniform if u.fits]
        if not fits:
            return None
        return max(fits, key=lambda u: u.measured.sqnr_db if u.measured else u.predicted_sqnr_db)
