"""How far the sensitivity estimates can be trusted (docs/design.md §3, issue "sensitivity").

    python benchmarks/sensitivity_quality.py [--models efficientnet_lite0,minilm] [--plans 20]

Per model, on the Snapdragon profile's six candidates (w8a8, w4a8, w8a16, w4a16, w16a16, fp16),
all errors on the calibration data against FP32:

1. single-group errors, Hessian-predicted against measured: Spearman rank correlation over all
   (group, candidate) pairs and within each candidate;
2. additivity on random mixed plans (a uniformly random candidate per group, seeded): the sum of
   the predicted single-group errors (and of the measured ones) against the measured output
   error of the exported plan;
3. the plans a solver would pick: for a sweep of Lagrange multipliers every group takes
   argmin error + λ·bit-operations (the convex hull of the front the ILP searches), exported
   and measured; predicted against measured SQNR, plain sum and corrected.

Writes benchmarks/results/sensitivity_quality.{md,json}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

from mpsearch import analyze, load_model, open_dataset, parse_candidate  # noqa: E402
from mpsearch.export.qdq import quantize  # noqa: E402
from mpsearch.graph.calibrate import make_session  # noqa: E402
from mpsearch.hw.cost import CostModel  # noqa: E402
from mpsearch.hw.profile import load_profile  # noqa: E402
from mpsearch.sensitivity.run import Method, estimate  # noqa: E402
from mpsearch.sensitivity.table import candidates_for, sqnr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CANDS = tuple(parse_candidate(c) for c in ("w8a8", "w4a8", "w8a16", "w4a16", "w16a16", "fp16"))


def _measure_plan(analysis, plan, batches, ref) -> float:
    sess = make_session(quantize(analysis, plan).model)
    names = [o.name for o in analysis.graph.model.graph.output]
    noise, count = 0.0, 0
    for b, r in zip(batches, ref, strict=True):
        for name, y in zip(names, sess.run(names, b), strict=True):
            d = r[name].astype(np.float64) - y
            noise += float(np.vdot(d.ravel(), d.ravel()))
            count += d.size
    return noise / count


def _sum(table, plan, which: str) -> float:
    src = table.predicted if which == "predicted" else table.measured
    return sum(src.get((g, c), 0.0) for g, c in plan.items())


def _db(signal: float, mse: float) -> float:
    return sqnr(signal, mse)


def run_model(name: str, n_plans: int, seed: int, save_dir: Path | None = None) -> dict:
    paths = prepare_example(name)
    model = load_model(paths["model"])
    cal = open_dataset(paths["calib"], model)
    t0 = time.perf_counter()
    analysis = analyze(model, cal, hessians=True)
    lg = analysis.graph
    profile = load_profile(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml")
    costs = CostModel(lg, profile)
    cands = candidates_for(lg, costs, CANDS)
    table = estimate(analysis, cal, cands, method=Method.BOTH)
    t_est = time.perf_counter() - t0
    print(f"{name}: {len(lg.group_names)} groups, sensitivities in {t_est:.0f} s", flush=True)

    keys = [k for k in table.pairs() if k in table.measured and k in table.predicted]
    m = np.array([table.measured[k] for k in keys])
    p = np.array([table.predicted[k] for k in keys])
    single = {"all": float(spearmanr(m, p).statistic)}
    for c in CANDS:
        idx = [i for i, k in enumerate(keys) if k[1] == c]
        if len(idx) > 2:
            single[c.name] = float(spearmanr(m[idx], p[idx]).statistic)
    log_ratio = np.log10(np.maximum(p, 1e-30) / np.maximum(m, 1e-30))
    # Bias per candidate: median log10(predicted / measured) over the groups where the
    # measured error is above float noise (a positive bias predicts too much error).
    bias = {}
    for c in CANDS:
        idx = [i for i, k in enumerate(keys) if k[1] == c and m[i] > 1e-9 * table.signal]
        if idx:
            bias[c.name] = float(np.median(log_ratio[idx]))
    if save_dir is not None:
        import json

        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / f"{name}.table.json").write_text(json.dumps(table.to_dict()))

    batches = tuple(cal.batches(analysis.options.batch_size))
    from mpsearch.sensitivity.suffix import reference_outputs

    ref = reference_outputs(lg, batches)
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n_plans):
        plan = {g: cands[g][int(rng.integers(len(cands[g])))] for g in lg.group_names}
        plans.append({"plan": plan, "kind": "random"})
    for _ in range(n_plans):  # closer to what a search keeps: half the groups at w8a8
        plan = {g: (parse_candidate("w8a8") if rng.random() < 0.5 and
                    parse_candidate("w8a8") in cands[g]
                    else cands[g][int(rng.integers(len(cands[g])))]) for g in lg.group_names}
        plans.append({"plan": plan, "kind": "random-8bit"})
    # The solver's picks: per-group argmin error + lambda * BOPs (relative to w8a8), swept.
    ref_bops = sum(costs.layer(g, parse_candidate("w8a8")).bops for g in lg.group_names)
    seen = set()
    for lam_db in np.linspace(-6, 2, 33):
        lam = 10.0**lam_db * table.signal
        plan = {}
        for g in lg.group_names:
            plan[g] = min(cands[g], key=lambda c, g=g: table.error(g, c)
                          + lam * costs.layer(g, c).bops / ref_bops)
        key = tuple(plan[g].name for g in lg.group_names)
        bops = sum(costs.layer(g, c).bops for g, c in plan.items()) / ref_bops
        if key in seen or not 0.45 <= bops <= 1.3:
            continue
        seen.add(key)
        plans.append({"plan": plan, "kind": "solver", "bops": bops})
    for entry in plans:
        entry["measured"] = _measure_plan(analysis, entry["plan"], batches, ref)
        entry["sum_predicted"] = _sum(table, entry["plan"], "predicted")
        entry["sum_measured"] = _sum(table, entry["plan"], "measured")
        entry.setdefault("bops", sum(costs.layer(g, c).bops for g, c in entry["plan"].items())
                         / ref_bops)
    rand = [e for e in plans if e["kind"] == "random"]
    rand8 = [e for e in plans if e["kind"] == "random-8bit"]
    solver = [e for e in plans if e["kind"] == "solver"]

    def rho(es, key):
        return float(spearmanr([e[key] for e in es], [e["measured"] for e in es]).statistic) \
            if len(es) > 2 else math.nan

    # Where the sum and the measurement part: errors compound (a layer quantizes an input that
    # is already wrong), so the output error grows faster than the sum S of single-group
    # errors. Model: mse = S + k * S^2 / signal, k >= 0 fitted in log space on the random
    # plans; monotone in S, so it changes the predicted SQNR of a plan, not which plan a
    # sum-minimising solver prefers.
    corrections = {}
    for which in ("predicted", "measured"):
        sums = np.array([e[f"sum_{which}"] for e in rand])
        meas = np.array([e["measured"] for e in rand])
        ks = np.concatenate([[0.0], np.logspace(-4, 3, 141)])
        errs = [np.mean((np.log10(sums + k * sums**2 / table.signal) - np.log10(meas)) ** 2)
                for k in ks]
        k = float(ks[int(np.argmin(errs))])
        corrections[which] = k
        for e in plans:
            ssum = e[f"sum_{which}"]
            e[f"corrected_{which}"] = ssum + k * ssum**2 / table.signal
    return {"model": name, "groups": len(lg.group_names), "pairs": len(keys),
            "fit_alpha": table.fit.alpha if table.fit else None,
            "fit_log10_spread": table.fit.log_spread if table.fit else None,
            "single_spearman": single,
            "median_abs_log10_error": float(np.median(np.abs(log_ratio))),
            "log10_bias_per_candidate": bias,
            "signal": table.signal, "seconds_estimate": t_est,
            "random_spearman_predicted": rho(rand, "sum_predicted"),
            "random_spearman_measured_sum": rho(rand, "sum_measured"),
            "random8_spearman_predicted": rho(rand8, "sum_predicted"),
            "random8_spearman_measured_sum": rho(rand8, "sum_measured"),
            "solver_spearman_predicted": rho(solver, "sum_predicted"),
            "corrections": corrections,
            "plans": [{k: (v if k != "plan" else {g: c.name for g, c in v.items()})
                       for k, v in e.items()} for e in plans]}


def _fmt_plans(res: dict) -> str:
    s = res["signal"]
    rows = []
    for e in res["plans"]:
        if e["kind"] != "solver":
            continue
        rows.append([f"{e['bops']:.2f}", f"{_db(s, e['measured']):.2f}",
                     f"{_db(s, e['sum_predicted']):.2f}", f"{_db(s, e['sum_measured']):.2f}",
                     f"{_db(s, e['corrected_predicted']):.2f}",
                     f"{_db(s, e['corrected_measured']):.2f}"])
    return markdown_table(["BOPs vs w8a8", "measured dB", "sum predicted dB",
                           "sum measured-single dB", "corrected predicted dB",
                           "corrected measured-single dB"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,minilm")
    ap.add_argument("--plans", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-tables", type=Path, default=None,
                    help="also write each model's sensitivity table (JSON) into this folder")
    args = ap.parse_args()
    results = []
    for n in args.models.split(","):
        results.append(run_model(n, args.plans, args.seed, args.save_tables))
        _report(results)


def _report(results: list[dict]) -> None:
    header = ["model", "Spearman single (all pairs)", *[f"within {c.name}" for c in CANDS],
              "random plans: sum predicted", "random plans: sum measured-single",
              "half-w8a8 random plans: sum predicted", "half-w8a8: sum measured-single",
              "solver plans: sum predicted", "fit alpha"]
    rows = [[r["model"], f"{r['single_spearman']['all']:.3f}",
             *[f"{r['single_spearman'].get(c.name, math.nan):.3f}" for c in CANDS],
             f"{r['random_spearman_predicted']:.3f}", f"{r['random_spearman_measured_sum']:.3f}",
             f"{r['random8_spearman_predicted']:.3f}",
             f"{r['random8_spearman_measured_sum']:.3f}",
             f"{r['solver_spearman_predicted']:.3f}", f"{r['fit_alpha']:.2f}"]
            for r in results]
    table = markdown_table(header, rows)
    notes = []
    for r in results:
        notes.append(f"## {r['model']}: the plans a solver picks (Lagrangian sweep over "
                     f"bit-operations), predicted against measured output SQNR\n\n"
                     + _fmt_plans(r)
                     + "\n\nCompounding correction mse = S + k S^2 / signal, k fitted on the "
                     f"random plans: k = {r['corrections']['predicted']:.3g} for the predicted "
                     f"sum, {r['corrections']['measured']:.3g} for the measured-single sum."
                     + "\n\nBias of the single-group prediction per candidate, median "
                     "log10(predicted / measured): " + ", ".join(
                         f"{c} {v:+.2f}" for c, v in r["log10_bias_per_candidate"].items()))
    print(table)
    print("\n\n".join(notes))
    write_results("sensitivity_quality", title="Sensitivity estimates against measurement",
                  command="python benchmarks/sensitivity_quality.py", table=table,
                  payload=results, notes="\n\n".join(notes), git=True)


if __name__ == "__main__":
    main()
