"""What ``mpsearch run`` writes into its folder, file by file, from a :class:`SearchResult`.

``model.qdq.onnx`` (the plan), ``model.float.onnx`` (the float model the side files are keyed
to), ``encodings.json`` and ``ort_overrides.json`` (the plan for Qualcomm's converter and ONNX
Runtime's ``quantize_static``, docs/exports.md; skipped with the reason for plans neither can
carry), ``verify.json`` (Qualcomm profiles: the shipped bytes compiled on the HTP and compared
with the CPU EP), ``plan.json`` and ``plan.csv`` (:mod:`mpsearch.job.document`),
``sensitivity.json``, ``config.yaml`` (the exact :class:`RunConfig`, so the folder alone
reproduces the run) and ``report.html`` with its PNGs (:mod:`mpsearch.report.html`). Every file
goes through one :class:`~mpsearch.data.outputs.OutputDir`: all are written or none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpsearch.core.errors import ExportError, InfeasibleBudgetError, InternalError, UsageError
from mpsearch.core.formats import Format
from mpsearch.core.frozen import freeze_fields
from mpsearch.data.outputs import OutputDir
from mpsearch.data.synthetic import synthetic_inputs
from mpsearch.device.localize import localize
from mpsearch.device.qnn import qnn_available
from mpsearch.device.verify import (
    MIN_SQNR_DB,
    ChildCrashed,
    in_child,
    json_number,
    static_model,
    verify_in_child,
)
from mpsearch.export.encodings import encodings_document
from mpsearch.export.overrides import ort_overrides
from mpsearch.export.qdq import QdqModel
from mpsearch.graph.flow import format_setters, layers_reached
from mpsearch.graph.ingest import load_model
from mpsearch.job.config import RunConfig, to_yaml
from mpsearch.job.document import plan_document, plan_frame
from mpsearch.job.result import SearchResult
from mpsearch.job.search import Progress, SearchData, search
from mpsearch.report.html import REPORT_OUTPUTS, draw_figures, write_report
from mpsearch.sensitivity.document import sensitivity_document
from mpsearch.sensitivity.table import SensitivityTable

__all__ = ["RUN_OUTPUTS", "ExportFiles", "Replan", "RunFolder", "Shipped", "VerifySummary",
           "run_job", "write_run_folder"]

SYNTHETIC = "synthetic_data.npz"  # a data-free run's inputs
RUN_OUTPUTS = (SYNTHETIC, "model.qdq.onnx", "model.qdq.dynamic.onnx", "model.float.onnx",
               "encodings.json", "ort_overrides.json",
               "plan.json", "plan.csv", "sensitivity.json", "verify.json", "config.yaml",
               "report.html", "pareto.png", "allocation.png", "sensitivity.png")
QNN_TARGET = "qnn-htp"


@dataclass(frozen=True, kw_only=True)
class Shipped:
    """``model.qdq.onnx`` as written: static where the target needs it, and its digest."""

    sha256: str
    shapes_fixed: tuple[str, ...] = ()  # "input:axis symbol -> size", as the device takes it
    dynamic: str | None = None  # the same plan with the model's dynamic dims, for ORT CPU

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "static_shapes": list(self.shapes_fixed),
                "dynamic_model": self.dynamic}


@dataclass(frozen=True, kw_only=True)
class ExportFiles:
    """The files a run wrote for the plan (``plan.json`` ``exports``)."""

    encodings: str | None  # None: skipped, ``skipped`` says why
    ort_overrides: str | None
    skipped: str | None = None
    kept_channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # +channel@d
    shipped: Shipped | None = None

    def __post_init__(self) -> None:
        freeze_fields(self, "kept_channels")

    def to_dict(self) -> dict:
        doc: dict = {"model": "model.qdq.onnx", "float_model": "model.float.onnx"}
        if self.shipped is not None:
            doc |= self.shipped.to_dict()
        if self.kept_channels:  # physically smaller (export/qdq.py, export/channels.py)
            doc["channel_pruning"] = {
                "exported": "smaller",
                "note": "channel-pruned layers are exported physically smaller: their pruned "
                        "output channels (rows, bias, per-channel scales) removed, with the "
                        "same channels of the depthwise convs and per-channel constants on "
                        "their route and their consumers' input columns",
                "kept": {g: list(k) for g, k in self.kept_channels.items()}}
        doc["encodings"], doc["ort_overrides"] = self.encodings, self.ort_overrides
        if self.skipped is not None:
            doc["skipped"] = self.skipped
        return doc


@dataclass(frozen=True, kw_only=True)
class Replan:
    """One search done again because the device disagreed with the CPU EP: the culprit the
    earlier plan's verification named, its worst output, and the activation format taken off
    the layers that set the culprit's format (``search.candidates.avoid``)."""

    culprit: str
    sqnr_db: float | None  # the earlier plan's worst output, HTP against the CPU EP
    avoided: Mapping[str, str]  # layer -> the activation format it may no longer take
    outcome: str | None = None  # why the search again did not give a plan (None: it did)
    after_db: float | None = None  # the re-planned plan's worst output, HTP against the CPU EP

    def __post_init__(self) -> None:
        freeze_fields(self, "avoided")

    def to_dict(self) -> dict:
        return {"culprit": self.culprit, "sqnr_db": self.sqnr_db,
                "avoided": dict(self.avoided), "outcome": self.outcome,
                "after_db": self.after_db}


