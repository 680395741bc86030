"""``mpsearch inspect MODEL``: the layers mpsearch can quantize, their groups and ties, and every
op left in float with the reason."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mpsearch.cli.args import parse_shapes
from mpsearch.cli.ui import Ui

__all__ = ["cmd_inspect", "register"]


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("inspect", parents=[common],
                       help="list quantizable layers, groups, ties and ops left in float",
                       description="Show the layers mpsearch can quantize (one quantizer group "
                                   "each), their MACs and parameters, the ties between groups "
                                   "and every op left in float with the reason.")
    s.add_argument("model", help="ONNX model file")
    s.add_argument("--input-shape", action="append", metavar="NAME=D,D,...",
                   help="fix a dynamic input shape for MAC counting (default: dynamic dims 1)")
    s.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace, ui: Ui) -> int:
    from mpsearch.graph.layer_graph import build_layer_graph, load_model

    model = load_model(args.model)
    lg = build_layer_graph(model, input_shapes=parse_shapes(args.input_shape))
    layers = [
        {"group": name, "op": layer.op_type, "kind": layer.role.value,
         "weight_shape": list(layer.weight_shape) if layer.weight_shape else None,
         "depthwise": layer.depthwise, "macs": layer.macs, "params": layer.params,
         "input": layer.inputs[0], "output": layer.output}
        for name, layer in lg.layers.items()]
    summary = {
        "model": str(args.model), "layers": len(lg.layers), "groups": len(lg.groups),
        "macs": lg.total_macs, "params": lg.total_params,
        "ties": [{"node": t.node, "op": t.op_type, "groups": list(t.groups)} for t in lg.ties],
        "tie_classes": [sorted(c) for c in lg.tie_classes()],
        "float_ops": [{"node": f.node, "op": f.op_type, "reason": f.reason}
                      for f in lg.float_ops],
        "activations": len(lg.activations), "layer_table": layers,
    }
    if ui.as_json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.table import Table

    t = Table(title=f"{args.model}: quantizable layers (one quantizer group each)")
    for col in ("#", "group (node)", "op", "weight", "MACs", "params"):
        t.add_column(col, justify="right" if col in ("#", "MACs", "params") else "left")
    for i, row in enumerate(layers):
        shape = "x".join(map(str, row["weight_shape"])) if row["weight_shape"] else "-"
        op = row["op"] + (" dw" if row["depthwise"] else "") + (
            " (act x act)" if row["kind"] == "act_matmul" else "")
        t.add_row(str(i), row["group"], op, shape,
                  f"{row['macs']:,}" if row["macs"] is not None else "?", f"{row['params']:,}")
    ui.out.print(t)
    ui.out.print(f"{len(lg.layers)} layers, {lg.total_macs:,} MACs per sample, "
                 f"{lg.total_params:,} parameters, {len(lg.activations)} activation tensors")
    if lg.tie_classes():
        ui.out.print(f"{len(lg.ties)} tie(s) (inputs of {', '.join(sorted(lg.tie_ops))} that "
                     f"must share an activation format), {len(lg.tie_classes())} tied set(s):")
        for c in lg.tie_classes():
            ui.out.print("  " + ", ".join(sorted(c)))
    if lg.float_ops:
        ui.out.print(f"{len(lg.float_ops)} op(s) left in float:")
        for f in lg.float_ops:
            ui.out.print(f"  {f.node} ({f.op_type}): {f.reason}")
    else:
        ui.out.print("no ops left in float")
    return 0
