"""``mpsearch report RUN_DIR``: rebuild ``report.html`` (and its PNGs) from a run's files."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "report", parents=[common],
        help="rebuild report.html from a run folder's files",
        description="Read RUN_DIR/plan.json (and sensitivity.json, verify.json and the "
                    "hardware profile it names, where they exist) and write one "
                    "self-contained HTML page: the Pareto front, the baselines, the per-layer "
                    "allocation, the sensitivity heatmap, the plan table, the ops left in float "
                    "and the verification results. The plots are also written as PNGs beside "
                    "the page. Nothing is loaded from the network.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of 'mpsearch run'")
    s.add_argument("--out", metavar="HTML",
                   help="where to write the page (default RUN_DIR/report.html); the PNGs go "
                        "beside it")
    s.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace, ui: Any) -> int:
    from mpsearch.report.html import build_report

    path = build_report(args.run_dir, out=args.out)
    if ui.as_json:
        print(json.dumps({"report": str(path)}, indent=2))
    elif not ui.quiet:
        ui.out.print(f"wrote {path}")
    return 0
