"""Command line: parses arguments, calls the library, prints. Errors from the MpsearchError
family exit with code 2 and one line on stderr (a traceback only with --debug)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mpsearch import __version__
from mpsearch.core.errors import MpsearchError, UsageError

log = logging.getLogger("mpsearch")

EXIT_USAGE = 2


# --------------------------------------------------------------------------- terminal helpers


class _Ui:
    def __init__(self, *, quiet: bool, as_json: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.as_json = as_json
        self.out = Console(soft_wrap=True)
        self.err = Console(stderr=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int | None) -> Iterator:
        if self.quiet or not self.err.is_terminal:
            yield lambda n: None  # scripts and CI: no bars (-v logs each stage instead)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.err,
                      transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)

    def note(self, text: str) -> None:
        if not self.quiet and not self.as_json:
            self.err.print(text)


def _fmt(v: float | None, spec: str = ".2f", pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{100 * v:.1f}%" if pct else format(v, spec)


def _eval_table(ui: _Ui, result, title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    for col in ("output", "SQNR dB", "cosine", "top-1 agree", "top-5 contain", "accuracy",
                "FP32 accuracy"):
        t.add_column(col, justify="right" if col != "output" else "left")
    for o in result.outputs:
        t.add_row(o.name, _fmt(o.sqnr_db), _fmt(o.cosine, ".5f"), _fmt(o.top1_agreement, pct=True),
                  _fmt(o.top5_containment, pct=True), _fmt(o.accuracy, pct=True),
                  _fmt(o.accuracy_fp32, pct=True))
    ui.out.print(t)
    ui.out.print(f"{result.samples} evaluation samples")


def _parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            out[name] = tuple(int(d) for d in dims.split(","))
        except ValueError as e:
            raise UsageError(f"cannot read --input-shape '{item}'",
                             fix="write NAME=1,3,224,224") from e
        if not name or any(d <= 0 for d in out[name]):
            raise UsageError(f"cannot read --input-shape '{item}'",
                             fix="write NAME=1,3,224,224 with positive dims")
    return out


# --------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace, ui: _Ui) -> int:
    from mpsearch.graph.layer_graph import build_layer_graph, load_model

    model = load_model(args.model)
    lg = build_layer_graph(model, input_shapes=_parse_shapes(args.input_shape))
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


def _open_data(path: str, model, *, batch_size: int | None, name: str):
    from mpsearch.data.dataset import open_dataset

    return open_dataset(path, model, batch_size=batch_size, name=name)


def cmd_quantize(args: argparse.Namespace, ui: _Ui) -> int:
    from mpsearch.core.formats import parse_candidate
    from mpsearch.data.dataset import split
    from mpsearch.data.outputs import OutputDir
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
        calib = _open_data(args.data, model, batch_size=args.batch_size, name="calibration")
        evald = None
        if args.eval_data:
            evald = _open_data(args.eval_data, model, batch_size=args.batch_size,
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
        qm = analysis.export_uniform(candidate)
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
        _eval_table(ui, result, f"{candidate.name} against FP32")
    else:
        ui.note("no evaluation: pass --eval-data EVAL or --holdout 0.2 to measure quality")
    return 0


def cmd_eval(args: argparse.Namespace, ui: _Ui) -> int:
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
    data = _open_data(args.data, ref, batch_size=args.batch_size, name="evaluation")
    with ui.progress("evaluating", len(data)) as advance:
        result = evaluate(ref, quant, data.batches(), labels=data.labels, progress=advance)
    payload = {"fp32": str(args.fp32), "quantized": str(args.quantized), **result.to_dict()}
    if od is not None:
        od.write_json(Path(args.save).name, payload)
    if ui.as_json:
        print(json.dumps(payload, indent=2))
    else:
        _eval_table(ui, result, f"{args.quantized} against {args.fp32}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print a JSON document on stdout instead of tables")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    common.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    common.add_argument("--debug", action="store_true",
                        help="show tracebacks for errors (and debug logging)")

    p = argparse.ArgumentParser(
        prog="mpsearch",
        description="Hardware-aware mixed-precision quantization search for ONNX models.")
    p.add_argument("--version", action="version", version=f"mpsearch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", parents=[common],
                       help="list quantizable layers, groups, ties and ops left in float",
                       description="Show the layers mpsearch can quantize (one quantizer group "
                                   "each), their MACs and parameters, the ties between groups "
                                   "and every op left in float with the reason.")
    s.add_argument("model", help="ONNX model file")
    s.add_argument("--input-shape", action="append", metavar="NAME=D,D,...",
                   help="fix a dynamic input shape for MAC counting (default: dynamic dims 1)")
    s.set_defaults(func=cmd_inspect)

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
    s.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="samples per ONNX Runtime call (default: the model's static batch, "
                        "else 32)")
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
                        "(on by default; +4.5 dB on EfficientNet-Lite0 w8a8)")
    s.add_argument("--rounding", choices=["hessian", "nearest"], default="hessian",
                   help="weight rounding: hessian (default; GPTQ on the layer Hessians, "
                        "+1.4 dB on EfficientNet-Lite0 w8a8, +5.3 dB w4a8) or nearest")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", parents=[common],
                       help="compare a quantized model with its FP32 original",
                       description="Per output: SQNR (dB) and cosine against FP32; for "
                                   "classifiers top-1 agreement and top-5 containment; accuracy "
                                   "when the data has labels.")
    s.add_argument("fp32", help="the FP32 reference model")
    s.add_argument("quantized", help="the quantized model")
    s.add_argument("--data", required=True, metavar="EVAL", help="evaluation data")
    s.add_argument("--batch-size", type=int, default=None, help="samples per call")
    s.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    s.set_defaults(func=cmd_eval)

    from mpsearch.cli import hw as cli_hw
    from mpsearch.cli import report as cli_report
    from mpsearch.cli import run as cli_run
    from mpsearch.cli import sensitivity as cli_sensitivity
    from mpsearch.cli import verify as cli_verify

    cli_hw.add_parser(sub, common)
    cli_sensitivity.add_parser(sub, common)
    cli_run.add_parser(sub, common)
    cli_report.add_parser(sub, common)
    cli_verify.add_parser(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    ui = _Ui(quiet=args.quiet, as_json=args.json)
    try:
        return args.func(args, ui)
    except MpsearchError as e:
        if args.debug:
            raise
        print(f"mpsearch: error: {e.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mpsearch: interrupted", file=sys.stderr)
        return 130
