"""``mpsearch verify``: compile a quantized model for the target with CPU fallback disabled, say
which nodes the target took (and why not the others), and compare its outputs with ONNX
Runtime's CPU EP. Exit 0: compiled with every node on the target; 1: it did not; 2: bad input."""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from typing import Any

from mpsearch.cli.args import parse_shapes
from mpsearch.core.errors import UsageError
from mpsearch.device.verify import MIN_SQNR_DB

EXIT_NOT_ON_TARGET = 1
EXIT_DISAGREES = 3


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "verify", parents=[common],
        help="compile a quantized model for the device and compare it with the CPU EP",
        description="Fix the model's dynamic input dims (a copy; the batch to 1), compile it "
                    "with Qualcomm's HTP compiler through ONNX Runtime's QNN execution "
                    "provider with CPU fallback disabled (on x86 the HTP runs in emulation), "
                    "report which nodes it took and the compiler's reasons for any it refused, "
                    "then run the first --samples samples on the HTP and on ORT's CPU EP and "
                    "report per output SQNR (dB) and cosine. Exit 0 when every node runs on the "
                    "target and every output agrees at --min-sqnr-db or better (verified), 1 "
                    "when the model does not fully compile, 3 when an output disagrees, 2 on "
                    "bad input.")
    s.add_argument("model", help="quantized (QDQ) ONNX model, e.g. OUT/model.qdq.onnx "
                                 "(not modified)")
    s.add_argument("--target", choices=["qnn-htp"], default="qnn-htp",
                   help="the compiler and device (default qnn-htp)")
    s.add_argument("--soc", type=int, default=57, metavar="N",
                   help="QNN soc_model: 57 = SM8650 / 8 Gen 3 (v75, default), 60 = SC8380XP "
                        "(v73), 69 = SM8750 (v79), 30 = SM8350 (v68)")
    s.add_argument("--data", required=True, metavar="EVAL",
                   help=".npz (keys = input names, axis 0 = samples), or a folder of .npz/.npy")
    s.add_argument("--input-shape", action="append", metavar="NAME=D,D,...",
                   help="static shape of an input (repeatable; default: dynamic batch 1, other "
                        "dynamic dims from the first sample)")
    s.add_argument("--samples", type=int, default=8, metavar="N",
                   help="samples run on both (default 8; emulation is 100-250x slower than "
                        "the CPU EP)")
    s.add_argument("--min-sqnr-db", type=float, default=MIN_SQNR_DB, metavar="DB",
                   help="every output must agree with the CPU EP at DB or better to count as "
                        f"verified (default {MIN_SQNR_DB:g})")
    s.add_argument("--out", metavar="FILE", help="also write the document as JSON to FILE "
                                                  "(e.g. verify.json)")
    s.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace, ui: Any) -> int:
    from pathlib import Path

    from mpsearch.data.outputs import OutputDir
    from mpsearch.device.verify import ChildCrashed, in_child, verify_in_child

    if args.samples < 1:
        raise UsageError(f"--samples {args.samples} is not a positive number",
                         fix="pass --samples 1 or more")
    shapes = parse_shapes(args.input_shape)
    od = None
    if args.out:
        out = Path(args.out)
        od = OutputDir(out.parent, inputs=[args.model, args.data], names=[out.name],
                       flag="--out")
    t0 = time.perf_counter()
    with ui.progress(f"running {args.samples} samples on {args.target} (emulated) and the "
                     "CPU EP", None):
        result = verify_in_child(args.model, data=args.data, target=args.target,
                                 soc_model=args.soc, input_shapes=shapes, samples=args.samples,
                                 min_sqnr_db=args.min_sqnr_db)
    doc = result.to_dict()
    culprit = None
    if result.fully_on_target and not result.agrees:
        from mpsearch.device.localize import localize
        from mpsearch.device.verify import static_model
        from mpsearch.graph.ingest import load_model

        with ui.progress("finding where the HTP departs from the CPU", None):
            device_model, _ = static_model(load_model(args.model), data=args.data,
                                           input_shapes=shapes)
            try:
                culprit = in_child(localize, device_model, data=args.data, soc_model=args.soc,
                                   min_sqnr_db=result.min_sqnr_db)
            except ChildCrashed:
                ui.note("the QNN EP crashed compiling the probe model: no culprit named")
    doc["culprit"] = culprit.to_dict() if culprit is not None else None
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    if od is not None:
        od.write_json(Path(args.out).name, doc)
    code = 0 if result.verified else EXIT_NOT_ON_TARGET if not result.fully_on_target \
        else EXIT_DISAGREES
    if ui.as_json:
        print(json.dumps(doc, indent=2))
        return code
    _print(ui, result, doc, args)
    return code


def _db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.2f}"


def _print(ui: Any, result, doc: dict, args: argparse.Namespace) -> None:
    from rich.table import Table

    n = result.nodes
    for f in result.shapes_fixed:
        ui.out.print(f"fixed dynamic dim {f.describe()} (the HTP needs static shapes)")
    where = f"{args.target} soc_model {result.soc_model}"
    if not result.compiled:
        ui.out.print(f"[bold red]did not compile[/] for {where}: {len(n.not_on_target)} "
                     f"node(s) refused, of {n.total} in the model")
        by_reason: dict[str, list[str]] = {}
        for r in n.not_on_target:
            # one line per kind of refusal: the node's own (or QNN's derived) name hidden
            key = re.sub(rf"`[^`]*{re.escape(r['node'])}[^`]*`", "`...`", r["reason"])
            by_reason.setdefault(key, []).append(f"{r['node']} ({r['op_type']})")
        for reason, nodes in by_reason.items():
            shown = ", ".join(nodes[:6]) + (f" and {len(nodes) - 6} more" if len(nodes) > 6
                                             else "")
            ui.out.print(f"reason: {reason} [{len(nodes)} node(s): {shown}]", markup=False)
        if not by_reason:
            for reason in result.reasons:
                ui.out.print(f"reason: {reason}", markup=False)
        ui.out.print("every node and message: " + (args.out or "--json or --out verify.json"))
        return
    t = Table(title=f"{args.model} on {where} against ORT's CPU EP, {result.samples} samples")
    for col in ("output", "SQNR dB", "cosine"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for o in result.outputs:
        t.add_row(o.name, _db(o.sqnr_db), f"{o.cosine:.5f}")
    ui.out.print(t)
    ops = ", ".join(f"{k} x{v}" for k, v in n.by_op.items())
    state = ("every node on QNN" if result.fully_on_target
             else "[bold red]not every node on QNN[/]")
    if result.fully_on_target and not result.agrees:
        names = ", ".join(o.name for o in result.disagreeing) or "none ran"
        state += (f", [bold red]but not verified[/]: outputs below {result.min_sqnr_db:g} dB "
                  f"against the CPU EP: {names}")

    elif result.verified:
        state = f"verified (every output at {result.min_sqnr_db:g} dB or better): " + state
    ui.out.print(f"{state}: {n.on_target}/{n.total} nodes of the compiled graph ({ops})")
    if doc.get("culprit"):
        ui.out.print(f"where: {doc['culprit']['description']}", markup=False)
    for r in n.not_on_target:
        ui.out.print(f"not on QNN: {r['node']} ({r['op_type']}): {r['reason']}")
    ui.out.print(f"compiled in {result.compile_seconds:.1f} s; worst output "
                 f"{_db(result.sqnr_db)} dB; {doc['seconds']} s in all"
                 + (f"; wrote {args.out}" if args.out else ""))