@dataclass(frozen=True, kw_only=True)
class VerifySummary:
    """The device check of the shipped model (``plan.json`` ``verification``)."""

    target: str
    skipped: str | None = None  # why it did not run (then nothing below is known)
    soc_model: int | None = None
    compiled: bool = False
    fully_on_target: bool = False
    nodes_on_target: int = 0
    nodes: int = 0
    sqnr_db: float | None = None  # HTP against the CPU EP, worst output
    min_sqnr_db: float = MIN_SQNR_DB  # what every output had to reach
    disagreeing: tuple[str, ...] = ()  # the outputs below it
    culprit: str | None = None  # where the disagreement enters (mpsearch.device.localize)
    # the tensors it names (the probe, the float tensor quantized) and its activation format
    culprit_tensors: tuple[str, ...] = ()
    culprit_format: str | None = None
    replans: tuple[Replan, ...] = ()  # the re-plans tried, and what each changed
    shipped_round: int = 1  # which plan was shipped (1: the first search's)
    samples: int = 0
    shapes_fixed: tuple = ()  # the dims fixed in the shipped file (plan.json exports too)
    sha256: str | None = None  # of the file compiled: the shipped model.qdq.onnx
    reasons: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        """The compiler refused part of the plan (a skipped check did not fail)."""
        return self.skipped is None and not self.fully_on_target

    @property
    def disagrees(self) -> bool:
        """It compiled whole, but the device computes something else than the CPU EP."""
        return self.skipped is None and self.fully_on_target and bool(self.disagreeing or
                                                                      self.sqnr_db is None)

    @property
    def verified(self) -> bool:
        return self.skipped is None and not self.failed and not self.disagrees

    def to_dict(self) -> dict:
        if self.skipped is not None:
            return {"target": self.target, "skipped": self.skipped}
        return {"file": "verify.json", "target": self.target, "soc_model": self.soc_model,
                "compiled": self.compiled, "fully_on_target": self.fully_on_target,
                "nodes_on_target": self.nodes_on_target, "nodes": self.nodes,
                "sqnr_db": json_number(self.sqnr_db), "min_sqnr_db": self.min_sqnr_db,
                "verified": self.verified, "disagreeing": list(self.disagreeing),
                "culprit": self.culprit, "replans": [r.to_dict() for r in self.replans],
                "shipped_round": self.shipped_round,
                "samples": self.samples,
                "shapes_fixed": list(self.shapes_fixed), "sha256": self.sha256,
                "reasons": list(self.reasons)}


@dataclass(frozen=True, kw_only=True)
class RunFolder:
    """What a run wrote: the plan document and the two summaries within it."""

    plan: Mapping  # plan.json as written
    exports: ExportFiles
    verification: VerifySummary | None  # None: not a Qualcomm profile, or --no-verify


