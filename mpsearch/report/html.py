"""``report.html``: one self-contained page per run, rebuilt from the run's files alone.

Reads ``plan.json`` (required), ``sensitivity.json`` and ``verify.json`` (optional) and the
hardware profile that ``plan.json`` names (when it still exists), draws the Pareto front, the
per-layer allocation and the sensitivity heatmap as PNGs beside the page and embeds them as
``data:`` URIs. Tables are pandas ``to_html``; the CSS is inline; there is no script and no
external address, so the page opens offline and can be mailed as one file. Same files in, same
bytes out: no dates, no absolute paths of this machine, PNGs without metadata at a fixed dpi.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mpsearch.core.errors import UsageError
from mpsearch.data.outputs import OutputDir
from mpsearch.report.allocation import allocation_plot
from mpsearch.report.pareto import METRIC_LABELS, front_plot
from mpsearch.report.runfiles import RunFiles, load_run, verify_status
from mpsearch.report.sections import (
    UNITS,
    baseline,
    chips,
    counts,
    esc,
    float_ops_html,
    fmt_db,
    fmt_pct,
    fmt_ratio,
    fmt_si,
    format_frame,
    html_table,
    img_tag,
    layer_frame,
    ok,
    profile_html,
    quality_of,
    search_html,
    section,
    sensitivity_note,
    verification_html,
)
from mpsearch.sensitivity.table import SensitivityTable

__all__ = ["REPORT_OUTPUTS", "RunFiles", "build_report", "draw_figures", "load_run",
           "render_report", "write_report"]

REPORT_OUTPUTS = ("report.html", "pareto.png", "allocation.png", "sensitivity.png")
COST_METRICS = ("latency_s", "bops", "weight_bytes", "energy_j")


# --------------------------------------------------------------------------- sections


def _banner(run: RunFiles) -> str:
    """A failed verification goes above everything else."""
    cls, line = verify_status(run.verify)
    if cls != "fail":
        return ""
    reasons = "".join(f"<li>{esc(r)}</li>" for r in (run.verify or {}).get("reasons", []))
    return (f'<div class="box fail banner"><b>Verification {esc(line)}.</b> The exported model '
            f"is not known to run on the device.{'<ul>' + reasons + '</ul>' if reasons else ''}"
            '<a href="#verification">details</a></div>')


def _data_box(run: RunFiles) -> str:
    """What weakens the figures (too little data for a check part, constant samples, no
    evaluation data), as the search warned of it on stderr."""
    warnings = (run.plan.get("data") or {}).get("warnings") or []
    if not warnings:
        return ""
    return ('<div class="box warn banner"><b>The figures below rest on weak data.</b><ul>'
            + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul></div>")


def _prediction_box(run: RunFiles) -> str:
    """A plan that measured well below its prediction says so, with the layers behind it."""
    check = (run.plan.get("quality") or {}).get("prediction_check")
    if not check:
        return ""
    layers = "".join(f"<li>{esc(r.get('group'))} ({esc(r.get('candidate'))}): measured "
                     f"{esc(r.get('measured_over_predicted_db'))} dB above its prediction</li>"
                     for r in check.get("layers", []))
    return (f'<div class="box warn banner"><b>The plan measured {esc(check.get("short_by_db"))}'
            f' dB below its prediction</b> on the {esc(check.get("data"))} data (more than '
            f'{esc(check.get("threshold_db"))} dB): {esc(check.get("note"))}.'
            + (f"<ul>{layers}</ul>" if layers else "") + "</div>")


def _with_ci(f: Mapping[str, Any]) -> str:
    """A measured SQNR with its 90% interval, e.g. "21.4 (20.1-22.6)"."""
    ci = f.get("sqnr_ci_db")
    v = f.get("sqnr_db")
    if not ok(v):
        return "-"
    return f"{v:.2f}" + (f" ({ci[0]:.1f}-{ci[1]:.1f})" if ci and all(ok(x) for x in ci)
                         else "")


def _cos(v: Any) -> str:
    return f"{v:.5f}" if ok(v) else "-"


def _glance(run: RunFiles) -> str:
    p = run.plan
    layers = list(p.get("layers", []))
    totals, q = p.get("totals", {}), p.get("quality", {})
    ref = p.get("profile", {}).get("reference", "w8a8")
    budget_metrics = [b.get("metric") for b in p.get("budgets", [])]
    placeholders = set(p.get("profile", {}).get("placeholder_costs") or [])
    # what was chosen
    shares = "".join(f"<tr><th>{esc(r['format'])}</th><td class=num>{r['share of MACs']}</td>"
                     f"<td class=num>{r['share of weight bytes']}</td>"
                     f"<td class=num>{r['share of predicted error']}</td></tr>"
                     for r in format_frame(layers).to_dict(orient="records"))
    chosen = (f'<div class="card"><h3>Chosen plan</h3><div>{chips(counts(layers))}</div>'
              '<table class="kv"><tr><th>share of</th><th>MACs</th><th>weight bytes</th>'
              f"<th>predicted error</th></tr>{shares}</table>"
              f'<p class="small">{len(layers)} quantizer groups, '
              f'{totals.get("conversions", 0)} format conversion(s); '
              f'{len(p.get("float_ops", []))} op(s) left in float</p></div>')
    # what it costs
    rows = []
    for m in COST_METRICS:
        t = totals.get(m, {})
        lim = next((b for b in p.get("budgets", []) if b.get("metric") == m), None)
        mark = ""
        if lim and ok(lim.get("limit_relative_to_w8a8")) and ok(t.get("relative_to_w8a8")):
            fits = t["relative_to_w8a8"] <= lim["limit_relative_to_w8a8"] * (1 + 1e-9)
            limit = fmt_ratio(lim["limit_relative_to_w8a8"])
            mark = (f' <span class="{"good" if fits else "bad"}">'
                    f'{"within" if fits else "OVER"} {limit}</span>')
        strong = m in budget_metrics
        if m in placeholders:
            mark += (' <span class="bad small" title="the profile calls these numbers '
                     'placeholders: see Hardware profile">placeholder costs</span>')
        rows.append(f"<tr{' class=budget' if strong else ''}><th>{METRIC_LABELS[m]}</th>"
                    f'<td class="num">{fmt_ratio(t.get("relative_to_w8a8"))}</td>'
                    f'<td class="num small">{fmt_si(t.get("value"), UNITS[m])}</td>'
                    f"<td>{mark}</td></tr>")
    cost = (f'<div class="card"><h3>Cost against all-{esc(ref)}</h3>'
            f'<table class="kv">{"".join(rows)}</table></div>')
    # how good it is
    m = q.get("measured")
    if m:
        quality = (f'<div class="big">{fmt_db(m.get("sqnr_db"))}</div>'
                   f'<p>measured output SQNR against FP32 on {m.get("samples")} '
                   f'{esc(m.get("data", ""))} samples ({esc(m.get("output", ""))})</p>'
                   f'<p class="small">predicted {fmt_db(q.get("predicted_sqnr_db"))}; '
                   f'cosine {_cos(m.get("cosine"))}; top-1 agreement with FP32 '
                   f'{fmt_pct(m.get("top1_agreement"))}</p>')
    else:
        quality = (f'<div class="big">{fmt_db(q.get("predicted_sqnr_db"))}</div>'
                   "<p>predicted output SQNR (the plan was not measured)</p>")
    quality = f'<div class="card"><h3>Quality</h3>{quality}</div>'
    # against the baselines, on a common basis
    mine = {"measured": m, "predicted_sqnr_db": q.get("predicted_sqnr_db")}
    metric = budget_metrics[0] if budget_metrics else "bops"
    lines = []
    for b in _comparators(p):
        a, o, kind = _common(mine, b)
        delta = ""
        if ok(a) and ok(o):
            delta = (f'<span class="{"good" if a >= o else "bad"}">{a - o:+.2f} dB</span>'
                     f' <span class="small">{kind}</span>')
        bm = (b.get("measured") or {}).get("sqnr_db")
        rel = b.get("totals", {}).get(metric, {}).get("relative_to_w8a8")
        lines.append(f"<tr><th>{esc(b.get('name'))}</th><td class=num>{fmt_ratio(rel)}</td>"
                     f"<td class=num>{fmt_db(bm) if bm is not None else '-'}</td>"
                     f"<td class=num>{fmt_db(b.get('predicted_sqnr_db'))}</td>"
                     f"<td>{delta}</td></tr>")
    head = (f"<tr><th></th><th>{esc(METRIC_LABELS.get(metric, metric))}</th><th>measured</th>"
            "<th>predicted</th><th>plan vs it</th></tr>")
    base = (f'<div class="card wide"><h3>Against the baselines</h3><table class="kv">{head}'
            f'{"".join(lines)}</table></div>')
    cls, line = verify_status(run.verify)
    reasons = ""
    if cls == "fail":
        reasons = "<ul>" + "".join(f"<li>{esc(r)}</li>" for r in
                                   (run.verify or {}).get("reasons", [])[:5]) + "</ul>"
    ver = (f'<div class="card {cls}"><h3>Verification on the device</h3><p><b>{esc(line)}</b>'
           f'</p>{reasons}<p class="small"><a href="#verification">details</a></p></div>')
    return f'<div class="cards">{chosen}{cost}{quality}{base}{ver}</div>'


def _comparators(p: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """All-reference uniform plan first, then the non-uniform baselines (greedy)."""
    ref = p.get("profile", {}).get("reference", "w8a8")
    out = [b for b in [baseline(p, f"uniform {ref}")] if b is not None]
    return out + [b for b in p.get("baselines", [])
                  if not str(b.get("name", "")).startswith("uniform")]


def _common(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[Any, Any, str]:
    """Both SQNRs measured when both plans were measured, else both predicted."""
    am, bm = (a.get("measured") or {}).get("sqnr_db"), (b.get("measured") or {}).get("sqnr_db")
    if ok(am) and ok(bm):
        return am, bm, "measured"
    return a.get("predicted_sqnr_db"), b.get("predicted_sqnr_db"), "predicted"


def _headline(run: RunFiles) -> str:
    p = run.plan
    totals, q = p.get("totals", {}), p.get("quality", {})
    ref = p.get("profile", {}).get("reference", "w8a8")
    b = (p.get("budgets") or [{}])[0]
    metric = b.get("metric", "bops")
    mine, kind = quality_of({"measured": q.get("measured"),
                              "predicted_sqnr_db": q.get("predicted_sqnr_db")})
    rel = fmt_ratio(totals.get(metric, {}).get("relative_to_w8a8"))
    placeholder = metric in (p.get("profile", {}).get("placeholder_costs") or [])
    text = (f"The chosen plan costs <b>{rel}</b>"
            f" the {METRIC_LABELS.get(metric, metric)} of all-{esc(ref)}"
            + (" (estimated from placeholder costs in the profile)" if placeholder else "")
            + (f" (budget {esc(b.get('budget'))})" if b.get("budget") else "")
            + f" at <b>{fmt_db(mine)}</b> {kind} output SQNR against FP32")
    m = q.get("measured") or {}
    if ok(m.get("top1_agreement")):
        text += f" ({fmt_pct(m['top1_agreement'])} top-1 agreement)"
    ci = m.get("sqnr_ci_db")
    if ci and all(ok(v) for v in ci):
        text += (f", {fmt_db(ci[0])} to {fmt_db(ci[1])} at 90% confidence over its "
                 f"{esc(m.get('samples'))} {esc(m.get('data'))} samples")
    text += "."
    cmp = []
    for c in q.get("comparisons") or []:  # measured on the same samples, paired
        if c.get("same_plan"):
            cmp.append(f"{esc(c.get('name'))} ({esc(c.get('role'))}): <b>the same plan</b>")
            continue
        ci = c.get("ci_db")
        span = (f", 90% interval {ci[0]:+.2f} to {ci[1]:+.2f} dB, "
                + ("excludes 0" if c.get("significant") else "<i>not significant</i>")
                if ci else "")
        cmp.append(f"{esc(c.get('name'))} ({esc(c.get('role'))}): "
                   f"<b>{c.get('difference_db'):+.2f} dB</b> SQNR{span}")
    if not cmp:  # an older plan.json, or nothing measured: both figures of one kind
        for o in _comparators(p):
            a, x, k = _common({"measured": q.get("measured"),
                               "predicted_sqnr_db": q.get("predicted_sqnr_db")}, o)
            if ok(a) and ok(x):
                rel_o = o.get("totals", {}).get(metric, {}).get("relative_to_w8a8")
                cmp.append(f"{esc(o.get('name'))} at {fmt_ratio(rel_o)}: "
                           f"<b>{a - x:+.2f} dB</b> ({k})")
    if cmp:
        text += " Against " + "; against ".join(cmp) + "."
    return f'<p class="headline">{text}</p>'


def _plans_table(p: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    chosen = {"name": "mpsearch plan", "fits": True, "formats": counts(list(p["layers"])),
              "totals": p.get("totals", {}), "predicted_sqnr_db": p["quality"].get(
                  "predicted_sqnr_db"), "measured": p["quality"].get("measured")}
    front = p.get("front", {}).get("measured", [])
    metric = (p.get("budgets") or [{}])[0].get("metric", "bops")
    base = sorted(p.get("baselines", []), key=lambda b: (
        str(b.get("name", "")).startswith("uniform"),
        b.get("totals", {}).get(metric, {}).get("relative_to_w8a8") or 0.0))
    for s in [chosen, *base, *front]:
        m = s.get("measured") or {}
        t = s.get("totals", {})
        row = {"plan": s.get("name"),
               "formats": ", ".join(f"{k}x{v}" for k, v in sorted(
                   (s.get("formats") or {}).items(), key=lambda kv: -kv[1])),
               "fits": "yes" if s.get("fits") else "no"}
        for metric, short in zip(COST_METRICS, ("latency", "BOPs", "weights", "energy"),
                                 strict=True):
            row[short] = fmt_ratio(t.get(metric, {}).get("relative_to_w8a8"))
        row["converts"] = t.get("conversions")
        row["predicted"] = fmt_db(s.get("predicted_sqnr_db"))
        figs = m.get("figures") or {}
        for part in ("fit", "check", "evaluation"):
            if part in figs or not figs:
                f = figs.get(part) or {}
                row[f"{part} dB"] = _with_ci(f) if f else "-"
        if not figs:
            row["measured"] = fmt_db(m.get("sqnr_db")) if m else "-"
        row["cosine"] = f"{m['cosine']:.5f}" if ok(m.get("cosine")) else "-"
        row["top-1 agree"] = fmt_pct(m.get("top1_agreement"))
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- assembly

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
color:#1f2328;background:#f5f6f8;font-size:14px;line-height:1.45}
main{max-width:1280px;margin:0 auto;padding:18px 28px 40px}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #dfe3e8;
padding-bottom:4px}h3{font-size:14px;margin:12px 0 6px}
nav{font-size:13px;margin:6px 0 10px}nav a{margin-right:14px;color:#0b5cad;text-decoration:none}
.sub{color:#57606a;font-size:13px}.small{color:#57606a;font-size:12px}
.headline{font-size:16px;background:#fff;border:1px solid #dfe3e8;border-radius:8px;
padding:10px 14px}
.cards{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:12px}
.wide{grid-column:span 2}
@media (max-width:1000px){.cards{grid-template-columns:minmax(0,1fr)}.wide{grid-column:span 1}
table.kv td{white-space:normal}main{padding:12px}}
.card{background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:8px 14px;
overflow-x:auto}
.card h3{margin-top:4px;color:#57606a;text-transform:uppercase;font-size:12px;letter-spacing:.04em}
.big{font-size:30px;font-weight:600}
.chip{display:inline-block;color:#fff;border-radius:10px;padding:1px 9px;margin:2px 2px;
font-size:13px;font-weight:600;text-shadow:0 0 2px rgba(0,0,0,.45)}
.box{border-radius:6px;padding:8px 12px;border:1px solid #dfe3e8;background:#fff}
.ok{border-left:6px solid #2da44e}.warn{border-left:6px solid #d4a72c;background:#fff8e5}
.fail{border-left:6px solid #cf222e;background:#ffebe9}
.banner{font-size:15px;margin:10px 0}.none{border-left:6px solid #8c959f}
.good{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
table{border-collapse:collapse;font-size:13px;background:#fff}
table.data{margin:6px 0}table.data th,table.data td{padding:3px 9px;border-bottom:1px solid #eaeef2;
text-align:right;white-space:nowrap}table.data th{background:#f0f2f5}
table.l0 td,table.l0 th,table.l1 td:nth-child(1),table.l1 th:nth-child(1),
table.l3 td:nth-child(-n+3),table.l3 th:nth-child(-n+3),table.l4 td:nth-child(-n+4),
table.l4 th:nth-child(-n+4){text-align:left}table.l0 td{white-space:normal}
table.data .chip{font-size:12px;padding:0 7px;margin:0}
table.data tr.chosen td{font-weight:700;background:#fff1f0}
table.kv th{text-align:left;font-weight:500;color:#57606a;padding:2px 12px 2px 0;
vertical-align:top}table.kv td{padding:2px 8px 2px 0;white-space:nowrap}table.kv tr.budget th,
table.kv tr.budget td{font-weight:700;color:#1f2328}td.num{text-align:right}
.card table.kv{background:none}
img{max-width:100%;height:auto;background:#fff;border:1px solid #dfe3e8;border-radius:6px}
.scroll{overflow-x:auto}code{background:#eef1f4;padding:0 4px;border-radius:4px}
details{margin:6px 0}summary{cursor:pointer;color:#0b5cad}
"""


