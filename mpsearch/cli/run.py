"""``mpsearch run``: the whole job (calibrate, sensitivity, exact search under the budgets,
export, measure, verify on the device) into one folder."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mpsearch.cli.args import add_options, run_config
from mpsearch.cli.ui import Ui

__all__ = ["EXIT_DISAGREES", "EXIT_NOT_ON_TARGET", "cmd_run", "register"]

EXIT_NOT_ON_TARGET = 1  # the device compiler refused part of the plan
EXIT_DISAGREES = 3  # it compiled whole, but computes something else than the CPU EP


def register(sub: Any, common: argparse.ArgumentParser) -> None:
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
                    "OUT/sensitivity.json, OUT/verify.json, OUT/config.yaml (the settings, "
                    "to run it again with --config) and the report's PNGs. Exit code 1 "
                    "when the device compiler refuses part of the plan (or crashes on it), 3 "
                    "when it compiles whole but an output disagrees with the CPU EP below "
                    "--verify-min-db after the re-plans (--replans) around the first tensor it "
                    "computes differently (everything is still written, for the report).")
    add_options(s, "run")
    s.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace, ui: Ui) -> int:
    from mpsearch.data.outputs import OutputDir
    from mpsearch.job.run_folder import RUN_OUTPUTS, run_job

    cfg = run_config(args)  # every setting checked before the long work
    inputs = [i for i in (cfg.model, cfg.data, cfg.hw, cfg.eval_data) if i]
    out = OutputDir(cfg.out, inputs=inputs, names=list(RUN_OUTPUTS), flag="--out")
    try:
        t0 = time.perf_counter()
        res, folder, _ = run_job(cfg, out, progress=ui.progress, note=ui.note)
        seconds = round(time.perf_counter() - t0, 2)
    except BaseException:
        out.rollback()
        raise
    verified = folder.verification
    code = _exit_code(verified)
    if ui.as_json:
        print(json.dumps({"out": str(out.path), "seconds": seconds,
                          "stages": {k: round(v, 2) for k, v in res.seconds.items()},
                          "model": {"path": "model.qdq.onnx",
                                    "sha256": folder.exports.shipped.sha256},
                          "totals": folder.plan["totals"], "quality": folder.plan["quality"],
                          "verification": verified.to_dict() if verified else None,
                          "formats": res.chosen.counts()}, indent=2))
        return code
    _summary(ui, res, out.path, seconds, folder.exports, folder.plan)
    check = folder.plan["quality"].get("prediction_check")
    if check:
        layers = ", ".join(
            f"{r['group']} ({r['candidate']}, {r['measured_over_predicted_db']:+} dB)"
            for r in check["layers"][:3])
        why = (f"layers whose measured error exceeds its prediction most: {layers}" if layers
               else "no layer measured alone departs from its prediction: "
                    f"{check['note']}")
        ui.err.print(f"[bold yellow]the plan measured {check['short_by_db']} dB below its "
                     f"prediction[/] on the {check['data']} data; {why}")
    if verified is not None:
        for i, r in enumerate(verified.replans, 1):
            ui.err.print(f"re-plan {i}: {r.culprit}; took "
                         f"{', '.join(sorted(set(r.avoided.values())))} activations off "
                         f"{len(r.avoided)} layer(s): "
                         + (f"no plan ({r.outcome})" if r.outcome
                            else f"{_db1(r.sqnr_db)} -> {_db1(r.after_db)} dB"))
        if verified.replans:
            ui.err.print(f"shipped the plan of round {verified.shipped_round} of "
                         f"{len(verified.replans) + 1}")
        if verified.failed:
            ui.err.print(f"[bold red]the plan does not run entirely on {verified.target}"
                         f"[/]: " + "; ".join(verified.reasons[:3] or ["see report.html"]))
        elif verified.disagrees:
            ui.err.print(f"[bold red]not verified: {verified.target} computes something else "
                         f"than the CPU EP[/]: output SQNR {_db1(verified.sqnr_db)} dB, below the "
                         f"{verified.min_sqnr_db:g} dB threshold (outputs "
                         f"{', '.join(verified.disagreeing) or 'none ran'})"
                         + (f"; {verified.culprit}" if verified.culprit else "")
                         + "; see report.html")
        elif verified.skipped is None:
            _say(ui, f"verified on {verified.target} (soc {verified.soc_model}, "
                         f"emulated): every node on the HTP, {_db1(verified.sqnr_db)} dB against "
                         f"the CPU EP on {verified.samples} samples (threshold "
                         f"{verified.min_sqnr_db:g} dB); model.qdq.onnx sha256 "
                         f"{verified.sha256[:16]}")
    return code


def _exit_code(verified: Any) -> int:
    """0; 1 when the compiler refused part of the plan; 3 when it compiled whole but its
    outputs do not agree with the CPU EP (everything is still written, for the report)."""
    if verified is None:
        return 0
    return EXIT_NOT_ON_TARGET if verified.failed else EXIT_DISAGREES if verified.disagrees \
        else 0


PREDICTION_CAP_DB = 99.0  # a prediction without measurable error is shown as "> 99"
COST_LABELS = {"bops": "BOPs", "latency_s": "latency", "weight_bytes": "size",
               "energy_j": "energy"}  # the table's cost columns, x all-w8a8


def _say(ui: Ui, text: str) -> None:
    """A summary line, wrapped at the terminal's width (80 columns in a pipe or a log)."""
    ui.out.print(text, soft_wrap=False)


