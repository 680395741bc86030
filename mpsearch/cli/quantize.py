"""``mpsearch quantize MODEL --uniform CANDIDATE``: calibrate once and export every group in one
candidate."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mpsearch.cli.ui import Ui, eval_table

__all__ = ["cmd_quantize", "open_data", "register"]


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("quantize", parents=[common],
                       help="quantize every layer to one candidate (w8a8, w4a16, fp16, ...)",
                       description="Calibrate once and export the model with one candidate for "
                                   "every quantizer group, as a QDQ ONNX model for ONNX "
                                   "Runtime. Writes OUT/model.qdq.onnx and OUT/quantize.json.")
    s.add_argument("model", help="FP32 ONNX model file (not modified)")
    s.add_argument("--uniform", required=True, metavar="CANDIDATE",
                   help="w8a8, w8a16, w4a8, w4a16, w16a16, fp16, fp8 (e4m3), fp8e5m2, float, "
                        "or w:<format>/a:<format>")
    s.add_argument("--data", required=True, metavar="CALIB",
                   help=".npz (keys = input names, axis 0 = samples), or a folder of .npz/.npy")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--eval-data", metavar="EVAL", help="evaluation data, same layout as --data")
    g.add_argument("--holdout", type=float, metavar="FRACTION",
                   help="hold out this fraction of --data (seeded) for evaluation")
    s.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the held-out split (default 0)")
    s.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="samples per ONNX Runtime call: 8 in calibration; in evaluation "
                        "the model's static batch, else 32 (default)")
    s.add_argument("--activation-range", choices=["mse", "minmax", "percentile"], default="mse",
                   help="activation range setting from the calibration histogram (default mse)")
    s.add_argument("--weight-range", choices=["mse", "minmax"], default="mse",
                   help="per-channel weight range setting (default mse)")
    s.add_argument("--equalize", choices=["off", "exact", "relu6"], default="off",
                   help="cross-layer equalization: off (default; measured not to help with "
                        "per-channel weights); exact = pairs with Relu or nothing between "
                        "convs; relu6 = also through ReLU6, replaced by Relu (refused when that "
                        "changes the FP32 output)")
    s.add_argument("--no-bias-correction", action="store_true",
                   help="do not correct biases for the mean shift quantization causes "
                        "(on by default: +4.75 dB on EfficientNet-Lite0 w8a8, "
                        "benchmarks/results/uniform_vs_ort.md)")
    s.add_argument("--rounding", choices=["hessian", "nearest"], default="hessian",
                   help="weight rounding: hessian (default; GPTQ on the layer Hessians, "
                        "+1.4 dB on EfficientNet-Lite0 w8a8, +5.3 dB w4a8) or nearest")
    s.set_defaults(func=cmd_quantize)


def open_data(path: str, model, *, batch_size: int | None, name: str):
    from mpsearch.data.dataset import open_dataset

    return open_dataset(path, model, batch_size=batch_size, name=name)


def cmd_quantize(args: argparse.Namespace, ui: Ui) -> int:
    from mpsearch.core.formats import parse_candidate
    from mpsearch.data.dataset import split
    from mpsearch.data.outputs import OutputDir
    from mpsearch.export.qdq import quantize
    from mpsearch.graph.equalize import EqualizeMode
    from mpsearch.graph.evaluate import evaluate
    from mpsearch.graph.layer_graph import load_model
    from mpsearch.graph.ranges import RangeMethod
    from mpsearch.quant.analysis import QuantizeOptions, analyze
    from mpsearch.quant.layer import Rounding

    candidate = parse_candidate(args.uniform)
    inputs = [args.model, args.data] + ([args.eval_data] if args.eval_data else [])
    out = OutputDir(args.out, inputs=inputs, names=["model.qdq.onnx", "quantize.json"],
                    flag="--out")
    try:
        t0 = time.perf_counter()
        model = load_model(args.model)
        calib = open_data(args.data, model, batch_size=args.batch_size, name="calibration")
        evald = None
        if args.eval_data:
            evald = open_data(args.eval_data, model, batch_size=args.batch_size,
                               name="evaluation")
        elif args.holdout:
            calib, evald = split(calib, args.holdout, seed=args.seed)
        opts = QuantizeOptions(batch_size=args.batch_size or QuantizeOptions.batch_size,
                               activation_range=RangeMethod(args.activation_range),
                               weight_range=RangeMethod(args.weight_range),
                               equalize=EqualizeMode(args.equalize),
                               bias_correction=not args.no_bias_correction,
                               rounding=Rounding(args.rounding))
        with ui.progress("calibrating", len(calib)) as advance:
            analysis = analyze(model, calib, options=opts, progress=advance)
        qm = quantize(analysis, candidate)
        result = None
        if evald is not None:
            with ui.progress("evaluating", len(evald)) as advance:
                result = evaluate(model, qm.model, evald.batches(), labels=evald.labels,
                                  progress=advance)
        summary = {
            "model": str(args.model), "candidate": candidate.name,
            "output": str(out.path / "model.qdq.onnx"), "opset": qm.opset,
            "calibration_samples": analysis.calibration.samples,
            "layers": len(analysis.graph.layers),
            "float_ops": [{"node": f.node, "op": f.op_type, "reason": f.reason}
                          for f in analysis.graph.float_ops],
            "conversions": len(qm.conversions),
            "equalization": {"mode": opts.equalize.value,
                             "pairs": len(analysis.equalization.pairs)
                             if analysis.equalization else 0},
            "activation_range": opts.activation_range.value,
            "bias_correction": opts.bias_correction,
            "weight_range": opts.weight_range.value,
            "rounding": opts.rounding.value,
            "evaluation": result.to_dict() if result else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        out.write_model("model.qdq.onnx", qm.model)
        out.write_json("quantize.json", summary)
    except BaseException:
        out.rollback()
        raise
    if ui.as_json:
        print(json.dumps(summary, indent=2))
        return 0
    ui.out.print(f"wrote {out.path / 'model.qdq.onnx'} ({candidate.name}, opset {qm.opset}, "
                 f"{len(analysis.graph.layers)} layers, "
                 f"{len(analysis.graph.float_ops)} ops left in float) in {summary['seconds']} s")
    if result:
        eval_table(ui, result, f"{candidate.name} against FP32")
    else:
        ui.note("no evaluation: pass --eval-data EVAL or --holdout 0.2 to measure quality")
    return 0