def render_report(run: RunFiles, images: Mapping[str, bytes]) -> str:
    """The page as text; ``images`` maps PNG file names to their bytes."""
    p = run.plan
    model = p.get("model", {})
    prof = p.get("profile", {})
    title = f"{Path(str(model.get('path', 'model'))).name} on {prof.get('name', '?')}"
    nav = ("<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("pareto", "Pareto front"), ("plans", "Plans"), ("allocation", "Allocation"),
        ("sensitivity", "Sensitivity"), ("plan", "Plan table"), ("verification", "Verification"),
        ("float", "Float ops"), ("profile", "Profile"), ("search", "Search"))) + "</nav>")
    problems = "".join(f'<p class="box warn">{esc(x)}</p>' for x in run.problems)
    layers = list(p.get("layers", []))
    sens = sensitivity_note(run)
    if "sensitivity.png" in images:
        sens += img_tag("sensitivity.png", images["sensitivity.png"], "sensitivity heatmap")
    budgets = ", ".join(str(b.get("budget")) for b in p.get("budgets", []))
    body = [
        f"<header><h1>mpsearch report: {esc(title)}</h1>"
        f'<div class="sub">budget {esc(budgets)}'
        f" &middot; {esc(model.get('groups'))} quantizer groups &middot; model sha256 "
        f"{esc(str(model.get('sha256', ''))[:12])} &middot; {esc(p.get('schema'))}</div>{nav}"
        "</header>",
        problems, _banner(run), _data_box(run), _prediction_box(run), _headline(run),
        _glance(run),
        section("pareto", "Pareto front: predicted and measured",
                 img_tag("pareto.png", images["pareto.png"], "Pareto front")),
        section("plans", "The plan against the baselines and the front",
                 '<p class="small">Costs relative to all-w8a8 on the same device; SQNR of the '
                 "network output against FP32, predicted by the search and measured on each "
                 "part of the data, with its 90% interval over samples: <i>fit</i> (what "
                 "ranges, rounding and sensitivities were fitted on), <i>check</i> (held out "
                 "of that; the shortlist and the polish chose on it), <i>evaluation</i> "
                 "(--eval-data, never seen).</p>"
                 '<div class="scroll">' + html_table(_plans_table(p), left=3,
                                                    first_row_class="chosen")
                 + "</div>"),
        section("allocation", "Where the bits went",
                 img_tag("allocation.png", images["allocation.png"], "per-layer allocation")
                 + html_table(format_frame(layers), chip_column="format")),
        section("sensitivity", "Sensitivity heatmap", sens),
        section("plan", "Plan table (per quantizer group, network order)",
                 '<div class="scroll">' + html_table(layer_frame(layers), left=4,
                                                    chip_column="format") + "</div>"),
        section("verification", "Verification on the device", verification_html(run)),
        section("float", "Ops left in float, and why", float_ops_html(p)),
        section("profile", "Hardware profile", profile_html(run)),
        section("search", "How the plan was found", search_html(p)),
        '<p class="small">Rebuild this page from the run folder with <code>mpsearch report '
        "RUN_DIR</code>. It loads nothing from the network.</p>",
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>mpsearch: {esc(title)}</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_CSS}</style></head>\n<body><main>\n" + "\n".join(body)
            + "\n</main></body></html>\n")


