"""mpsearch: hardware-aware mixed-precision quantization search for ONNX models.

The public API (README.md, "Python API", has a runnable example)::

    from mpsearch import SearchConfig, load_profile, search

    res = search("model.onnx", load_profile("hw.yaml"), "calib.npz",
                 SearchConfig(budgets=["bops=0.75"]))
    res.export("model.qdq.onnx")

The whole job is :func:`search` with a :class:`SearchConfig`, returning a :class:`SearchResult`;
the stages it chains are here too: :func:`analyze` (ingest and calibrate once), :func:`quantize`
(any per-group plan as a QDQ model), :func:`estimate_sensitivity`, :func:`evaluate`,
:func:`verify` (compile for Qualcomm's HTP and compare), :func:`build_report`.
"""

from __future__ import annotations

import importlib

from mpsearch.core.version import __version__

__all__ = [
    "Analysis",
    "CandidateConfig",
    "Candidate",
    "DataError",
    "Dataset",
    "EvalResult",
    "ExportError",
    "Format",
    "HardwareProfile",
    "InfeasibleBudgetError",
    "LayerGraph",
    "MeasureConfig",
    "Method",
    "ModelError",
    "MpsearchError",
    "ProfileError",
    "QdqModel",
    "QuantizeOptions",
    "RefinementConfig",
    "Rounding",
    "RunConfig",
    "SearchConfig",
    "SearchData",
    "SearchResult",
    "SensitivityCache",
    "SensitivityTable",
    "UsageError",
    "VerifyResult",
    "__version__",
    "analyze",
    "build_layer_graph",
    "build_report",
    "estimate_sensitivity",
    "evaluate",
    "export_qdq",
    "load_model",
    "load_profile",
    "open_dataset",
    "parse_candidate",
    "quantize",
    "search",
    "split",
    "uniform_plan",
    "verify",
]

# Where each public name lives. Nothing is imported until it is first used (PEP 562): the
# search pulls in cvxpy and pydantic, the report matplotlib, verification the QNN EP, and
# `import mpsearch` stays cheap for a script that needs one of them.
_WHERE = {
    "MpsearchError": "mpsearch.core.errors", "DataError": "mpsearch.core.errors",
    "ExportError": "mpsearch.core.errors", "InfeasibleBudgetError": "mpsearch.core.errors",
    "ModelError": "mpsearch.core.errors", "ProfileError": "mpsearch.core.errors",
    "UsageError": "mpsearch.core.errors",
    "Candidate": "mpsearch.core.formats", "Format": "mpsearch.core.formats",
    "parse_candidate": "mpsearch.core.formats",
    "Dataset": "mpsearch.data.dataset", "open_dataset": "mpsearch.data.dataset",
    "split": "mpsearch.data.dataset",
    "LayerGraph": "mpsearch.graph.layer_graph", "build_layer_graph": "mpsearch.graph.layer_graph",
    "load_model": "mpsearch.graph.ingest",
    "EvalResult": "mpsearch.graph.evaluate", "evaluate": "mpsearch.graph.evaluate",
    "Analysis": "mpsearch.quant.analysis", "QuantizeOptions": "mpsearch.quant.analysis",
    "analyze": "mpsearch.quant.analysis", "Rounding": "mpsearch.quant.layer",
    "HardwareProfile": "mpsearch.hw.profile", "load_profile": "mpsearch.hw.profile",
    "QdqModel": "mpsearch.export.qdq", "export_qdq": "mpsearch.export.qdq",
    "quantize": "mpsearch.export.qdq", "uniform_plan": "mpsearch.export.qdq",
    "Method": "mpsearch.sensitivity.run", "SensitivityCache": "mpsearch.sensitivity.cache",
    "SensitivityTable": "mpsearch.sensitivity.table",
    "SearchConfig": "mpsearch.job.config", "CandidateConfig": "mpsearch.job.config",
    "RefinementConfig": "mpsearch.job.config", "MeasureConfig": "mpsearch.job.config",
    "RunConfig": "mpsearch.job.config",
    "SearchResult": "mpsearch.job.result", "search": "mpsearch.job.search",
    "SearchData": "mpsearch.job.search",
    "verify": "mpsearch.device.verify", "VerifyResult": "mpsearch.device.verify",
    "build_report": "mpsearch.report.html",
}
_RENAMED = {"estimate_sensitivity": ("mpsearch.sensitivity.run", "estimate")}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
