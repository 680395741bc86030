"""``mpsearch eval FP32 QUANT --data EVAL``: a quantized model against its FP32 original."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mpsearch.cli.quantize import open_data
from mpsearch.cli.ui import Ui, eval_table

__all__ = ["cmd_eval", "register"]


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("eval", parents=[common],
                       help="compare a quantized model with its FP32 original",
                       description="Per output: SQNR (dB) and cosine against FP32; for "
                                   "classifiers top-1 agreement and top-5 containment; accuracy "
                                   "when the data has labels.")
    s.add_argument("fp32", help="the FP32 reference model")
    s.add_argument("quantized", help="the quantized model")
    s.add_argument("--data", required=True, metavar="EVAL", help="evaluation data")
    s.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="samples per ONNX Runtime call (default: the model's static batch, "
                        "else 32)")
    s.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    s.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace, ui: Ui) -> int:
    from mpsearch.data.outputs import OutputDir
    from mpsearch.graph.evaluate import evaluate
    from mpsearch.graph.layer_graph import load_model

    od = None
    if args.save:
        save = Path(args.save)
        od = OutputDir(save.parent, inputs=[args.fp32, args.quantized, args.data],
                       names=[save.name], flag="--save")
    ref = load_model(args.fp32)
    quant = load_model(args.quantized)
    data = open_data(args.data, ref, batch_size=args.batch_size, name="evaluation")
    with ui.progress("evaluating", len(data)) as advance:
        result = evaluate(ref, quant, data.batches(), labels=data.labels, progress=advance)
    payload = {"fp32": str(args.fp32), "quantized": str(args.quantized), **result.to_dict()}
    if od is not None:
        od.write_json(Path(args.save).name, payload)
    if ui.as_json:
        print(json.dumps(payload, indent=2))
    else:
        eval_table(ui, result, f"{args.quantized} against {args.fp32}")
    return 0
