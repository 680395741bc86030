"""mpsearch: hardware-aware mixed-precision quantization search for ONNX models.

Public API; see README.md for an example.
"""

from __future__ import annotations

__version__ = "0.1.0"

from mpsearch.core.errors import (
    DataError,
    ExportError,
    InfeasibleBudgetError,
    ModelError,
    MpsearchError,
    ProfileError,
    UsageError,
)
from mpsearch.core.formats import Candidate, Format, parse_candidate
from mpsearch.data.dataset import Dataset, open_dataset, split
from mpsearch.export.qdq import QdqModel, export_qdq, uniform_plan
from mpsearch.graph.evaluate import EvalResult, evaluate
from mpsearch.graph.layer_graph import LayerGraph, build_layer_graph, load_model
from mpsearch.hw.profile import HardwareProfile, load_profile
from mpsearch.quant.analysis import Analysis, QuantizeOptions, analyze
from mpsearch.quant.layer import Rounding
from mpsearch.sensitivity import Method, SensitivityCache, SensitivityTable
from mpsearch.sensitivity import estimate as estimate_sensitivity

__all__ = [
    "Analysis",
    "Candidate",
    "DataError",
    "Dataset",
    "EvalResult",
    "ExportError",
    "Format",
    "HardwareProfile",
    "InfeasibleBudgetError",
    "LayerGraph",
    "Method",
    "ModelError",
    "MpsearchError",
    "ProfileError",
    "QdqModel",
    "QuantizeOptions",
    "Rounding",
    "SearchResult",
    "SensitivityCache",
    "SensitivityTable",
    "UsageError",
    "VerifyResult",
    "analyze",
    "build_report",
    "build_layer_graph",
    "estimate_sensitivity",
    "evaluate",
    "export_qdq",
    "load_model",
    "load_profile",
    "open_dataset",
    "parse_candidate",
    "search",
    "split",
    "uniform_plan",
    "verify",
]


# The search pulls in cvxpy (about a second to import), the report matplotlib, verification
# the QNN EP: each loaded on first use (PEP 562).
_LAZY = {"search": "mpsearch.job.search", "SearchResult": "mpsearch.job.search",
         "build_report": "mpsearch.report.html",
         "verify": "mpsearch.device.verify", "VerifyResult": "mpsearch.device.verify"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")
