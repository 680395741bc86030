"""``mpsearch pareto``: the Pareto front of quality against one cost, without choosing a plan."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from mpsearch.cli.args import add_options, search_config
from mpsearch.cli.ui import Ui

__all__ = ["PARETO_OUTPUTS", "cmd_pareto", "register"]

PARETO_OUTPUTS = ("pareto.json", "pareto.csv", "pareto.png")
FRONT_POINTS = 6  # measured along the front (run measures 2, near its budget)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "pareto", parents=[common],
        help="the Pareto front of quality against one cost, without choosing a plan",
        description="Like run, but writes only the front over --metric: OUT/pareto.json, "
                    "OUT/pareto.csv and OUT/pareto.png; --front-points of it (default "
                    f"{FRONT_POINTS}, spread along it) are measured. With no budget to choose "
                    "a plan for, no shortlist is measured and nothing is polished.")
    add_options(s, "pareto")
    s.add_argument("--metric", choices=["latency", "bops", "size", "energy"],
                   default="latency", help="the cost axis (default latency)")
    s.set_defaults(func=cmd_pareto)


def cmd_pareto(args: argparse.Namespace, ui: Ui) -> int:
    from mpsearch.data.outputs import OutputDir
    from mpsearch.job.document import plan_document
    from mpsearch.job.search import SearchData, search
    from mpsearch.report.pareto import front_plot

    # A budget no plan can exceed, so the front spans every plan.
    cfg = search_config(args, "pareto", fixed={
        "budgets": [f"{args.metric}=1e9"],
        "refinement": {"select": False, "polish": 0},
        "measurement": {"enabled": True, "front_points": FRONT_POINTS}})
    inputs = [args.model, args.data, args.hw] + ([args.eval_data] if args.eval_data else [])
    out = OutputDir(args.out, inputs=inputs, names=list(PARETO_OUTPUTS), flag="--out")
    try:
        res = search(args.model, args.hw, SearchData(calibration=args.data,
                                                     evaluation=args.eval_data),
                     cfg, progress=ui.progress)
        doc = plan_document(res, model=str(args.model), profile=str(args.hw))
        front_doc = {"schema": "mpsearch.pareto/1", "model": doc["model"],
                     "profile": doc["profile"], "front": doc["front"],
                     "baselines": doc["baselines"]}
        out.write_json("pareto.json", front_doc)

        def csv(p: Any) -> None:
            import pandas as pd

            rows = [{"relative_to_w8a8": q["relative_to_w8a8"], "cost": q["cost"],
                     "predicted_sqnr_db": q["predicted_sqnr_db"], "source": q["source"]}
                    for q in doc["front"]["points"]]
            pd.DataFrame(rows).to_csv(p, index=False)

        out.write_with("pareto.csv", csv)
        out.write_with("pareto.png", lambda p: front_plot(doc, p))
    except BaseException:
        out.rollback()
        raise
    if ui.as_json:
        print(json.dumps(front_doc, indent=2))
        return 0
    for q in doc["front"]["points"]:
        db = q["predicted_sqnr_db"]
        shown = (f"{db:.2f} dB" if db is not None and math.isfinite(db) and db < 99
                 else "> 99 dB (no error the predictions can measure; capped)")
        ui.out.print(f"{args.metric} x{q['relative_to_w8a8']:.3f}: predicted {shown}")
    ui.out.print(f"wrote {out.path}/pareto.json, pareto.csv, pareto.png")
    return 0
