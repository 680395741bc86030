"""``mpsearch run``: the whole job (calibrate, sensitivity, exact search under the budgets,
export, measure) and ``mpsearch pareto``: the front alone."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mpsearch.core.errors import UsageError
from mpsearch.job.polish import EVALUATIONS as POLISH_EVALUATIONS
from mpsearch.job.refinement import EXPLORE

RUN_OUTPUTS = ("model.qdq.onnx", "model.float.onnx", "encodings.json", "ort_overrides.json",
               "plan.json", "plan.csv", "sensitivity.json", "verify.json", "report.html",
               "pareto.png", "allocation.png", "sensitivity.png")
PARETO_OUTPUTS = ("pareto.json", "pareto.csv", "pareto.png")


def _shared(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="FP32 ONNX model file (not modified)")
    s.add_argument("--hw", required=True, metavar="PROFILE",
                   help="hardware profile YAML: legal formats per op and the cost model")
    s.add_argument("--data", required=True, metavar="CALIB",
                   help="calibration data: .npz (keys = input names, axis 0 = samples), or a "
                        "folder of .npz/.npy")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--method", choices=["hessian", "measured"], default="hessian",
                   help="sensitivities: hessian (default; predicted from the layer Hessians, "
                        "seconds) or measured (every group and candidate run for real, "
                        "minutes)")
    s.add_argument("--candidates", metavar="LIST",
                   help="comma-separated subset of the profile's candidates, e.g. "
                        "w8a8,w4a8,w8a16 (default: all the profile allows per op)")
    s.add_argument("--sparsity", choices=["none", "2:4", "unstructured", "channel", "all"],
                   default="none",
                   help="also offer the profile's pruned candidates of this pattern (weights "
                        "pruned by OBS with the layer Hessian, survivors quantized; channel: "
                        "whole output channels by Hessian energy, where no residual or output "
                        "needs them, exported physically smaller). Default "
                        "none: at equal compression quantization usually beats pruning "
                        "(Kuzmin et al. 2023), sparsity pays only on devices with sparse "
                        "kernels or where memory is the budget, and every sparse candidate "
                        "costs sensitivity time")
    s.add_argument("--gating", nargs="?", const="gates", choices=["gates", "exact"],
                   metavar="gates|exact",
                   help="also offer, per layer whose output channels can be pruned (the "
                        "profile lists +channel pairs for its op), the bit-width and channel "
                        "count of a Bayesian-Bits gate sweep on the layer Hessian (gates, the "
                        "default when given bare), or of the exact minimiser of the same "
                        "objective (exact, faster); they are scored and solved like any "
                        "candidate. Off by default: it pays only where pruning channels pays "
                        "on the device and budget, and costs sensitivity time")
    s.add_argument("--pin", action="append", default=[], metavar="NODE=CANDIDATE",
                   help="force a layer to a candidate, e.g. --pin node_Conv_0=w8a16 "
                        "(repeatable)")
    s.add_argument("--keep-float", action="append", default=[], metavar="NODE",
                   help="leave a layer in float (repeatable; the profile must cost float)")
    s.add_argument("--convert-penalty", type=float, default=0.0, metavar="X",
                   help="error charged per format conversion between adjacent layers, as a "
                        "fraction of the all-w8a8 plan's predicted error (default 0: "
                        "conversions cost only their latency)")
    s.add_argument("--refine", type=int, default=3, metavar="N",
                   help="rounds of measuring the pairs the plan departs from w8a8 on and "
                        "solving again (default 3; 0 trusts the predicted sensitivities)")
    s.add_argument("--explore", type=float, default=EXPLORE, metavar="X",
                   help="each refinement round also measures where the plan would depart if "
                        "every unmeasured alternative were X times less harmful than "
                        f"predicted (default {EXPLORE:g}; 1 measures only the plan's own "
                        "departures)")
    s.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes for measured sensitivities (default 1)")
    s.add_argument("--cache-dir", metavar="DIR",
                   help="sensitivity cache (default $XDG_CACHE_HOME/mpsearch or "
                        "~/.cache/mpsearch)")
    s.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    s.add_argument("--batch-size", type=int, default=None,
                   help="samples per ONNX Runtime call (default 8)")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "run", parents=[common],
        help="find the most accurate plan within a budget, export and measure it",
        description="Calibrate once, score every (layer, format) candidate the profile "
                    "allows, solve for the least predicted error under every --budget "
                    "exactly (integer program, HiGHS), export the plan as a QDQ ONNX model and "
                    "measure it against FP32, next to the best uniform plan and AIMET AMP's "
                    "greedy walk on the same costs. On a Qualcomm profile the plan is compiled "
                    "on QNN's HTP backend (emulated) and compared with the CPU EP. Writes "
                    "OUT/report.html (open it first), OUT/model.qdq.onnx, OUT/encodings.json "
                    "(QNN converter), OUT/ort_overrides.json (ORT quantize_static), "
                    "OUT/plan.json (documented in the README), OUT/plan.csv, "
                    "OUT/sensitivity.json, OUT/verify.json and the report's PNGs. Exit code 1 "
                    "when the device compiler refuses part of the plan.")
    _shared(s)
    s.add_argument("--budget", action="append", required=True, metavar="KEY=VALUE",
                   help="a hard limit (repeatable): latency=0.7 (x all-w8a8), latency_ms=1.2, "
                        "bops=0.9 (x w8a8), size=0.6 (x w8a8 weight bytes), size_mb=4, "
                        "energy=0.8 (x w8a8), energy_mj=0.5; the first one is the front's "
                        "axis")
    s.add_argument("--eval-data", metavar="EVAL",
                   help="where plans are measured (default: the calibration data)")
    s.add_argument("--front-points", type=int, default=2, metavar="N",
                   help="front points exported and measured besides the plan, those nearest "
                        "the budget (default 2)")
    s.add_argument("--no-measure", action="store_true",
                   help="export the plan without running any evaluation")
    s.add_argument("--no-verify", action="store_true",
                   help="on a Qualcomm (qnn-htp) profile, skip compiling the plan on QNN's HTP "
                        "backend (emulated) and comparing it with the CPU EP")
    s.add_argument("--verify-samples", type=int, default=4, metavar="N",
                   help="samples of the evaluation data run on the emulated HTP (default 4; "
                        "emulation is slow: about 0.6 s a sample on EfficientNet-Lite0, after "
                        "a 4 s compile)")
    s.add_argument("--input-shape", action="append", metavar="NAME=D,D,...",
                   help="static input shape for the device compiler, e.g. "
                        "input=1,3,224,224 (repeatable; default: dynamic dimensions fixed to "
                        "batch 1 and the data's sizes; the report says which)")
    s.add_argument("--no-select", action="store_true",
                   help="ship the ILP's plan as it is, instead of the best measured on the "
                        "calibration data of a shortlist of plans that fit (the ILP's of "
                        "every refinement round, greedy's, "
                        "the best uniform one)")
    s.add_argument("--polish", type=int, default=POLISH_EVALUATIONS, metavar="N",
                   help="after the shortlist, measure at most N neighbouring plans that fit "
                        "(one layer raised, or one raised and one lowered, best predicted "
                        "first) on the calibration data and keep each that measures better "
                        f"(default {POLISH_EVALUATIONS}, 0.4-1.2 s each on "
                        "EfficientNet-Lite0; 0: none)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "pareto", parents=[common],
        help="the Pareto front of quality against one cost, without choosing a plan",
        description="Like run, but writes only the front over --metric: OUT/pareto.json, "
                    "OUT/pareto.csv and OUT/pareto.png; --front-points of it are measured.")
    _shared(s)
    s.add_argument("--metric", choices=["latency", "bops", "size", "energy"],
                   default="latency", help="the cost axis (default latency)")
    s.add_argument("--eval-data", metavar="EVAL", help="where front points are measured")
    s.add_argument("--front-points", type=int, default=6, metavar="N",
                   help="front points exported and measured (default 6)")
    s.set_defaults(func=cmd_pareto)


def _pins(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        node, sep, cand = item.partition("=")
        if not sep or not node or not cand:
            raise UsageError(f"--pin {item} is not NODE=CANDIDATE",
                             fix="write e.g. --pin node_Conv_0=w8a16")
        out[node] = cand
    return out


def _search(args: argparse.Namespace, ui: Any, budget, *, measure: bool):
    from mpsearch.job.search import search
    from mpsearch.quant.analysis import QuantizeOptions

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers} is not a positive number",
                         fix="pass --workers 1 or more")
    if args.refine < 0:
        raise UsageError(f"--refine {args.refine} is negative", fix="pass 0 or more")
    if not args.explore >= 1:
        raise UsageError(f"--explore {args.explore} is below 1", fix="pass 1 (off) or more")
    if getattr(args, "polish", 0) < 0:
        raise UsageError(f"--polish {args.polish} is negative", fix="pass 0 or more")
    if args.front_points < 0:
        raise UsageError(f"--front-points {args.front_points} is negative", fix="pass 0 or more")
    cands = None
    if args.candidates:
        cands = [c.strip() for c in args.candidates.split(",") if c.strip()]
    opts = QuantizeOptions(batch_size=args.batch_size or QuantizeOptions.batch_size)
    return search(args.model, args.hw, args.data, budget=budget, eval_data=args.eval_data,
                  method=args.method, candidates=cands, sparsity=args.sparsity,
                  gating=getattr(args, "gating", None), pin=_pins(args.pin),
                  keep_float=args.keep_float, convert_penalty=args.convert_penalty,
                  front_points=args.front_points, measure=measure, seed=args.seed,
                  refine=args.refine, explore=args.explore,
                  select=not getattr(args, "no_select", True),
                  polish=getattr(args, "polish", 0),
                  options=opts, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                  workers=args.workers, progress=ui.progress)


def cmd_run(args: argparse.Namespace, ui: Any) -> int:
    from mpsearch.cli.main import _parse_shapes
    from mpsearch.cli.sensitivity import sensitivity_document
    from mpsearch.data.outputs import OutputDir
    from mpsearch.job.document import plan_document, plan_frame
    from mpsearch.report.html import write_report

    if args.verify_samples < 1:  # checked before the long search
        raise UsageError(f"--verify-samples {args.verify_samples} is not a positive number",
                         fix="pass 1 or more, or --no-verify")
    _parse_shapes(args.input_shape)
    inputs = [args.model, args.data, args.hw] + ([args.eval_data] if args.eval_data else [])
    out = OutputDir(args.out, inputs=inputs, names=list(RUN_OUTPUTS), flag="--out")
    try:
        t0 = time.perf_counter()
        res = _search(args, ui, args.budget, measure=not args.no_measure)
        qm = res.qdq()
        out.write_model("model.qdq.onnx", qm.model)
        exports = _write_exports(out, res, qm)
        verified = _verify(args, ui, out, res, qm)
        doc = plan_document(res, model=str(args.model), profile=str(args.hw),
                            extra={"exports": exports, "verification": verified})
        out.write_json("plan.json", doc)
        out.write_with("plan.csv", lambda p: plan_frame(res).to_csv(p, index=False))
        out.write_json("sensitivity.json", sensitivity_document(
            res.table, model=args.model, profile=args.hw, data=args.data, method=res.method,
            timings=False))
        write_report(out.path, out)  # also draws pareto.png, allocation.png, sensitivity.png
        seconds = round(time.perf_counter() - t0, 2)
    except BaseException:
        out.rollback()
        raise
    failed = verified is not None and verified.get("fully_on_target") is False
    if ui.as_json:
        print(json.dumps({"out": str(out.path), "seconds": seconds, "totals": doc["totals"],
                          "quality": doc["quality"], "verification": verified,
                          "formats": res.chosen.counts()}, indent=2))
        return 1 if failed else 0
    _summary(ui, res, out.path, seconds, exports=doc.get("exports") or {})
    if verified is not None:
        if failed:
            ui.err.print(f"[bold red]the plan does not run entirely on {verified['target']}"
                         f"[/]: " + "; ".join(verified["reasons"][:3] or ["see report.html"]))
        elif "skipped" not in verified:
            ui.out.print(f"verified on {verified['target']} (soc {verified['soc_model']}, "
                         f"emulated): every node on the HTP, {verified['sqnr_db']} dB against "
                         f"the CPU EP on {verified['samples']} samples")
    return 1 if failed else 0


def _verify(args: argparse.Namespace, ui: Any, out: Any, res, qm) -> dict | None:
    """On a Qualcomm profile: compile the plan on QNN's HTP (emulated), compare with the CPU
    EP, write verify.json (no timings, so the same inputs give the same bytes) and return its
    summary for plan.json; None for other profiles or with --no-verify."""
    from mpsearch.cli.main import _parse_shapes
    from mpsearch.device.qnn import qnn_available
    from mpsearch.device.verify import verify

    prof = res.profile
    if prof.runtime != "qnn-htp" or args.no_verify:
        return None
    target = "qnn-htp"
    if not qnn_available():
        ui.note("QNN's execution provider is not available here (onnxruntime-qnn: x86-64 "
                "Linux and Windows): the plan was not compiled for the HTP")
        return {"target": target, "skipped": "onnxruntime-qnn is not available here"}
    data = args.eval_data or args.data
    with ui.progress(f"verifying on {target} soc {prof.soc_model} (emulated)",
                     args.verify_samples) as advance:
        result = verify(qm.model, data=data, target=target, soc_model=prof.soc_model,
                        input_shapes=_parse_shapes(args.input_shape),
                        samples=args.verify_samples, progress=advance)
    doc = result.to_dict()
    doc.pop("seconds", None)
    doc.pop("compile_seconds", None)
    doc["model"]["path"] = "model.qdq.onnx"
    doc["data"] = str(data)
    out.write_json("verify.json", doc)
    return {"file": "verify.json", "target": target, "soc_model": prof.soc_model,
            "compiled": result.compiled, "fully_on_target": result.fully_on_target,
            "nodes_on_target": result.nodes.on_target, "nodes": result.nodes.total,
            "sqnr_db": doc["sqnr_db"], "samples": result.samples,
            "shapes_fixed": doc["shapes_fixed"], "reasons": list(result.reasons)}


def _write_exports(out: Any, res, qm) -> dict:
    """The float model the plan quantizes and the plan for QNN's converter and ORT's
    quantize_static (docs/exports.md). A plan neither format can carry (fp8, pruned weights)
    skips both files, with the reason recorded in plan.json."""
    from mpsearch.core.errors import ExportError
    from mpsearch.export.encodings import encodings_document
    from mpsearch.export.overrides import ort_overrides

    out.write_model("model.float.onnx", res.analysis.graph.model)
    files = {"model": "model.qdq.onnx", "float_model": "model.float.onnx"}
    kept = qm.kept_channels
    if kept:  # physically smaller (export/qdq.py, export/channels.py)
        files["channel_pruning"] = {
            "exported": "smaller",
            "note": "channel-pruned layers are exported physically smaller: their pruned "
                    "output channels (rows, bias, per-channel scales) removed, with the same "
                    "channels of the depthwise convs and per-channel constants on their route "
                    "and their consumers' input columns",
            "kept": {g: list(k) for g, k in kept.items()}}
    pruned = sorted(g for g, c in res.plan.items() if c.sparsity is not None)
    if pruned:  # both files are keyed to the dense float model: they would undo the pruning
        return {**files, "encodings": None, "ort_overrides": None,
                "skipped": f"the plan prunes {len(pruned)} layer(s) (e.g. {pruned[0]}): "
                           "encodings and ORT overrides apply to model.float.onnx's dense "
                           "weights and would not reproduce the pruning; ship model.qdq.onnx"}
    try:
        enc, ov = encodings_document(qm), ort_overrides(qm)
    except ExportError as e:
        return {**files, "encodings": None, "ort_overrides": None, "skipped": e.problem}
    out.write_json("encodings.json", enc)
    out.write_json("ort_overrides.json", ov)
    return {**files, "encodings": "encodings.json", "ort_overrides": "ort_overrides.json"}


def _summary(ui: Any, res, path, seconds: float, *, exports: dict) -> None:
    from rich.table import Table

    metric = res.budgets[0].metric
    t = Table(title=f"{', '.join(str(b) for b in res.budgets)} on {res.profile.name}")
    for col in ("plan", f"{metric} x w8a8", "bops x w8a8", "predicted dB", "measured dB",
                "top-1 agree", "fits"):
        t.add_column(col, justify="left" if col == "plan" else "right")

    def row(pr, style=None):
        m = pr.measured
        t.add_row(pr.name, f"{pr.cost.relative[metric]:.3f}", f"{pr.cost.relative['bops']:.3f}",
                  f"{pr.predicted_sqnr_db:.2f}", f"{m.sqnr_db:.2f}" if m else "-",
                  f"{100 * m.top1_agreement:.1f}%" if m and m.top1_agreement is not None
                  else "-", "yes" if pr.fits else "no", style=style)

    row(res.chosen, "bold")
    if res.greedy:
        row(res.greedy)
    for u in res.uniform:
        row(u)
    ui.out.print(t)
    ui.out.print("formats: " + ", ".join(f"{k} x{v}" for k, v in res.chosen.counts().items()))
    files = ["model.qdq.onnx", *(exports.get(k) for k in ("encodings", "ort_overrides")
                                 if exports.get(k))]
    ui.out.print(f"wrote {path}/report.html, {', '.join(files)}, plan.json, plan.csv in "
                 f"{seconds} s")
    if exports.get("skipped"):
        ui.out.print(f"not written: encodings.json, ort_overrides.json ({exports['skipped']})")


def cmd_pareto(args: argparse.Namespace, ui: Any) -> int:
    import math

    from mpsearch.data.outputs import OutputDir
    from mpsearch.job.document import plan_document
    from mpsearch.report.pareto import pareto_plot

    inputs = [args.model, args.data, args.hw] + ([args.eval_data] if args.eval_data else [])
    out = OutputDir(args.out, inputs=inputs, names=list(PARETO_OUTPUTS), flag="--out")
    try:
        # A budget no plan can exceed: the front spans every plan.
        res = _search(args, ui, [f"{args.metric}=1e9"], measure=True)
        doc = plan_document(res, model=str(args.model), profile=str(args.hw))
        front_doc = {"schema": "mpsearch.pareto/1", "model": doc["model"],
                     "profile": doc["profile"], "front": doc["front"],
                     "baselines": doc["baselines"]}
        out.write_json("pareto.json", front_doc)

        def csv(p):
            import pandas as pd

            rows = [{"relative_to_w8a8": q["relative_to_w8a8"], "cost": q["cost"],
                     "predicted_sqnr_db": q["predicted_sqnr_db"], "source": q["source"]}
                    for q in doc["front"]["points"]]
            pd.DataFrame(rows).to_csv(p, index=False)

        out.write_with("pareto.csv", csv)
        out.write_with("pareto.png", lambda p: pareto_plot(res, p))
    except BaseException:
        out.rollback()
        raise
    if ui.as_json:
        print(json.dumps(front_doc, indent=2))
        return 0
    for q in doc["front"]["points"]:
        db = q["predicted_sqnr_db"]
        ui.out.print(f"{args.metric} x{q['relative_to_w8a8']:.3f}: predicted "
                     f"{db if db is not None and math.isfinite(db) else 'inf'} dB")
    ui.out.print(f"wrote {out.path}/pareto.json, pareto.csv, pareto.png")
    return 0
