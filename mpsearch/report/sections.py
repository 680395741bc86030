"""Pieces of ``report.html``: number formats, small HTML helpers, and the detail sections
(verification, ops left in float, hardware profile, search settings, per-layer tables).

Every value from the run's files goes through :func:`esc` (``html.escape``); tables are pandas
``to_html``; nothing here refers to anything outside the page.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

from mpsearch.report.allocation import candidate_colors
from mpsearch.report.runfiles import RunFiles, verify_status


def ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_ratio(v: Any) -> str:
    return f"{v:.3f}x" if ok(v) else "-"


def fmt_db(v: Any) -> str:
    return f"{v:.2f} dB" if ok(v) else ("lossless" if isinstance(v, float) else "-")


def fmt_pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if ok(v) else "-"


def fmt_si(v: Any, unit: str) -> str:
    if not ok(v):
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"),
                          (1e-6, "µ"), (1e-9, "n"), (1e-12, "p")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


UNITS = {"latency_s": "s", "bops": "BOP", "weight_bytes": "B", "activation_bytes": "B",
          "energy_j": "J"}


# --------------------------------------------------------------------------- small pieces


def esc(v: Any) -> str:
    return escape(str(v))


def chips(formats: Mapping[str, int]) -> str:
    colors = candidate_colors(list(formats))
    return " ".join(f'<span class="chip" style="background:{colors[k]}">{esc(k)} &times; {v}'
                    "</span>" for k, v in sorted(formats.items(), key=lambda kv: -kv[1]))


def html_table(df: pd.DataFrame, *, left: int = 1, chip_column: str | None = None,
               first_row_class: str | None = None) -> str:
    """``df.to_html`` with its first ``left`` columns aligned left (0: all of them), and the
    candidate names in ``chip_column`` drawn in their chart colours."""
    if chip_column is not None and chip_column in df:
        colors = candidate_colors([str(v) for v in df[chip_column]])
        df = df.copy()
        df[chip_column] = [f'<span class="chip" style="background:{colors[str(v)]}">'
                           f"{esc(v)}</span>" for v in df[chip_column]]
        text = df.to_html(index=False, border=0, classes=f"data l{left}", na_rep="-",
                          escape=False, formatters={c: esc for c in df.columns
                                                    if c != chip_column})
    else:
        text = df.to_html(index=False, border=0, classes=f"data l{left}", na_rep="-",
                          escape=True)
    if first_row_class:
        text = text.replace("<tbody>\n    <tr>", f'<tbody>\n    <tr class="{first_row_class}">',
                            1)
    return text if text.startswith('<div class="scroll">') else \
        f'<div class="scroll">{text}</div>'  # a wide table scrolls in its own box


def img_tag(name: str, data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{esc(alt)}" title="{esc(name)}">'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def counts(layers: list[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in layers:
        out[str(r.get("candidate"))] = out.get(str(r.get("candidate")), 0) + 1
    return out


def baseline(plan: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    return next((b for b in plan.get("baselines", []) if b.get("name") == name), None)


def quality_of(summary: Mapping[str, Any]) -> tuple[float | None, str]:
    """The measured SQNR if there is one, else the predicted, and which it is."""
    m = summary.get("measured")
    if m and ok(m.get("sqnr_db")):
        return float(m["sqnr_db"]), "measured"
    return summary.get("predicted_sqnr_db"), "predicted"


def kv_table(d: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in d.items())
    return f'<div class="scroll"><table class="kv">{rows}</table></div>'


def verification_html(run: RunFiles) -> str:
    v = run.verify
    cls, line = verify_status(v)
    if v is None:
        return (f'<p class="box {cls}">{esc(line)}. Verification compiles the exported model '
                "for the device (Qualcomm profiles) and compares its outputs; rerun "
                "<code>mpsearch run</code> with such a profile to get it.</p>")
    parts = [f'<p class="box {cls}"><b>{esc(line)}</b></p>']
    reasons = v.get("reasons") or []
    if reasons:
        items = "".join(f"<li>{esc(r)}</li>" for r in reasons)
        parts.append(f'<div class="box {cls}"><b>Reasons</b><ul>{items}</ul></div>')
    nodes = v.get("nodes") or {}
    facts = {"target": v.get("target"), "soc_model": v.get("soc_model"),
             "model": (v.get("model") or {}).get("path"),
             "sha256": str((v.get("model") or {}).get("sha256", ""))[:16],
             "input shapes": json.dumps(v.get("input_shapes")) if v.get("input_shapes") else None,
             "shapes fixed": "; ".join(v.get("shapes_fixed") or []) or None,
             "nodes on target": f"{nodes.get('on_target')} / {nodes.get('total')}"
             if nodes else None,
             "samples": v.get("samples"), "output SQNR vs CPU": fmt_db(v.get("sqnr_db")),
             "seconds": v.get("seconds")}
    parts.append(kv_table({k: x for k, x in facts.items() if x not in (None, "")}))
    off = nodes.get("not_on_target") or []
    if off:
        parts.append("<h3>Nodes not on the target</h3>" + html_table(pd.DataFrame(
            off, columns=["node", "op_type", "reason"]), left=0))
    for key, title in (("by_ep", "Nodes per execution provider"), ("by_op", "Nodes per op")):
        by = nodes.get(key)
        if by:
            parts.append(f"<details><summary>{title}</summary>" + html_table(pd.DataFrame(
                [{"": k, "nodes": n} for k, n in by.items()])) + "</details>")
    outs = v.get("outputs") or []
    if outs:
        parts.append("<h3>Outputs against the CPU execution provider</h3>" + html_table(
            pd.DataFrame(outs, columns=["name", "sqnr_db", "cosine"])))
    return "\n".join(parts)


def format_frame(layers: list[Mapping[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(layers)
    tot = {k: float(pd.to_numeric(df[k], errors="coerce").fillna(0).sum()) or 1.0
           for k in ("macs", "weight_bytes", "predicted_mse", "bops")}
    rows = []
    for cand, g in df.groupby("candidate", sort=True):
        num = {k: float(pd.to_numeric(g[k], errors="coerce").fillna(0).sum()) for k in tot}
        rows.append({"format": cand, "groups": len(g), "share of MACs": fmt_pct(num["macs"]
                                                                             / tot["macs"]),
                     "share of BOPs": fmt_pct(num["bops"] / tot["bops"]),
                     "share of weight bytes": fmt_pct(num["weight_bytes"] / tot["weight_bytes"]),
                     "share of predicted error": fmt_pct(num["predicted_mse"]
                                                      / tot["predicted_mse"])})
    return pd.DataFrame(rows).sort_values("groups", ascending=False, kind="stable")


def _alone_db(r: Mapping[str, Any]) -> Any:
    """The measured single-group MSE in dB, with the signal the predicted pair implies."""
    p, pm, mm = r.get("predicted_sqnr_db"), r.get("predicted_mse"), r.get("measured_single_mse")
    if not (ok(p) and ok(pm) and ok(mm)) or pm <= 0 or mm <= 0:
        return None
    return 10 * math.log10(pm * 10 ** (p / 10) / mm)


def layer_frame(layers: list[Mapping[str, Any]]) -> pd.DataFrame:
    rows = []
    for i, r in enumerate(layers):
        alone = _alone_db(r)
        rows.append({"#": i, "group": r.get("group"), "op": r.get("op_type"),
                     "format": r.get("candidate"), "MACs": fmt_si(r.get("macs"), ""),
                     "latency": fmt_si(r.get("latency_s"), "s"),
                     "latency from": r.get("latency_from"), "BOPs": fmt_si(r.get("bops"), ""),
                     "weights": fmt_si(r.get("weight_bytes"), "B"),
                     "activations": fmt_si(r.get("activation_bytes"), "B"),
                     "energy": fmt_si(r.get("energy_j"), "J"),
                     "SQNR alone": fmt_db(r.get("predicted_sqnr_db")),
                     "from": "measured" if alone is not None else "predicted"})
    return pd.DataFrame(rows)


def float_ops_html(p: Mapping[str, Any]) -> str:
    ops = list(p.get("float_ops", []))
    kept = [r for r in p.get("layers", []) if str(r.get("weight_format", "")).upper() == "FLOAT"
            or r.get("candidate") == "float"]
    parts = []
    if ops:
        parts.append(f"<p>{len(ops)} op(s) stay in float, so the exported model runs them "
                     "unquantized between dequantize and quantize nodes:</p>"
                     + html_table(pd.DataFrame(ops, columns=["node", "op", "reason"]),
                                  left=0))
    if kept:
        parts.append(f"<p>{len(kept)} layer(s) the plan keeps in float (--keep-float or a "
                     "pin):</p>" + html_table(pd.DataFrame(
                         [{"node": r.get("group"), "op": r.get("op_type"),
                           "reason": "kept in float by the user (--keep-float or a pin)"}
                          for r in kept]), left=0))
    dropped = list(p.get("candidates_dropped", []))
    if dropped:
        parts.append(f"<p>{len(dropped)} candidate(s) not offered to a layer (a sensitivity "
                     "that is not a finite number, or a format the device computed wrongly "
                     "there):</p>" + html_table(pd.DataFrame(
                         dropped, columns=["group", "candidate", "reason"]), left=0))
    specialized = [s for s in p.get("specialized", []) if s.get("branch") != "both"]
    if specialized:
        parts.append(f"<p><b>{len(specialized)} If node(s) replaced by the branch the "
                     "calibration data takes (--specialize-if): the shipped model computes "
                     "only that branch.</b></p>" + html_table(pd.DataFrame(
                         specialized, columns=["node", "condition", "value", "branch",
                                               "nodes"]), left=0))
    selected = [s for s in p.get("specialized", []) if s.get("branch") == "both"]
    if selected:
        parts.append(f"<p>{len(selected)} If node(s) computed as both branches and a Where on "
                     "the condition (the target has no If): the same outputs for every input, "
                     "both branches always run.</p>" + html_table(pd.DataFrame(
                         selected, columns=["node", "condition", "nodes"]), left=0))
    if not parts:
        parts.append("<p>None: every op mpsearch knows is quantized as the plan says; no op "
                     "was left in float.</p>")
    return "\n".join(parts)


def profile_html(run: RunFiles) -> str:
    from mpsearch.core.errors import MpsearchError
    from mpsearch.hw.profile import load_profile

    info = run.plan.get("profile", {})
    path = info.get("path")
    base = {"name": info.get("name"), "file": path, "reference candidate": info.get("reference")}
    found = None
    if path:
        # the run's config.yaml holds the path relative to the folder: from any directory
        for c in (*((run.path / run.config_hw,) if run.config_hw else ()), Path(path),
                  run.path / path):
            if c.is_file():
                found = c
                break
    if found is None:
        return (f'<p class="box warn">The profile file {esc(path)} is not here any more; only '
                "what plan.json records is shown.</p>" + kv_table(base))
    try:
        prof = load_profile(found)
    except MpsearchError as e:
        return (f'<p class="box warn">The profile file {esc(path)} no longer loads '
                f"({esc(e.one_line())}); only what plan.json records is shown.</p>"
                + kv_table(base))
    note = ""
    if prof.name != info.get("name"):
        note = (f'<p class="box warn">{esc(path)} now names the profile {esc(prof.name)}, the run '
                f"used {esc(info.get('name'))}: it was edited since.</p>")
    facts = {"name": prof.name, "description": prof.description, "file": path,
             "runtime": prof.runtime, "soc_model": prof.soc_model,
             "weight formats": ", ".join(str(f) for f in prof.weight_formats),
             "activation formats": ", ".join(str(f) for f in prof.activation_formats),
             "formats tied across": ", ".join(sorted(prof.tie_ops)) or "-",
             "pinned layers": ", ".join(f"{k}={v.name}" for k, v in prof.pins.items()) or "-",
             "sparsity": ", ".join(prof.sparsity) or "-",
             "per-layer overhead": fmt_si(prof.per_layer_overhead_s, "s")}
    ops = [{"op": "default", "candidates": ", ".join(c.name for c in prof.default_pairs)}]
    ops += [{"op": op, "candidates": ", ".join(c.name for c in cs)}
            for op, cs in sorted(prof.op_pairs.items())]
    src = [{"cost": "compute (MACs/s per candidate)", "source": prof.compute.source},
           {"cost": f"memory ({fmt_si(prof.memory.bytes_per_s, 'B/s')})",
            "source": prof.memory.source},
           {"cost": "energy (pJ per MAC and per byte)", "source": prof.energy.source},
           {"cost": "per-layer overhead", "source": prof.overhead_source},
           {"cost": "format conversion", "source": prof.conversion.source}]
    if prof.latency_table is not None:
        src.append({"cost": "measured latency table", "source": prof.latency_table.source})
    return (note + f'<p class="small">Read from {esc(path)} now; plan.json records the name '
            "and reference of the profile the run used.</p>" + kv_table(facts)
            + "<h3>Candidates per op</h3>" + html_table(pd.DataFrame(ops), left=0)
            + "<h3>Cost model and where each number comes from</h3>"
            + html_table(pd.DataFrame(src), left=0))


def search_html(p: Mapping[str, Any]) -> str:
    s, sol, ref = p.get("sensitivity", {}), p.get("solver", {}), p.get("refinement", {})
    model = p.get("model", {})
    facts = {"model": model.get("path"), "sha256": model.get("sha256"),
             "quantizer groups / layers": f"{model.get('groups')} / {model.get('layers')}",
             "budgets": "; ".join(f"{b.get('budget')} (limit {fmt_si(b.get('limit'), '')}, "
                                  f"{fmt_ratio(b.get('limit_relative_to_w8a8'))} w8a8)"
                                  for b in p.get("budgets", [])),
             "sensitivity method": s.get("method"), "calibration samples": s.get("samples"),
             "Hessian-to-output scale (fit)": s.get("fit_alpha"),
             "solver": f"{sol.get('status')} ({sol.get('resolves', 0)} re-solves)",
             "refinement rounds (pairs measured per round)": ", ".join(
                 str(r) for r in ref.get("rounds", [])) or "none",
             "pairs measured for real": ref.get("pairs_measured"),
             "measured / predicted error per candidate": ", ".join(
                 f"{k} {v}" for k, v in (ref.get("scales") or {}).items()) or "-"}
    gating = p.get("gating")
    if gating:
        cands = gating.get("candidates") or {}
        facts["gating candidates"] = (
            f"{sum(len(v) for v in cands.values())} for {len(cands)} groups from a "
            f"{gating.get('search')} sweep ({gating.get('seconds')} s)")
    ex = p.get("exports") or {}
    if ex:
        facts["files exported"] = ", ".join(str(v) for k, v in ex.items()
                                            if v and isinstance(v, str) and k != "skipped") + (
            f" (skipped: {ex['skipped']})" if ex.get("skipped") else "")
        if isinstance(ex.get("channel_pruning"), dict):
            kept = ex["channel_pruning"].get("kept") or {}
            facts["channel pruning"] = f"{len(kept)} layers exported physically smaller: " + \
                ", ".join(f"{g} {len(k)} channels kept" for g, k in kept.items())
    out = kv_table(facts)
    sel = p.get("selection") or {}
    if sel.get("contenders"):
        out += (f"<h3>Shortlist measured on the {esc(sel.get('data', 'calibration'))} data "
                f"(chosen: {esc(sel.get('chosen'))})</h3>" + html_table(pd.DataFrame(
                    [{"plan": c.get("name"),
                      "measured SQNR": fmt_db(c.get("calibration_sqnr_db")),
                      "predicted SQNR": fmt_db(c.get("predicted_sqnr_db")),
                      **{f"{k} x w8a8": fmt_ratio(v)
                         for k, v in (c.get("relative") or {}).items()}}
                     for c in sel["contenders"]])))
    po = p.get("polish") or {}
    if po.get("steps"):
        out += (f"<h3>Polish from {esc(po.get('start'))}: {len(po['steps'])} neighbouring "
                f"plans measured on the {esc(po.get('data', 'calibration'))} data, "
                f"{fmt_db(po.get('start_sqnr_db'))} to {fmt_db(po.get('sqnr_db'))}</h3>"
                + html_table(pd.DataFrame(
                    [{"changes": ", ".join(f"{c['layer']} {c['from']} to {c['to']}"
                                           for c in st.get("changes") or []),
                      "measured SQNR": fmt_db(st.get("calibration_sqnr_db")),
                      "kept": "yes" if st.get("accepted") else "no"}
                     for st in po["steps"]])))
    return out


def sensitivity_note(run: RunFiles) -> str:
    if run.sensitivity is None:
        return ("<p class=\"box none\">No sensitivity.json in this run folder: write one with "
                "<code>mpsearch sensitivity MODEL --hw PROFILE --data CALIB --out DIR</code> "
                "and copy it here, then <code>mpsearch report</code> again.</p>")
    return ""