def draw_figures(plan: Mapping[str, Any], table: SensitivityTable | None,
                 method: str | None) -> dict[str, bytes]:
    """The page's PNGs (name -> bytes) from a plan document and its sensitivity table: what
    :func:`write_report` draws from a run folder, drawable before the folder is complete
    (``mpsearch run`` draws them while the device check runs)."""
    images: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="mpsearch-figures-") as tmp:
        def draw(name: str, fn) -> None:
            path = Path(tmp) / name
            fn(path)
            images[name] = path.read_bytes()

        draw("pareto.png", lambda path: front_plot(plan, path))
        draw("allocation.png", lambda path: allocation_plot(list(plan["layers"]), path))
        if table is not None:
            from mpsearch.report.heatmap import sensitivity_heatmap

            chosen = {str(r.get("group")): str(r.get("candidate")) for r in plan["layers"]}
            draw("sensitivity.png", lambda path: sensitivity_heatmap(
                table, path, title=f"Single-group sensitivity ({method or '?'})",
                chosen=chosen))
    return images


def write_report(run_dir: str | os.PathLike[str], out: OutputDir, *,
                 html_name: str = "report.html",
                 images: Mapping[str, bytes] | None = None) -> Path:
    """Draw the PNGs and the page into ``out`` (its names must include REPORT_OUTPUTS).
    ``images``: the PNGs :func:`draw_figures` drew from this folder's plan, written as they
    are instead of drawn again."""
    run = load_run(run_dir)
    if images is None:
        table = run.sensitivity_table if run.sensitivity is not None else None
        images = draw_figures(run.plan, table, (run.sensitivity or {}).get("method"))
    for name, data in images.items():
        out.write_with(name, lambda path, data=data: Path(path).write_bytes(data))
    text = render_report(run, images)
    return out.write_with(html_name, lambda path: Path(path).write_text(text, encoding="utf-8"))


def build_report(run_dir: str | os.PathLike[str], *,
                 out: str | os.PathLike[str] | None = None) -> Path:
    """Write ``report.html`` (or ``out``) and its PNGs, beside it, from a run folder's files;
    return the page's path."""
    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    if target.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {target} is not an .html file", fix="name it e.g. report.html")
    load_run(run_dir)  # check the folder before creating anything
    names = [target.name, *REPORT_OUTPUTS[1:]]
    od = OutputDir(target.parent, inputs=[Path(run_dir) / "plan.json"], names=names,
                   flag="--out")
    try:
        return write_report(run_dir, od, html_name=target.name)
    except BaseException:
        od.rollback()
        raise