def ship_model(out: OutputDir, res: SearchResult, qm: QdqModel, cfg: RunConfig) -> Shipped:
    """``model.qdq.onnx``, the file the device runs. A target that needs static shapes (QNN's
    HTP refuses a dynamic batch with CPU fallback off) gets every dynamic input dim fixed here
    (``--input-shape``, else batch 1 and the data's sizes), and the verification checks these
    very bytes; the plan with the model's own dynamic dims goes beside it as
    ``model.qdq.dynamic.onnx``, for runtimes that take them."""
    if res.profile.runtime != QNN_TARGET:
        path = out.write_model("model.qdq.onnx", qm.model)
        return Shipped(sha256=_sha256(path))
    model, fixed = static_model(qm.model, data=cfg.eval_data or cfg.data,
                                input_shapes=dict(cfg.verification.input_shapes) or None,
                                sample_axes=dict(res.sample_axes))
    path = out.write_model("model.qdq.onnx", model)
    dynamic = None
    if fixed:
        dynamic = "model.qdq.dynamic.onnx"
        out.write_model(dynamic, qm.model)
    return Shipped(sha256=_sha256(path), shapes_fixed=tuple(f.describe() for f in fixed),
                   dynamic=dynamic)


def _rounded(db: float | None) -> float | None:
    """A dB figure as verify.json states it (6 decimals); an exact agreement stays inf."""
    return db if db is None or not math.isfinite(db) else round(float(db), 6)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_exports(out: OutputDir, res: SearchResult, qm: QdqModel, shipped: Shipped
                  ) -> ExportFiles:
    """The float model the plan quantizes and the plan for QNN's converter and ORT's
    quantize_static (docs/exports.md). A plan neither format can carry (fp8, pruned weights)
    skips both files, with the reason recorded in plan.json."""
    out.write_model("model.float.onnx", res.analysis.graph.model)
    kept = dict(qm.kept_channels)
    pruned = sorted(g for g, c in res.plan.items() if c.sparsity is not None)
    if pruned:  # both files are keyed to the dense float model: they would undo the pruning
        why = (f"the plan prunes {len(pruned)} layer(s) (e.g. {pruned[0]}): encodings and ORT "
               "overrides apply to model.float.onnx's dense weights and would not reproduce "
               "the pruning; ship model.qdq.onnx")
        return ExportFiles(encodings=None, ort_overrides=None, kept_channels=kept,
                           shipped=shipped, skipped=why)
    try:
        enc, ov = encodings_document(qm), ort_overrides(qm)
    except ExportError as e:
        return ExportFiles(encodings=None, ort_overrides=None, kept_channels=kept,
                           shipped=shipped, skipped=e.problem)
    out.write_json("encodings.json", enc)
    out.write_json("ort_overrides.json", ov)
    return ExportFiles(encodings="encodings.json", ort_overrides="ort_overrides.json",
                       kept_channels=kept, shipped=shipped)


