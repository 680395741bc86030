"""Hessian (GPTQ) rounding against round-to-nearest on EfficientNet-Lite0, one layer at a time.

    python benchmarks/rounding.py [--quick]

One calibration pass with the layer Hessians (the example's calibration set); the same
statistics serve both roundings (``Analysis.with_rounding``). For every Conv/Gemm layer, the
plan "this layer w4a8, every other layer w8a8" is exported with each rounding and scored on
the evaluation set: SQNR of the logits against FP32. Plus uniform w8a8 and w4a8 with each
rounding. Writes benchmarks/results/rounding.*.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

from mpsearch import analyze, evaluate, load_model, open_dataset, parse_candidate  # noqa: E402
from mpsearch.export.qdq import (
    quantize,  # noqa: E402
    uniform_plan,  # noqa: E402
)
from mpsearch.graph.layer_graph import LayerGraph  # noqa: E402
from mpsearch.quant.analysis import Analysis, QuantizeOptions  # noqa: E402
from mpsearch.quant.layer import Rounding  # noqa: E402

MODES = (Rounding.NEAREST, Rounding.HESSIAN)
W8A8, W4A8 = parse_candidate("w8a8"), parse_candidate("w4a8")


def op_kind(lg: LayerGraph, name: str) -> str:
    """stem / depthwise / 1x1 expand / 1x1 head / project / fc, from the weight's shape and
    what reads the layer's output (an expand feeds a depthwise conv)."""
    layer = lg.layers[name]
    if layer.op_type != "Conv":
        return "fc"
    cout, cin_g = layer.weight_shape[:2]
    if layer.inputs[0] in {i.name for i in lg.model.graph.input}:
        return "stem"
    if layer.conv_groups > 1 and cin_g == 1:
        return "depthwise"
    if cout < cin_g:
        return "project"
    readers: dict[str, list] = {}
    for node in lg.model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    todo, nxt = [layer.output], []
    while todo:  # through the activation (and anything else without weights) to the layers
        for node in readers.get(todo.pop(), []):
            if node.name in lg.layers:
                nxt.append(lg.layers[node.name])
            else:
                todo.extend(node.output)
    if any(n.conv_groups > 1 and n.weight_shape and n.weight_shape[1] == 1 for n in nxt):
        return "1x1 expand"
    return "1x1 head"


def run(quick: bool) -> dict:
    paths = prepare_example("efficientnet_lite0")
    model = load_model(paths["model"])
    cal = open_dataset(paths["calib"], model)
    ev = open_dataset(paths["eval"], model, name="evaluation")
    if quick:
        ev = ev.take(range(min(len(ev), 50)))
    t_start = time.perf_counter()
    hessian = analyze(model, cal, options=QuantizeOptions(rounding=Rounding.HESSIAN))
    t_an = time.perf_counter() - t_start
    analyses: dict[Rounding, Analysis] = {Rounding.NEAREST: hessian.with_rounding(
        Rounding.NEAREST), Rounding.HESSIAN: hessian}
    lg = hessian.graph
    print(f"analysed in {t_an:.1f} s (calibration with Hessians "
          f"{hessian.timings['calibrate']:.1f} s)", flush=True)
    export_s = dict.fromkeys(MODES, 0.0)
    eval_s = 0.0

    def score(mode: Rounding, plan) -> float:
        nonlocal eval_s
        t0 = time.perf_counter()
        q = quantize(analyses[mode], plan)
        t1 = time.perf_counter()
        db = evaluate(model, q.model, ev.batches(16)).primary.sqnr_db
        export_s[mode] += t1 - t0
        eval_s += time.perf_counter() - t1
        return db

    uniform = {}
    for cand in (W8A8, W4A8):  # first: fills each setter's memo for the layer plans
        uniform[str(cand)] = {m.value: score(m, uniform_plan(lg, cand)) for m in MODES}
        print(f"uniform {cand}: " + ", ".join(f"{k} {v:.2f} dB"
                                               for k, v in uniform[str(cand)].items()),
              flush=True)
    layers = []
    names = [n for n, x in lg.layers.items() if x.op_type in ("Conv", "Gemm")]
    for i, name in enumerate(names):
        plan = uniform_plan(lg, W8A8)
        if name not in plan:
            raise KeyError(f"{name} is not a quantizer group of its own")
        plan[name] = W4A8
        db = {m.value: score(m, plan) for m in MODES}
        x = lg.layers[name]
        row = {"index": i, "layer": name, "op": op_kind(lg, name),
               "weight_shape": list(x.weight_shape), "rtn_db": db["nearest"],
               "hessian_db": db["hessian"], "gain_db": db["hessian"] - db["nearest"],
               "rtn_loss_db": uniform["w8a8"]["nearest"] - db["nearest"],
               "hessian_loss_db": uniform["w8a8"]["hessian"] - db["hessian"]}
        layers.append(row)
        print(f"  {i:2d} {name:16s} {row['op']:10s} RTN {row['rtn_db']:6.2f}  Hessian "
              f"{row['hessian_db']:6.2f}  gain {row['gain_db']:+5.2f} dB", flush=True)
    return {"layers": layers, "uniform": uniform, "eval_samples": len(ev),
            "analyze_s": t_an, "calibrate_s": hessian.timings["calibrate"],
            "export_s": {m.value: s for m, s in export_s.items()}, "eval_s": eval_s,
            "wall_s": time.perf_counter() - t_start}


