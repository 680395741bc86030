"""Precision and sparsity together against precision alone, on EfficientNet-Lite0.

    python benchmarks/joint_front.py

Two devices, the budget each cares about:

* NVIDIA H100 (hw_profiles/nvidia_h100.yaml), 6 latency budgets (x the all-int8 plan): the
  joint search may also give Conv/Gemm layers int8 or fp8 with 2:4 sparsity (2x tensor-core
  rate, 2 metadata bits per kept weight);
* Snapdragon 8 Gen 3 (hw_profiles/snapdragon_8gen3.yaml), 6 weight-size budgets (x w8a8): the
  joint search may also prune half or three quarters of a layer's weights (unstructured, memory
  savings only: QNN HTP's sparse weights compression).

Per device and mode (precision only: ``sparsity="none"``; joint: ``sparsity="2:4"`` or
``"unstructured"``) one search (Hessian sensitivities) gives the allocation problem; the exact
ILP is then solved at each budget on it, and every plan is exported and measured on the 200
held-out evaluation crops against FP32 (SQNR of the logits, top-1 agreement). Without
refinement rounds (``refine=0``) and without the measured shortlist (``select=False``): both
are driven by the plan found at one budget, and a joint run's rounds measure other pairs than
a precision-only run's, which moved its dense errors and made it pick other dense plans (a
first run with ``refine=3``: -0.45 dB at size 0.6 with no layer pruned). So the dense
candidates' errors are the same in both modes, the joint problem is a superset of the
precision-only one, and any difference comes from the pruned candidates.

Writes benchmarks/results/joint_front.{md,json}.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

from mpsearch import InfeasibleBudgetError, SearchConfig, open_dataset, search  # noqa: E402
from mpsearch.export.qdq import quantize  # noqa: E402
from mpsearch.graph.evaluate import evaluate, reference_run  # noqa: E402
from mpsearch.job.config import (  # noqa: E402
    CacheConfig,
    CandidateConfig,
    MeasureConfig,
    RefinementConfig,
)
from mpsearch.sensitivity.table import sqnr  # noqa: E402
from mpsearch.solve.allocate import allocate  # noqa: E402
from mpsearch.solve.budget import parse_budgets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTES = (
    "Where joint does not help, and why. H100: EfficientNet-Lite0 at batch 1 is launch-bound "
    "on the profile's roofline (3 us per layer x 50 layers = 150 of the 155 us; its 0.39 GMACs "
    "take 0.4 us at the int8 peak), so 2:4 can save at most ~0.3% latency while pruning half "
    "of a layer costs far more error than any format change buys: the joint ILP never prunes, "
    "its plans equal the precision-only ones, and only budgets in the sliver between the two "
    "smallest reachable latencies (0.9964 joint, 0.9976 precision only) have a joint plan and "
    "no precision-only one. 2:4 would pay on a compute-bound workload (large batch, large "
    "layers). Snapdragon: below uniform w4 (size 0.509) only pruning fits, and at 0.52 a few "
    "pruned layers let sensitive layers keep 8 or 16 bits (+1.3 dB); from 0.6 up, int4 is "
    "cheaper per bit of error than 50% pruning with its metadata (w8 at half density costs 5 "
    "bits per weight, w4 dense 4), as Kuzmin et al. (2023) found, and the joint plans equal "
    "the precision-only ones. Both fronts are the ILP on Hessian predictions without "
    "refinement (see the module docstring). H100 at 0.997, the one budget inside that "
    "sliver: only joint has a plan (13 layers at 2:4), at 11.15 dB.")
DEVICES = (
    # (name, profile, sparsity of the joint mode, budget metric, budgets, the searches' budget)
    ("H100", "nvidia_h100.yaml", "2:4", "latency",
     (0.995, 0.997, 0.998, 1.0, 1.005, 1.01, 1.02), 1.005),
    ("Snapdragon 8 Gen 3", "snapdragon_8gen3.yaml", "unstructured", "size",
     (0.3, 0.4, 0.52, 0.6, 0.75, 0.9), 0.6),
)


def ilp_plans(p, profile: Path, sparsity: str, metric: str, budgets, at: float, cache: str,
              gating: str | None = None):
    """One search (``gating``: its Bayesian-Bits sweeps, if any), then the ILP at every budget
    on its problem: (the search, budget -> plan or None, seconds, the smallest reachable
    value)."""
    t0 = time.perf_counter()
    cfg = SearchConfig(budgets=(f"{metric}={at}",),
                       candidates=CandidateConfig(sparsity=sparsity, gating=gating),
                       refinement=RefinementConfig(rounds=0, select=False),
                       measurement=MeasureConfig(enabled=False, front_points=0),
                       cache=CacheConfig(dir=cache))
    res = search(p["model"], profile, p["calib"], cfg)
    out = {}
    for b in budgets:
        try:
            alloc = allocate(res.built.problem, res.costs, parse_budgets([f"{metric}={b}"]))
            out[b] = dict(alloc.plan)
        except InfeasibleBudgetError:
            out[b] = None
    try:  # the error names the smallest value any plan reaches
        allocate(res.built.problem, res.costs, parse_budgets([f"{metric}=1e-6"]))
        floor = None
    except InfeasibleBudgetError as e:
        floor = e.problem.split("smallest reachable ")[-1].rstrip(")")
    return res, out, time.perf_counter() - t0, floor


def main() -> None:
    p = prepare_example("efficientnet_lite0")
    rows, payload, floors = [], [], []
    with tempfile.TemporaryDirectory() as cache:
        for device, fname, sparsity, metric, budgets, at in DEVICES:
            profile = ROOT / "hw_profiles" / fname
            modes = {}
            for mode, sp in (("precision", "none"), ("joint", sparsity)):
                modes[mode] = ilp_plans(p, profile, sp, metric, budgets, at, cache)
            res = modes["precision"][0]
            ds = open_dataset(p["eval"], res.analysis.original, name="evaluation")
            fp32 = reference_run(res.analysis.original, ds.batches(res.analysis.options
                                                                   .batch_size))
            key = {"latency": "latency_s", "size": "weight_bytes"}[metric]
            for b in budgets:
                rec = {"device": device, "metric": metric, "budget": b}
                for mode, (r, plans, secs, _) in modes.items():
                    plan = plans[b]
                    if plan is None:
                        rec[mode] = None
                        continue
                    cost = r.costs.plan(plan)
                    m = evaluate(r.analysis.original, quantize(r.analysis, plan).model,
                                 labels=ds.labels, reference_outputs=fp32).primary
                    counts: dict[str, int] = {}
                    for c in plan.values():
                        counts[c.name] = counts.get(c.name, 0) + 1
                    rec[mode] = {"sqnr_db": m.sqnr_db, "top1": m.top1_agreement,
                                 "relative": cost.relative[key],
                                 "predicted_db": sqnr(r.table.signal,
                                                      r.built.predicted_error(plan)),
                                 "sparse_layers": sum(c.sparsity is not None
                                                      for c in plan.values()),
                                 "plan": dict(sorted(counts.items())),
                                 "search_seconds": secs}
                pr, jt = rec["precision"], rec["joint"]
                if jt is None:
                    verdict = "both infeasible" if pr is None else "joint infeasible"
                elif pr is None:
                    verdict = "only joint fits"
                else:
                    d = jt["sqnr_db"] - pr["sqnr_db"]
                    verdict = f"{d:+.2f} dB"
                rec["verdict"] = verdict
                payload.append(rec)

                def cell(r):
                    if r is None:
                        return "no plan fits"
                    t = f"{100 * r['top1']:.1f}%" if r["top1"] is not None else "-"
                    return f"{r['sqnr_db']:.2f} dB / {t} at {r['relative']:.3f}"

                rows.append([device, f"{metric}={b}", cell(pr), cell(jt),
                             str(jt["sparse_layers"]) if jt else "-", verdict,
                             ", ".join(f"{k} x{v}" for k, v in jt["plan"].items())
                             if jt else "-"])
                print(" | ".join(rows[-1]), flush=True)
            for mode, (r, _, secs, floor) in modes.items():
                floors.append(f"{device} {mode}: {floor}")
                payload.append({"device": device, "mode": mode, "search_seconds": secs,
                                "smallest_reachable": floor,
                                "candidates": sorted({c.name for cs in
                                                      r.table.candidates.values()
                                                      for c in cs}),
                                "refinement_rounds": list(r.refinement.rounds)})
    print("smallest reachable: " + "; ".join(floors))
    table = markdown_table(["device", "budget (x int8)", "precision only: SQNR / top-1 at cost",
                            "joint: SQNR / top-1 at cost", "pruned layers",
                            "joint - precision", "joint plan"], rows)
    print(table)
    write_results("joint_front", title="Precision and sparsity together against precision "
                  "alone, EfficientNet-Lite0", command="python benchmarks/joint_front.py",
                  table=table, payload=payload, git=True,
                  notes="Measured on the 200 evaluation crops against FP32 (ONNX Runtime CPU "
                        "running the exported QDQ models; the costs are the profiles' "
                        "models, not device timings). " + NOTES)


if __name__ == "__main__":
    main()