def verify_on_device(out: OutputDir, res: SearchResult, shipped: Shipped, cfg: RunConfig, *,
                     progress: Progress, note: Callable[[str], None]
                     ) -> tuple[VerifySummary | None, dict | None]:
    """On a Qualcomm profile: compile the shipped ``model.qdq.onnx`` itself on QNN's HTP
    (emulated) and compare it with the CPU EP; the summary and verify.json's document (no
    timings, so the same inputs give the same bytes; the caller writes it). (None, None) for
    other profiles or with verification off."""
    prof = res.profile
    if prof.runtime != QNN_TARGET or not cfg.verification.enabled:
        return None, None
    if not qnn_available():
        note("QNN's execution provider is not available here (onnxruntime-qnn: x86-64 "
             "Linux and Windows): the plan was not compiled for the HTP")
        return VerifySummary(target=QNN_TARGET,
                             skipped="onnxruntime-qnn is not available here"), None
    data = cfg.eval_data or cfg.data
    samples = cfg.verification.samples
    axes = dict(res.sample_axes)
    with progress(f"verifying on {QNN_TARGET} soc {prof.soc_model} (emulated, {samples} "
                  "samples)", None):
        threshold = cfg.verification.min_sqnr_db
        if threshold is None:
            threshold = prof.verify_min_sqnr_db if prof.verify_min_sqnr_db is not None \
                else MIN_SQNR_DB
        result = verify_in_child(out.path / "model.qdq.onnx", data=data, target=QNN_TARGET,
                                 soc_model=prof.soc_model, samples=samples,
                                 min_sqnr_db=threshold, sample_axes=axes)
    if result.model_sha256 != shipped.sha256 or result.shapes_fixed:  # pragma: no cover
        raise InternalError("the verification did not check the shipped model.qdq.onnx as it "
                            "is: this is a bug in mpsearch")
    culprit = None
    if result.fully_on_target and not result.agrees:
        with progress("finding where the HTP departs from the CPU", None):
            try:
                culprit = in_child(localize, out.path / "model.qdq.onnx", data=data,
                                   soc_model=prof.soc_model, min_sqnr_db=result.min_sqnr_db,
                                   sample_axes=axes)
            except ChildCrashed:
                note("the QNN EP crashed compiling the probe model: no culprit named")
    doc = result.to_dict()
    doc["culprit"] = culprit.to_dict() if culprit is not None else None
    doc.pop("seconds", None)
    doc.pop("compile_seconds", None)
    doc["model"]["path"] = "model.qdq.onnx"
    doc["data"] = str(data)
    return VerifySummary(target=QNN_TARGET, soc_model=prof.soc_model, compiled=result.compiled,
                         fully_on_target=result.fully_on_target,
                         nodes_on_target=result.nodes.on_target, nodes=result.nodes.total,
                         sqnr_db=_rounded(result.sqnr_db), samples=result.samples,
                         min_sqnr_db=result.min_sqnr_db,
                         disagreeing=tuple(o.name for o in result.disagreeing),
                         culprit=culprit.describe() if culprit is not None else None,
                         culprit_tensors=(culprit.tensor, culprit.source) if culprit else (),
                         culprit_format=culprit.activation_format if culprit else None,
                         shapes_fixed=shipped.shapes_fixed, sha256=result.model_sha256,
                         reasons=tuple(result.reasons)), doc


# a re-plan that does not raise the worst output's agreement by this much ends the re-plans:
# the disagreement is then not the format's (rounding differences spread over many ops)
REPLAN_GAIN_DB = 1.0


@dataclass(frozen=True, kw_only=True)
class _Round:
    res: SearchResult
    cfg: RunConfig
    qm: QdqModel
    shipped: Shipped
    verified: VerifySummary | None
    doc: dict | None
    figures: Mapping[str, bytes]

    @property
    def agreement(self) -> tuple[bool, float]:
        v = self.verified
        if v is None or v.skipped is not None:
            return True, math.inf
        return v.verified, v.sqnr_db if v.sqnr_db is not None else -math.inf