def summary(res: dict) -> dict:
    gains = [r["gain_db"] for r in res["layers"]]
    by_op: dict[str, list[dict]] = {}
    for r in res["layers"]:
        by_op.setdefault(r["op"], []).append(r)
    return {
        "median_gain_db": statistics.median(gains),
        "improved": sum(g > 0 for g in gains), "worse": sum(g < 0 for g in gains),
        "layers": len(gains),
        "by_op": {op: {"layers": len(rs),
                       "median_gain_db": statistics.median(r["gain_db"] for r in rs),
                       "rtn_loss_db": [min(r["rtn_loss_db"] for r in rs),
                                       max(r["rtn_loss_db"] for r in rs)],
                       "hessian_loss_db": [min(r["hessian_loss_db"] for r in rs),
                                           max(r["hessian_loss_db"] for r in rs)]}
                  for op, rs in by_op.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="50 evaluation crops")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = run(args.quick)
    res["summary"] = s = summary(res)
    rows = [[f"{r['index']} {r['layer']} {'x'.join(map(str, r['weight_shape']))}", r["op"],
             f"{r['rtn_db']:.2f}", f"{r['hessian_db']:.2f}", f"{r['gain_db']:+.2f}"]
            for r in res["layers"]]
    rows.append(["**median over layers**", "", "", "", f"**{s['median_gain_db']:+.2f}**"])
    rows.append([f"**layers improved**: {s['improved']} of {s['layers']} "
                 f"(worse: {s['worse']})", "", "", "", ""])
    for cand, db in res["uniform"].items():
        rows.append([f"**uniform {cand}**", "all", f"{db['nearest']:.2f}",
                     f"{db['hessian']:.2f}", f"{db['hessian'] - db['nearest']:+.2f}"])
    table = markdown_table(["layer (w4a8, the rest w8a8)", "op", "RTN dB", "Hessian dB",
                            "gain dB"], rows)
    ops = markdown_table(
        ["op", "layers", "median gain dB", "loss vs uniform w8a8, RTN dB",
         "loss vs uniform w8a8, Hessian dB"],
        [[op, str(v["layers"]), f"{v['median_gain_db']:+.2f}",
          "{:.2f} to {:.2f}".format(*v["rtn_loss_db"]),
          "{:.2f} to {:.2f}".format(*v["hessian_loss_db"])] for op, v in s["by_op"].items()])
    print(table)
    print(ops)
    notes = ("Gain: the whole plan's difference, the other layers' int8 rounding included "
             "(see uniform w8a8); the loss columns below isolate the int4 layer. "
             f"By op kind (loss: uniform w8a8 of the same rounding minus the plan):\n\n{ops}\n\n"
             f"SQNR of the logits against FP32 on {res['eval_samples']} evaluation crops; one "
             f"calibration pass with the layer Hessians ({res['calibrate_s']:.0f} s) serves "
             f"both roundings. Wall time {res['wall_s']:.0f} s: weight quantization and export "
             f"{res['export_s']['nearest']:.0f} s (nearest) and "
             f"{res['export_s']['hessian']:.0f} s (Hessian), evaluation {res['eval_s']:.0f} s. "
             "Hessian rounding: GPTQ with act-order on the input covariance, kept per output "
             "channel where it beats nearest on the calibration statistic "
             "(mpsearch/quant/layer.py).")
    out = write_results(
        "rounding", title="Hessian rounding against round-to-nearest, EfficientNet-Lite0",
        command="python benchmarks/rounding.py" + (" --quick" if args.quick else ""),
        table=table, payload=res, notes=notes, git=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
