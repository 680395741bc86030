"""``mpsearch hw ...``: validate, show and measure hardware profiles."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mpsearch.cli.args import parse_shapes
from mpsearch.core.errors import UsageError

UNIFORM_FOR_REPORT = ("w8a8", "w4a8", "w8a16", "w16a16", "fp16")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    hw = sub.add_parser("hw", help="hardware profiles: validate, show, measure latency tables",
                        description="Hardware profiles describe what a device can run and what "
                                    "it costs; see hw_profiles/README.md.")
    hsub = hw.add_subparsers(dest="hw_command", required=True, metavar="HW_COMMAND")

    s = hsub.add_parser("validate", parents=[common], help="check a profile file",
                        description="Parse and check a profile; errors name the YAML line and "
                                    "key path.")
    s.add_argument("profile", help="profile YAML file")
    s.set_defaults(func=cmd_validate)

    s = hsub.add_parser("show", parents=[common],
                        help="formats, legal candidates and costs; per layer with --model",
                        description="Show the profile's formats and legal candidates per op; "
                                    "with --model, each layer's cost in every candidate and "
                                    "the relative cost of uniform plans.")
    s.add_argument("profile", help="profile YAML file")
    s.add_argument("--model", help="ONNX model: per-layer costs and uniform plan totals")
    s.add_argument("--input-shape", action="append", metavar="NAME=D,D,...",
                   help="fix a dynamic input shape (default: dynamic dims 1)")
    s.set_defaults(func=cmd_show)

    s = hsub.add_parser("measure", parents=[common],
                        help="time every layer in every candidate on ONNX Runtime",
                        description="Time every quantizable layer of MODEL in every candidate "
                                    "the profile allows, in real ONNX Runtime sessions "
                                    "(warm-up, repeats, medians), and write the table into "
                                    "the profile (the cost model then uses it).")
    s.add_argument("model", help="FP32 ONNX model")
    s.add_argument("--ep", choices=["cpu"], default="cpu",
                   help="execution provider to time on (default cpu)")
    s.add_argument("--data", required=True, metavar="CALIB",
                   help="calibration data (for the quantization parameters of each layer)")
    s.add_argument("--profile", metavar="BASE",
                   help="profile to extend (default: --out if it exists, else "
                        "hw_profiles/ort_cpu.yaml)")
    s.add_argument("--out", required=True, metavar="PROFILE", help="profile file to write")
    s.add_argument("--warmup", type=int, default=5, metavar="N",
                   help="untimed runs per layer (default 5)")
    s.add_argument("--repeats", type=int, default=30, metavar="N",
                   help="timed runs per layer (default 30)")
    s.set_defaults(func=cmd_measure)


def cmd_validate(args: argparse.Namespace, ui: Any) -> int:
    from mpsearch.hw.profile import load_profile

    p = load_profile(args.profile)
    dense = sum(c.sparsity is None for c in p.all_pairs)
    info = {"profile": str(args.profile), "name": p.name, "valid": True,
            "candidates": [c.name for c in p.all_pairs],
            "latency_table": p.latency_table is not None}
    if ui.as_json:
        print(json.dumps(info, indent=2))
    else:
        ui.out.print(f"{args.profile}: valid profile '{p.name}' ({p.runtime}"
                     + (f", soc_model {p.soc_model}" if p.soc_model else "") + f"), "
                     f"{len(p.all_pairs)} candidates ({dense} dense, "
                     f"{len(p.all_pairs) - dense} pruned)"
                     + (", with a measured latency table" if p.latency_table else ""))
    return 0


def _profile_doc(p: Any) -> dict[str, Any]:
    return {
        "name": p.name, "description": p.description, "runtime": p.runtime,
        "soc_model": p.soc_model,
        "formats": {"weights": [str(f) for f in p.weight_formats],
                    "activations": [str(f) for f in p.activation_formats]},
        "ops": {"default": [c.name for c in p.default_pairs],
                **{op: [c.name for c in cs] for op, cs in p.op_pairs.items()}},
        "sources": {"compute": p.compute.source, "memory": p.memory.source,
                    "energy": p.energy.source, "overhead": p.overhead_source,
                    "conversion": p.conversion.source,
                    "latency_table": p.latency_table.source if p.latency_table else None},
        "tie": sorted(p.tie_ops), "pins": {k: v.name for k, v in p.pins.items()},
    }


def cmd_show(args: argparse.Namespace, ui: Any) -> int:
    from mpsearch.core.formats import parse_candidate
    from mpsearch.graph.layer_graph import build_layer_graph, load_model
    from mpsearch.hw.cost import METRICS, CostModel
    from mpsearch.hw.profile import load_profile
    from mpsearch.sensitivity.table import SparsityChoice, legal_candidates

    p = load_profile(args.profile)
    doc: dict[str, Any] = {"profile": _profile_doc(p)}
    if args.model:
        lg = build_layer_graph(load_model(args.model),
                               input_shapes=parse_shapes(args.input_shape))
        cm = CostModel(lg, p)
        # every candidate the profile lists: those a layer cannot take are listed with why
        legal = legal_candidates(lg, cm, sparsity=SparsityChoice.ALL)
        doc["layers"] = {g: {c.name: {m: getattr(cm.layer(g, c), m) for m in METRICS}
                             | {"latency_from": cm.layer(g, c).latency_from}
                             for c in legal.by_group[g]} for g in lg.group_names}
        not_legal: dict[str, dict[str, str]] = {}
        for r in legal.refused:
            not_legal.setdefault(r.group, {})[r.candidate.name] = r.reason
        doc["not_legal"] = not_legal
        uniform = {}
        for name in UNIFORM_FOR_REPORT:
            c = parse_candidate(name)
            if all(c in legal.by_group[g] for g in lg.group_names):
                pc = cm.plan({g: c for g in lg.group_names})
                uniform[name] = {"absolute": pc.as_dict(), "relative": dict(pc.relative)}
        doc["uniform_plans"] = uniform
    if ui.as_json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    _print_profile(ui, p, doc["profile"])
    if args.model:
        _print_costs(ui, doc, args.model)
    return 0


def _print_profile(ui: Any, p: Any, d: dict[str, Any]) -> None:
    from rich.table import Table

    ui.out.print(f"[bold]{p.name}[/bold]: {p.description}")
    ui.out.print(f"runtime {p.runtime}" + (f", soc_model {p.soc_model}" if p.soc_model else ""))
    ui.out.print(f"weight formats: {', '.join(d['formats']['weights'])}; activation formats: "
                 f"{', '.join(d['formats']['activations'])}")
    t = Table(title="legal candidates per op type")
    t.add_column("op type")
    t.add_column("candidates")
    for op, cs in d["ops"].items():
        t.add_row(op, ", ".join(cs))
    ui.out.print(t)
    t = Table(title="cost numbers: sources")
    t.add_column("section")
    t.add_column("source")
    for k, v in d["sources"].items():
        if v:
            t.add_row(k, v)
    ui.out.print(t)


def _print_costs(ui: Any, doc: dict[str, Any], model: str) -> None:
    from rich.table import Table

    t = Table(title=f"{model}: uniform plans relative to w8a8")
    for col in ("plan", "latency", "BOPs", "weight bytes", "activation bytes", "energy",
                "latency ms"):
        t.add_column(col, justify="left" if col == "plan" else "right")
    for name, v in doc["uniform_plans"].items():
        r, a = v["relative"], v["absolute"]
        t.add_row(name, *(f"{r[m]:.3f}" for m in ("latency_s", "bops", "weight_bytes",
                                                   "activation_bytes", "energy_j")),
                  f"{1e3 * a['latency_s']:.3f}")
    ui.out.print(t)
    refused = [(g, c, why) for g, cs in doc["not_legal"].items() for c, why in cs.items()]
    if refused:
        g, c, why = refused[0]
        ui.out.print(f"{len(refused)} (layer, candidate) pairs the profile lists do not apply "
                     f"to their layer and are left out, e.g. {g} {c}: {why}")
    ui.out.print(f"{len(doc['layers'])} layers; per-layer costs of every legal candidate and "
                 "the reasons for the others: --json")


def cmd_measure(args: argparse.Namespace, ui: Any) -> int:
    from pathlib import Path

    from mpsearch.data.dataset import open_dataset
    from mpsearch.data.outputs import OutputDir
    from mpsearch.device.latency import measure_latency_table
    from mpsearch.graph.layer_graph import load_model
    from mpsearch.hw.profile import load_profile
    from mpsearch.hw.table_io import write_latency_table

    out = Path(args.out)
    base = Path(args.profile) if args.profile else (
        out if out.exists() else Path(__file__).resolve().parents[2] / "hw_profiles"
        / "ort_cpu.yaml")
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0")
    OutputDir(out.parent, inputs=[args.model, args.data], names=[out.name], flag="--out")
    profile = load_profile(base)
    model = load_model(args.model)
    data = open_dataset(args.data, model)
    with ui.progress("timing layers", None) as advance:
        table = measure_latency_table(model, data, profile, warmup=args.warmup,
                                      repeats=args.repeats, progress=advance,
                                      model_path=args.model)
    write_latency_table(base, table, out)
    load_profile(out)  # what was written must read back
    if ui.as_json:
        print(json.dumps({"profile": str(out), "layers": len(table.layers)}, indent=2))
    else:
        ui.out.print(f"wrote {out}: {len(table.layers)} layers timed ({table.source})")
    return 0