def run_job(cfg: RunConfig, out: OutputDir, *, progress: Progress,
            note: Callable[[str], None]) -> tuple[SearchResult, RunFolder, RunConfig]:
    """``mpsearch run``: the search, the shipped model and its verification, and, while the
    device disagrees with the CPU EP and ``cfg.verification.replans`` allows, the search again
    with the culprit's activation format taken off the layers that set it (a format the
    device computes wrongly there), verified again, for as long as each re-plan raises the
    agreement by ``REPLAN_GAIN_DB``. The plan that agrees best is shipped, with every other
    file. Returns its search, the folder, and the config that reproduces it (its
    ``search.candidates.avoid`` holds what the re-plans took off, and goes to config.yaml)."""
    replans: list[Replan] = []
    rounds: list[_Round] = []
    if cfg.data is None:
        cfg = _synthesize(cfg, out)
    res = _search(cfg, progress)
    while True:
        qm = res.qdq()
        shipped = ship_model(out, res, qm, cfg)
        verified, doc, figures = _verify_and_draw(out, res, shipped, cfg, progress=progress,
                                                  note=note)
        rounds.append(_Round(res=res, cfg=cfg, qm=qm, shipped=shipped, verified=verified,
                             doc=doc, figures=figures))
        if replans:
            replans[-1] = dataclasses.replace(replans[-1], after_db=verified.sqnr_db)
            before = rounds[-2].agreement[1]
            if not verified.verified and not rounds[-1].agreement[1] >= before + REPLAN_GAIN_DB:
                note(f"the re-plan did not raise the agreement by {REPLAN_GAIN_DB:g} dB "
                     f"({before} -> {verified.sqnr_db} dB): no more re-plans")
                break
        step = _replan_step(res, cfg, verified, len(replans))
        if step is None:
            break
        nxt, replan = step
        note(f"re-planning ({len(replans) + 1} of {cfg.verification.replans}): "
             f"{verified.culprit}; {len(replan.avoided)} layer(s) no longer take "
             f"{verified.culprit_format} activations ({', '.join(list(replan.avoided)[:3])})")
        try:
            again = _search(nxt, progress)
        except (UsageError, InfeasibleBudgetError) as e:
            replans.append(dataclasses.replace(replan, outcome=e.problem))
            note(f"no plan without those formats: {e.problem}; the earlier plan stays")
            break
        replans.append(replan)
        res, cfg = again, nxt
    best = max(rounds, key=lambda r: r.agreement)  # the first of equals: fewest changes
    if best is not rounds[-1]:
        note(f"shipping the plan of round {rounds.index(best) + 1}, which agrees best "
             f"({best.agreement[1]} dB)")
        ship_model(out, best.res, best.qm, best.cfg)  # the same bytes as when it was verified
    verified = best.verified
    if best.doc is not None:
        if replans:
            verified = dataclasses.replace(verified, replans=tuple(replans),
                                           shipped_round=rounds.index(best) + 1)
        out.write_json("verify.json", best.doc | {
            "replans": [r.to_dict() for r in replans],
            "shipped_round": rounds.index(best) + 1, "rounds": len(rounds)})
    return best.res, write_run_folder(best.res, best.cfg, out, qm=best.qm,
                                      shipped=best.shipped, verified=verified,
                                      figures=best.figures), best.cfg


