"""``mpsearch sensitivity``: per group and candidate, the output error, measured and/or predicted
from the layer Hessian; writes sensitivity.csv, sensitivity.json and sensitivity.png."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from mpsearch.core.errors import UsageError

log = logging.getLogger(__name__)

OUTPUTS = ("sensitivity.csv", "sensitivity.json", "sensitivity.png")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "sensitivity", parents=[common],
        help="how much each layer suffers in each candidate format",
        description="For every quantizer group and every candidate the profile allows it, the "
                    "network-output error (MSE and SQNR against FP32 on the calibration data) "
                    "when that group alone takes that candidate: measured by running the "
                    "exported single-group model, or predicted from the layer Hessian "
                    "H = 2 E[x x^T] (plus a scale fitted on 2 measured runs), or both. "
                    "Writes OUT/sensitivity.csv, OUT/sensitivity.json and a heatmap "
                    "OUT/sensitivity.png. Results are cached (--cache-dir): a re-run with the "
                    "same model, data and settings returns at once, and an interrupted run "
                    "resumes where it stopped.")
    s.add_argument("model", help="FP32 ONNX model file (not modified)")
    s.add_argument("--hw", required=True, metavar="PROFILE",
                   help="hardware profile YAML (its legal candidates per op are scored)")
    s.add_argument("--data", required=True, metavar="CALIB",
                   help=".npz (keys = input names, axis 0 = samples), or a folder of .npz/.npy")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--method", choices=["measured", "hessian", "both"], default="hessian",
                   help="measured: run every (group, candidate), exact and slow (about 2 min "
                        "for EfficientNet-Lite0's 300); hessian: predict from the layer "
                        "Hessian, seconds (default); both: side by side")
    s.add_argument("--candidates", metavar="LIST",
                   help="comma-separated subset of the profile's candidates to score, e.g. "
                        "w8a8,w4a8,w8a16 (default: all the profile allows per op)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes that measure in parallel (default 1; each gets cores/N "
                        "ONNX Runtime threads)")
    s.add_argument("--cache-dir", metavar="DIR",
                   help="where results are cached (default $XDG_CACHE_HOME/mpsearch or "
                        "~/.cache/mpsearch)")
    s.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    s.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="samples per ONNX Runtime call in calibration and measurement "
                        "(default 8)")
    s.set_defaults(func=cmd_sensitivity)


def _options(args: argparse.Namespace):
    from mpsearch.quant.analysis import QuantizeOptions

    opts = QuantizeOptions()
    if args.batch_size:
        opts = dataclasses.replace(opts, batch_size=args.batch_size)
    return opts


def cmd_sensitivity(args: argparse.Namespace, ui: Any) -> int:
    from mpsearch.core.formats import parse_candidate
    from mpsearch.data.dataset import open_dataset
    from mpsearch.data.outputs import OutputDir
    from mpsearch.graph.ingest import prepare_model
    from mpsearch.graph.layer_graph import build_layer_graph, load_model
    from mpsearch.hw.cost import CostModel
    from mpsearch.hw.profile import load_profile
    from mpsearch.quant.analysis import analyze
    from mpsearch.sensitivity.cache import SensitivityCache
    from mpsearch.sensitivity.run import Method, estimate, table_variant
    from mpsearch.sensitivity.table import SensitivityTable, candidates_for

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers} is not a positive number",
                         fix="pass --workers 1 or more")
    method = Method(args.method)
    only = None
    if args.candidates:
        only = tuple(parse_candidate(c.strip()) for c in args.candidates.split(",") if c.strip())
    out = OutputDir(args.out, inputs=[args.model, args.data, args.hw], names=list(OUTPUTS),
                    flag="--out")
    try:
        t0 = time.perf_counter()
        model = load_model(args.model)
        profile = load_profile(args.hw)
        calib = open_dataset(args.data, model, batch_size=args.batch_size, name="calibration")
        opts = _options(args)
        first = next(calib.batches(1), None)
        shapes = {k: v.shape for k, v in first.items()} if first else None  # batch 1
        lg = build_layer_graph(prepare_model(model), input_shapes=shapes, prepared=True)
        cands = candidates_for(lg, CostModel(lg, profile), only)
        if only is not None and not any(cands.values()):
            raise UsageError(f"none of --candidates {args.candidates} is legal for any layer "
                             f"on {profile.name}",
                             fix="pick from the candidates 'mpsearch hw show' lists")
        cache = None
        if not args.no_cache:
            cache = SensitivityCache.for_settings(args.cache_dir, model=model,
                                                  batches=calib.batches(opts.batch_size),
                                                  options=opts, seed=0)
        variant = table_variant(method, cands)
        cached = cache.table(variant) if cache is not None else None
        if cached is not None:
            table = SensitivityTable.from_dict(cached)
            ui.note(f"sensitivity from the cache {cache.path}")
        else:
            with ui.progress("calibrating", len(calib)) as advance:
                analysis = analyze(model, calib, options=opts,
                                   hessians=method is not Method.MEASURED, progress=advance)
            total = sum(len(v) for v in cands.values())
            with ui.progress(f"sensitivity ({method.value})", total) as advance:
                table = estimate(analysis, calib, cands, method=method, workers=args.workers,
                                 cache=cache, progress=advance)
            if cache is not None:
                cache.save_table(variant, table.to_dict())
        _write(out, table, lg, args, method, cache)
        seconds = round(time.perf_counter() - t0, 2)
    except BaseException:
        out.rollback()
        raise
    summary = _summary(table, lg)
    if ui.as_json:
        print(json.dumps({"out": str(out.path), "seconds": seconds, "cached": cached is not None,
                          "candidates": summary}, indent=2))
        return 0
    _print(ui, summary, out, seconds, method)
    return 0


def _write(out, table, lg, args: argparse.Namespace, method, cache=None) -> None:
    from mpsearch.sensitivity.document import sensitivity_document, write_csv

    out.write_with("sensitivity.csv", lambda p: write_csv(p, table, lg))
    out.write_json("sensitivity.json", sensitivity_document(
        table, model=args.model, profile=args.hw, data=args.data, method=method))
    _write_heatmap(out, table, cache)


def _write_heatmap(out, table, cache) -> None:
    """sensitivity.png, copied from the cache where it holds the same picture."""
    from mpsearch.report.heatmap import heatmap_key, sensitivity_heatmap

    key = heatmap_key(table) if cache is not None else None
    png = cache.file(key, ".png") if key is not None else None
    if png is not None:
        out.write_with("sensitivity.png", lambda p: Path(p).write_bytes(png))
        return
    path = out.write_with("sensitivity.png", lambda p: sensitivity_heatmap(table, p))
    if key is not None:
        try:
            cache.save_file(key, ".png", path.read_bytes())
        except OSError as e:  # only a re-run's shortcut: not worth failing this run for
            log.warning("could not keep the heatmap in the cache %s (%s)", cache.path,
                        e.strerror)


def _summary(table, lg) -> list[dict]:
    by: dict = {}
    for g in table.groups:
        for c in table.candidates[g]:
            by.setdefault(c, []).append((table.sqnr_db(g, c), g))
    out = []
    for c, vals in by.items():
        vals.sort()
        dbs = [v for v, _ in vals]
        out.append({"candidate": c.name, "groups": len(vals),
                    "median_sqnr_db": round(dbs[len(dbs) // 2], 2),
                    "worst_sqnr_db": round(dbs[0], 2), "worst_group": vals[0][1]})
    return out


def _print(ui: Any, summary: list[dict], out, seconds: float, method) -> None:
    from rich.table import Table

    t = Table(title=f"single-group output SQNR ({method.value}), dB")
    for col in ("candidate", "groups", "median", "worst", "worst group"):
        t.add_column(col, justify="left" if col in ("candidate", "worst group") else "right")
    for s in summary:
        t.add_row(s["candidate"], str(s["groups"]), f"{s['median_sqnr_db']:.1f}",
                  f"{s['worst_sqnr_db']:.1f}", s["worst_group"])
    ui.out.print(t)
    ui.out.print(f"wrote {', '.join(str(out.path / n) for n in OUTPUTS)} in {seconds} s")