def _db1(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pred(db: float) -> str:
    return f"{db:.1f}" if db < PREDICTION_CAP_DB else f"> {PREDICTION_CAP_DB:g}"


def _summary(ui: Ui, res: Any, path: Any, seconds: float, exports: Any,
             plan: dict | None = None) -> None:
    from rich.table import Table

    # the budgets' quantities, then bit-operations (once), relative to w8a8
    metrics = list(dict.fromkeys([*(b.metric for b in res.budgets), "bops"]))
    m0 = res.chosen.measured
    where = (f"SQNR, top-1 vs FP32 on {m0.result.samples} {m0.data.value} samples" if m0
             else "not measured")
    t = Table(title=f"{', '.join(str(b) for b in res.budgets)} on {res.profile.name}",
              caption=f"costs x all-w8a8; {where}")
    for col in ("plan", *(f"{COST_LABELS.get(m, m)}" for m in metrics), "pred. dB",
                "SQNR dB", "top-1", "fits"):
        t.add_column(col, justify="left" if col == "plan" else "right", no_wrap=True)

    def row(pr: Any, style: str | None = None) -> None:
        m = pr.measured
        t.add_row(pr.name, *(f"{pr.cost.relative[k]:.2f}" for k in metrics),
                  _pred(pr.predicted_sqnr_db), f"{m.sqnr_db:.1f}" if m else "-",
                  f"{100 * m.top1_agreement:.0f}%" if m and m.top1_agreement is not None
                  else "-", "yes" if pr.fits else "no", style=style)

    row(res.chosen, "bold")
    if res.greedy:
        row(res.greedy)
    for u in sorted(res.uniform, key=lambda u: u.cost.relative[metrics[0]]):
        row(u)
    ui.out.print(t)
    if res.target is not None:
        shown = (res.target_effective or res.target).shown
        steps = ", ".join(f"{s.limit:.3f}x {shown(s.quality)}"
                          + ("" if s.met else " (short)") for s in res.target_steps)
        asked = (f" (SQNR >= {res.target_effective.value:.2f} dB, uniform w8a8's minus "
                 f"{res.target.value:g})" if res.target_effective else "")
        _say(ui, f"target {res.target}{asked}: the least {res.budgets[0].key} limit whose plan "
                     f"meets it on the check part is {res.budgets[0].value:.3f} x w8a8 "
                     f"({len(res.target_steps)} searches: {steps})")
    if res.selection is not None:
        _say(ui, f"chosen on the {res.selection.data} part "
                     f"({res.samples.get(res.selection.data, 0)} samples): "
                     f"{res.selection.reason}")
    for c in (plan or {}).get("quality", {}).get("comparisons", []):
        if c.get("same_plan"):
            _say(ui, f"{c['name']} ({c['role']}) is the shipped plan")
            continue
        ci = c.get("ci_db")
        span = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        _say(ui, f"against {c['name']} ({c['role']}): {c['difference_db']:+.2f} dB{span} "
                     f"SQNR on the {c['data']} data, "
                     + ("interval excludes 0" if c["significant"] else "not significant"))
    _say(ui, "formats: " + ", ".join(f"{k} x{v}" for k, v in res.chosen.counts().items()))
    files = ["model.qdq.onnx", *(f for f in (exports.encodings, exports.ort_overrides) if f)]
    _say(ui, f"wrote {path}/report.html, {', '.join(files)}, plan.json, plan.csv in "
                 f"{seconds} s")
    if exports.skipped:
        _say(ui, f"not written: encodings.json, ort_overrides.json ({exports.skipped})")