def _verify_and_draw(out: OutputDir, res: SearchResult, shipped: Shipped, cfg: RunConfig, *,
                     progress: Progress, note: Callable[[str], None]
                     ) -> tuple[VerifySummary | None, dict | None, dict[str, bytes]]:
    """:func:`verify_on_device` on a second thread, which mostly waits for the child process
    that compiles and emulates the model, while this one draws the report's figures (they do
    not depend on the verification): 2 s of the demo's 3.4 s check."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:
        job = pool.submit(verify_on_device, out, res, shipped, cfg, progress=progress, note=note)
        try:
            figures = _figures(res, cfg)
        except BaseException:
            job.cancel()
            raise
        verified, doc = job.result()
    return verified, doc, figures


def _figures(res: SearchResult, cfg: RunConfig) -> dict[str, bytes]:
    """The PNGs :func:`write_report` would draw from the finished folder: the same documents,
    through the same JSON, as it reads them back."""
    plan = json.loads(json.dumps(plan_document(res, model=cfg.model, profile=cfg.hw)))
    sens = json.loads(json.dumps(_sensitivity(res, cfg)))
    return draw_figures(plan, SensitivityTable.from_dict(sens), sens.get("method"))


def _sensitivity(res: SearchResult, cfg: RunConfig) -> dict:
    return sensitivity_document(res.table, model=cfg.model, profile=cfg.hw, data=cfg.data,
                                method=res.method, timings=False)


def _synthesize(cfg: RunConfig, out: OutputDir) -> RunConfig:
    """A data-free run: random inputs of the declared shapes (:mod:`mpsearch.data.synthetic`)
    written to ``OUT/synthetic_data.npz``, which the run (and its config.yaml) then uses."""
    arrays = synthetic_inputs(load_model(cfg.model), seed=cfg.search.seed,
                              shapes=cfg.verification.input_shapes,
                              sample_axes=cfg.sample_axes)
    def write(p: str) -> None:
        with open(p, "wb") as f:  # a file object: savez would add ".npz" to a path
            np.savez(f, **arrays)

    path = out.write_with(SYNTHETIC, write)
    return dataclasses.replace(cfg, data=str(path))


def _search(cfg: RunConfig, progress: Progress) -> SearchResult:
    synthetic = Path(str(cfg.data)).name == SYNTHETIC
    return search(cfg.model, cfg.hw, SearchData(calibration=cfg.data, evaluation=cfg.eval_data,
                                                sample_axes=cfg.sample_axes,
                                                synthetic=synthetic, preprocess=cfg.preprocess),
                  cfg.search, progress=progress)


def _replan_step(res: SearchResult, cfg: RunConfig, verified: VerifySummary | None,
                 done: int) -> tuple[RunConfig, Replan] | None:
    """The config of the next search, and what it changes, when the device disagreed, its
    culprit is a quantized tensor of this graph in a format some of its setters could give
    up, and re-plans are left; None otherwise."""
    if (verified is None or not verified.disagrees or done >= cfg.verification.replans
            or not verified.culprit_tensors or verified.culprit_format in (None, "float")):
        return None
    lg = res.analysis.graph
    # the probe keeps the model's name for a tensor its producer quantizes; for a graph input
    # or a conversion, the tensor its QuantizeLinear reads does
    tensor = next((t for t in verified.culprit_tensors if t in lg.activations), None)
    if tensor is None:
        return None
    fmt = Format.from_name(verified.culprit_format)
    cc = cfg.search.candidates
    avoid = {g: tuple(fs) for g, fs in cc.avoid.items()}
    changed = {}
    setters = [g for g in format_setters(lg, tensor) if res.chosen.plan[g].activation is fmt]
    if not setters:  # a conversion: the consumers that take the tensor in ``fmt`` set it
        setters = [g for g in layers_reached(lg, tensor) if res.chosen.plan[g].activation is fmt]
    for g in setters:
        if fmt not in avoid.get(g, ()):
            avoid[g] = (*avoid.get(g, ()), fmt)
            changed[g] = str(fmt)
    if not changed:
        return None
    search_cfg = dataclasses.replace(cfg.search, candidates=dataclasses.replace(cc, avoid=avoid))
    return (dataclasses.replace(cfg, search=search_cfg),
            Replan(culprit=verified.culprit or tensor,
                   sqnr_db=verified.sqnr_db, avoided=changed))


def write_run_folder(res: SearchResult, cfg: RunConfig, out: OutputDir, *, qm: QdqModel,
                     shipped: Shipped, verified: VerifySummary | None,
                     figures: Mapping[str, bytes] | None = None) -> RunFolder:
    """Every file of the run besides the shipped model and verify.json (written by
    :func:`run_job`) into ``out`` (declared with :data:`RUN_OUTPUTS`); the caller rolls
    ``out`` back if this raises. ``figures``: the report's PNGs, already drawn for this
    plan (:func:`_figures`)."""
    exports = write_exports(out, res, qm, shipped)
    doc = plan_document(res, model=cfg.model, profile=cfg.hw,
                        extra={"exports": exports.to_dict(),
                               "verification": verified.to_dict() if verified else None})
    out.write_json("plan.json", doc)
    out.write_with("plan.csv", lambda p: plan_frame(res).to_csv(p, index=False))
    out.write_json("sensitivity.json", _sensitivity(res, cfg))
    text = to_yaml(cfg, relative_to=out.path)
    out.write_with("config.yaml", lambda p: Path(p).write_text(text, encoding="utf-8"))
    # an earlier run's verify.json or dynamic model must not pass for this run's
    out.remove_unwritten(still_to_come=REPORT_OUTPUTS)
    write_report(out.path, out, images=figures)  # and pareto.png, allocation.png, sensitivity.png
    return RunFolder(plan=doc, exports=exports, verification=verified)
