"""OBS (SparseGPT) pruning against magnitude pruning on EfficientNet-Lite0, one conv at a time.

    python benchmarks/pruning.py [--fit N]

The example's 64 calibration crops are split: the first ``N`` (48) give the layer Hessians the
pruning uses, the other 16 are held out. For every Conv, at 50% and 75% unstructured sparsity
and 2:4 (float survivors), the relative layer-output error ``‖δW X‖² / ‖W X‖²`` of OBS,
of the Hessian diagonal (Wanda's ``|w|·‖x_j‖``, 50% only) and of magnitude pruning. Measured on
the held-out crops: with ``H_B = X_B X_Bᵀ / n`` of their im2col columns (the output positions
:mod:`mpsearch.graph.layer_hessian` samples), ``tr(δW H_B δWᵀ) = ‖δW X_B‖² / n`` exactly; and on the
fit crops (the error OBS minimises, the ``predicted_error`` of ``prune_layer``). No bias
correction: ``E[x xᵀ]``, not the covariance. Writes benchmarks/results/pruning.*.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402
from rounding import op_kind  # noqa: E402

from mpsearch import load_model, open_dataset  # noqa: E402
from mpsearch.core.formats import Sparsity  # noqa: E402
from mpsearch.graph.calibrate import run_collectors  # noqa: E402
from mpsearch.graph.ingest import prepare_model  # noqa: E402
from mpsearch.graph.layer_graph import build_layer_graph  # noqa: E402
from mpsearch.graph.layer_hessian import HessianCollector, LayerHessian  # noqa: E402
from mpsearch.quant.layout import weight_rows  # noqa: E402
from mpsearch.quant.prune import PrunedLayer, PruneMethod, prune_layer  # noqa: E402
from mpsearch.quant.rounding import output_error  # noqa: E402

SPARSITY = {"50%": Sparsity(pattern="unstructured", density=0.5),
            "75%": Sparsity(pattern="unstructured", density=0.25),
            "2:4": Sparsity(pattern="2:4", density=0.5)}
RUNS = (("50%", PruneMethod.MAGNITUDE), ("50%", PruneMethod.DIAGONAL), ("50%", PruneMethod.OBS),
        ("75%", PruneMethod.MAGNITUDE), ("75%", PruneMethod.OBS),
        ("2:4", PruneMethod.MAGNITUDE), ("2:4", PruneMethod.OBS))


def _rel(rows: np.ndarray, delta: np.ndarray, h: LayerHessian) -> float:
    return float(output_error(delta, h.second).sum() / output_error(rows, h.second).sum())


def run(n_fit: int) -> dict:
    paths = prepare_example("efficientnet_lite0")
    model = load_model(paths["model"])
    cal = open_dataset(paths["calib"], model)
    if not 0 < n_fit < len(cal):
        raise SystemExit(f"--fit must be in 1..{len(cal) - 1}")
    fit, held = cal.take(range(n_fit)), cal.take(range(n_fit, len(cal)))
    t_start = time.perf_counter()
    prepared = prepare_model(model)
    first = next(cal.batches(1))
    lg = build_layer_graph(prepared, input_shapes={k: (1, *v.shape[1:])
                                                   for k, v in first.items()}, prepared=True)
    names = [n for n, x in lg.layers.items() if x.op_type == "Conv"]
    hess = {}
    for split, data in (("fit", fit), ("held", held)):
        t0 = time.perf_counter()
        col = HessianCollector(lg, names)
        run_collectors(lg, data.batches(16), [col])
        hess[split] = col.result()
        print(f"Hessians of {len(names)} convs on {len(data)} {split} crops in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    weights = {t.name: numpy_helper.to_array(t) for t in lg.model.graph.initializer}
    prune_s = {f"{s} {m.value}": 0.0 for s, m in RUNS}
    layers = []
    for i, name in enumerate(names):
        layer = lg.layers[name]
        w = weights[layer.weight]
        rows = weight_rows(layer, w).astype(np.float64)
        row = {"index": i, "layer": name, "op": op_kind(lg, name),
               "weight_shape": list(layer.weight_shape), "k": rows.shape[2],
               "rows_seen": hess["fit"][name].rows_seen, "held": {}, "fit": {}, "refused": {}}
        for text, method in RUNS:
            t0 = time.perf_counter()
            res = prune_layer(layer, w, SPARSITY[text], hessian=hess["fit"][name],
                              method=method)
            prune_s[f"{text} {method.value}"] += time.perf_counter() - t0
            key = f"{text} {method.value}"
            if not isinstance(res, PrunedLayer):
                row["refused"][text] = res.reason
                continue
            if res.method is not method:
                raise RuntimeError(f"{name}: {method.value} fell back to {res.method.value}: "
                                   f"{res.fallback}")
            delta = weight_rows(layer, res.weight).astype(np.float64) - rows
            row["held"][key] = _rel(rows, delta, hess["held"][name])
            row["fit"][key] = _rel(rows, delta, hess["fit"][name])
        layers.append(row)
        h = row["held"]
        line = "  ".join(f"{k} {v:.4f}" for k, v in h.items() if "diag" not in k)
        print(f"  {i:2d} {name:16s} {row['op']:10s} {line}", flush=True)
    return {"layers": layers, "fit_samples": len(fit), "held_samples": len(held),
            "prune_s": prune_s, "wall_s": time.perf_counter() - t_start}


def summary(res: dict) -> dict:
    out = {}
    for text in ("50%", "75%", "2:4"):
        for split in ("held", "fit"):
            ratios = [r[split][f"{text} obs"] / r[split][f"{text} magnitude"]
                      for r in res["layers"] if f"{text} obs" in r[split]]
            out[f"{text} {split}"] = {
                "layers": len(ratios), "obs_wins": sum(x < 1 for x in ratios),
                "median_ratio": statistics.median(ratios),
                "geomean_ratio": float(np.exp(np.mean(np.log(ratios)))),
                "max_ratio": max(ratios)}
    d = [r["held"]["50% diagonal"] / r["held"]["50% magnitude"] for r in res["layers"]]
    out["50% held diagonal"] = {"layers": len(d), "wins": sum(x < 1 for x in d),
                                "median_ratio": statistics.median(d)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit", type=int, default=48,
                   help="calibration crops for the Hessians (the rest are held out)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = run(args.fit)
    res["summary"] = s = summary(res)

    def cell(r: dict, key: str) -> str:
        return f"{r['held'][key]:.4f}" if key in r["held"] else "refused"

    rows = []
    for r in res["layers"]:
        ratio = r["held"]["50% obs"] / r["held"]["50% magnitude"]
        rows.append([f"{r['index']} {r['layer']} {'x'.join(map(str, r['weight_shape']))}",
                     r["op"], *(cell(r, f"{t} {m.value}") for t, m in RUNS[:3]),
                     f"{ratio:.2f}", *(cell(r, f"{t} {m.value}") for t, m in RUNS[3:])])
    table = markdown_table(["layer", "op", "50% magnitude", "50% diagonal", "50% OBS",
                            "OBS/mag", "75% magnitude", "75% OBS", "2:4 magnitude", "2:4 OBS"],
                           rows)
    summ = markdown_table(
        ["sparsity", "error measured on", "layers", "OBS wins", "median OBS/magnitude",
         "geometric mean", "worst"],
        [[k.split()[0], "held-out crops" if k.endswith("held") else "fit crops (= predicted)",
          str(v["layers"]), f"{v['obs_wins']} ({v['obs_wins'] / v['layers']:.0%})",
          f"{v['median_ratio']:.3f}", f"{v['geomean_ratio']:.3f}", f"{v['max_ratio']:.3f}"]
         for k, v in s.items() if "diagonal" not in k])
    print(table)
    print(summ)
    dg = s["50% held diagonal"]
    notes = (
        f"Relative layer-output error ‖δW X‖²/‖W X‖² on the {res['held_samples']} held-out "
        f"calibration crops, float survivors, no bias correction. Hessians from the first "
        f"{res['fit_samples']} crops.\n\n{summ}\n\n"
        f"Diagonal (Wanda's w²·E[x²] mask, no update) against magnitude at 50%: better in "
        f"{dg['wins']} of {dg['layers']} layers, median ratio {dg['median_ratio']:.3f}.\n\n"
        "2:4 groups four input channels at each kernel offset (the reduction dimension a "
        "sparse tensor core reads); the depthwise convs (one input channel per group, K = 9 "
        "or 25 taps) and the RGB stem (3 channels) are refused with that reason instead of "
        "padded: a group of four padded channels would hold 1 (depthwise: nothing to prune) "
        "or 3 (stem: one pruned) real weights, and no sparse kernel runs them. Grouping the "
        "K = 9 taps of a depthwise kernel instead would be a pattern no hardware reads.\n\n"
        f"Wall time {res['wall_s']:.0f} s; pruning time per setting, all layers (50% OBS "
        "includes factoring each layer's Hessian, which 75% and 2:4 reuse): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in res["prune_s"].items()) + ".")
    out = write_results(
        "pruning", title="OBS (SparseGPT) against magnitude pruning, EfficientNet-Lite0 convs",
        command="python benchmarks/pruning.py" + (f" --fit {args.fit}" if args.fit != 48
                                                  else ""),
        table=table, payload=res, notes=notes, git=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
