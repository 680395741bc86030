"""Uniform W8A8 on EfficientNet-Lite0: mpsearch against ONNX Runtime's ``quantize_static``.

What it measures, in one run on exactly the same data (the example's 64 calibration crops, fed
to both tools in the same batches, of ``QuantizeOptions().batch_size``, and its 200 held-out
evaluation crops):

- ORT ``quantize_static``, QDQ, ``per_channel=True``, weights QInt8, activations QUInt8, with
  MinMax and with Percentile (99.99) calibration, plus W8A16 (activations QUInt16) for reference;
- mpsearch uniform ``w8a8`` and ``w8a16`` through its Python API (``analyze`` then
  ``export_uniform``) with several ``QuantizeOptions``: activation range mse / minmax /
  percentile, weight range mse / minmax, cross-layer equalization ``auto`` (exact pairs only),
  ``off`` and ``relu6`` (also through ReLU6, which it replaces by ReLU). ``act=minmax w=minmax
  eq=off`` is ORT's MinMax recipe;
- two float rows: the FP32 graphs mpsearch quantizes (BN folded, equalized), not quantized, to
  show what equalization alone does to the float model.

Every model is scored by the same ``mpsearch.evaluate`` against the original FP32 model: SQNR of
the logits, top-1 agreement and top-5 containment of FP32's top-1 class, mean cosine. "quantize s"
is the time from the FP32 file to the quantized model: ORT's ``quantize_static`` (calibration
included), or mpsearch's ``analyze`` (ingest + equalize + calibrate; once per distinct
``QuantizeOptions``, shared by the rows that use the same options) plus that row's export. ORT
runs in a temporary folder on a copy of the model, because it writes a side file next to its
input. ``quant_pre_process`` is off by default: on this model it changes neither the graph ORT
quantizes nor any metric, and costs about 2 s (``--ort-preprocess`` turns it on).

    python benchmarks/uniform_vs_ort.py          # full run, writes results/uniform_vs_ort.{md,json}
    python benchmarks/uniform_vs_ort.py --quick  # 100 evaluation crops, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from mpsearch import (
    Analysis,
    Dataset,
    QuantizeOptions,
    analyze,
    evaluate,
    load_model,
    open_dataset,
    parse_candidate,
)
from mpsearch.equalize import EqualizeMode
from mpsearch.ranges import RangeMethod

NAME = "uniform_vs_ort"
ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "examples" / "efficientnet_lite0" / "prepare.py"
RESULTS = Path(__file__).resolve().parent / "results"
CALIB_BATCH = QuantizeOptions().batch_size  # ORT's reader gets mpsearch's calibration batches
QUICK_EVAL = 100


@dataclass(frozen=True, kw_only=True)
class OrtRecipe:
    name: str
    activation: QuantType
    method: CalibrationMethod
    extra: Mapping[str, Any] = field(default_factory=dict)  # ORT's own extra_options


@dataclass(frozen=True, kw_only=True)
class MpRecipe:
    candidate: str
    options: QuantizeOptions
    note: str = ""

    @property
    def name(self) -> str:
        o = self.options
        text = (f"mpsearch {self.candidate} act={o.activation_range.value} "
                f"w={o.weight_range.value} eq={o.equalize.value}")
        notes = [n for n in ("default" if self.options == QuantizeOptions() else "", self.note)
                 if n]
        return f"{text} ({', '.join(notes)})" if notes else text


@dataclass(frozen=True, kw_only=True)
class Row:
    method: str
    sqnr_db: float
    top1_agreement: float
    top5_containment: float
    cosine: float
    quantize_s: float | None  # FP32 file -> quantized model; None for the float rows
    analyze_s: float | None  # mpsearch: the (shared) analyze of this row's options
    export_s: float | None  # mpsearch: this row's export alone
    size_mb: float
    op_counts: dict[str, int]


ORT_RECIPES = (
    OrtRecipe(name="ORT w8a8 MinMax", activation=QuantType.QUInt8,
              method=CalibrationMethod.MinMax),
    OrtRecipe(name="ORT w8a8 Percentile 99.99", activation=QuantType.QUInt8,
              method=CalibrationMethod.Percentile, extra={"CalibPercentile": 99.99}),
    OrtRecipe(name="ORT w8a16 MinMax", activation=QuantType.QUInt16,
              method=CalibrationMethod.MinMax),
)


def _options(act: RangeMethod, weight: RangeMethod, eq: EqualizeMode) -> QuantizeOptions:
    return QuantizeOptions(activation_range=act, weight_range=weight, equalize=eq)


MSE, MINMAX, PERCENTILE = RangeMethod.MSE, RangeMethod.MINMAX, RangeMethod.PERCENTILE
DEFAULT = _options(MSE, MSE, EqualizeMode.AUTO)
# At 16 bits activations take min/max whatever the method, so w8a16 with these options is
# ORT's w8a16 recipe; it shares the analysis of the w8a8 row with the same options.
ORT_LIKE = _options(MINMAX, MINMAX, EqualizeMode.OFF)
FLOAT_ROWS = (DEFAULT, _options(MSE, MSE, EqualizeMode.RELU6))
MP_RECIPES = (
    MpRecipe(candidate="w8a8", options=DEFAULT),
    MpRecipe(candidate="w8a8", options=_options(MSE, MSE, EqualizeMode.OFF)),
    MpRecipe(candidate="w8a8", options=_options(MSE, MSE, EqualizeMode.RELU6)),
    MpRecipe(candidate="w8a8", options=_options(MINMAX, MINMAX, EqualizeMode.AUTO)),
    MpRecipe(candidate="w8a8", options=ORT_LIKE, note="ORT's recipe"),
    MpRecipe(candidate="w8a8", options=_options(PERCENTILE, MSE, EqualizeMode.AUTO)),
    MpRecipe(candidate="w8a16", options=DEFAULT),
    MpRecipe(candidate="w8a16", options=ORT_LIKE, note="ORT's recipe"),
)


def _prepare_example() -> dict[str, Path]:
    """Run the example's ``prepare()`` (idempotent), imported by path."""
    spec = importlib.util.spec_from_file_location("efficientnet_lite0_prepare", PREPARE)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {PREPARE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths: dict[str, Path] = module.prepare()
    return paths


class _Reader(CalibrationDataReader):
    """ORT's calibration reader over mpsearch's calibration batches."""

    def __init__(self, data: Dataset) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = data.batches(CALIB_BATCH)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ORT's quantizer: it prints progress and logs advice on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _row(method: str, reference: onnx.ModelProto, model: onnx.ModelProto, ev: Dataset, *,
         quantize_s: float | None, analyze_s: float | None = None,
         export_s: float | None = None) -> Row:
    p = evaluate(reference, model, ev.batches(), labels=ev.labels).primary
    if p.top1_agreement is None or p.top5_containment is None:
        raise RuntimeError("the model's first output is not a classifier output")
    return Row(method=method, sqnr_db=p.sqnr_db, top1_agreement=p.top1_agreement,
               top5_containment=p.top5_containment, cosine=p.cosine, quantize_s=quantize_s,
               analyze_s=analyze_s, export_s=export_s, size_mb=model.ByteSize() / 1e6,
               op_counts=_op_counts(model))


def run_ort(recipe: OrtRecipe, model_path: Path, cal: Dataset, *,
            preprocess: bool) -> tuple[onnx.ModelProto, float]:
    """Quantize a copy of the model in a temporary folder; returns the model and the seconds."""
    with tempfile.TemporaryDirectory(prefix="mpsearch-ort-") as tmp:
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "model.qdq.onnx"
        shutil.copyfile(model_path, src)
        with _quiet():
            start = time.perf_counter()
            if preprocess:
                pre = Path(tmp) / "model.pre.onnx"
                quant_pre_process(str(src), str(pre))
                src = pre
            quantize_static(str(src), str(out), _Reader(cal), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=recipe.activation,
                            weight_type=QuantType.QInt8, calibrate_method=recipe.method,
                            extra_options=dict(recipe.extra))
            seconds = time.perf_counter() - start
        return onnx.load(str(out)), seconds


def run_all(model_path: Path, cal: Dataset, ev: Dataset, *, ort_preprocess: bool) -> list[Row]:
    """Every row of the table, ORT's first; prints each as it is measured."""
    model = load_model(model_path)
    rows: list[Row] = []
    for o in ORT_RECIPES:
        q, seconds = run_ort(o, model_path, cal, preprocess=ort_preprocess)
        rows.append(_row(o.name, model, q, ev, quantize_s=seconds))
        print(_line(rows[-1]), flush=True)

    analyses: dict[QuantizeOptions, tuple[Analysis, float]] = {}
    for r in MP_RECIPES:
        if r.options not in analyses:
            start = time.perf_counter()
            a = analyze(model, cal, options=r.options)
            analyses[r.options] = (a, time.perf_counter() - start)
        a, analyze_s = analyses[r.options]
        start = time.perf_counter()
        q = a.export_uniform(parse_candidate(r.candidate))
        export_s = time.perf_counter() - start
        rows.append(_row(r.name, model, q.model, ev, quantize_s=analyze_s + export_s,
                         analyze_s=analyze_s, export_s=export_s))
        print(_line(rows[-1]), flush=True)

    for opts in FLOAT_ROWS:
        a = analyses[opts][0]
        pairs = len(a.equalization.pairs) if a.equalization else 0
        clips = len(a.equalization.clips_replaced) if a.equalization else 0
        method = (f"mpsearch FP32 graph eq={opts.equalize.value} ({pairs} pairs equalized, "
                  f"{clips} ReLU6->ReLU), not quantized")
        rows.append(_row(method, model, a.graph.model, ev, quantize_s=None))
        print(_line(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- reporting

HEADER = ("method", "SQNR dB", "top-1 agree", "top-5 contain", "cosine", "quantize s",
          "of which export s", "size MB", "nodes (Q/DQ)")


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}"


def _cells(r: Row) -> tuple[str, ...]:
    q, dq = r.op_counts.get("QuantizeLinear", 0), r.op_counts.get("DequantizeLinear", 0)
    return (r.method, f"{r.sqnr_db:.2f}", f"{100 * r.top1_agreement:.1f}%",
            f"{100 * r.top5_containment:.1f}%", f"{r.cosine:.4f}", _seconds(r.quantize_s),
            "-" if r.export_s is None else f"{r.export_s:.2f}", f"{r.size_mb:.2f}",
            f"{sum(r.op_counts.values())} ({q}/{dq})")


def _line(r: Row) -> str:
    return "  ".join(f"{h}={c}" for h, c in zip(HEADER, _cells(r), strict=True))


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": cores,
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("onnxruntime", "onnx", "numpy", "mpsearch")},
        "git": _git_commit(),
    }


def write_results(out: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(
        json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    env, v = meta["environment"], meta["environment"]["versions"]
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    text = f"""# Uniform W8A8 on EfficientNet-Lite0: mpsearch vs ONNX Runtime

Written by `python benchmarks/{NAME}.py` on {env["date"]}: {env["cpu"]}, {env["cores"]} cores,
{env["platform"]}, Python {env["python"]}; {versions}; git {env["git"]}.
Total wall time {meta["wall_s"]:.0f} s.

Data: {meta["calibration_samples"]} calibration crops (both tools, same batches of \
{CALIB_BATCH}), {meta["evaluation_samples"]} held-out evaluation crops. Every model is scored by \
`mpsearch.evaluate` against the original FP32 model (logits). ORT: `quantize_static`, QDQ, \
per-channel QInt8 weights, {"with" if meta["ort_preprocess"] else "without"} \
`quant_pre_process`. mpsearch: `analyze` once per distinct `QuantizeOptions` (its time is in \
"quantize s" of every row that uses it), then `export_uniform`.

{markdown_table(rows)}

- "top-5 contain": FP32's top-1 class among the model's five best. "size MB": serialized model.
- ORT's quantizer drops every ReLU6 (Clip) after a Conv and lets the output quantizer's range do
  the clipping, hence fewer nodes than mpsearch's models, which keep the Clips.
- ORT also quantizes the graph output (the Gemm's logits); mpsearch leaves graph outputs float.
  mpsearch keeps each Clip with a Q/DQ pair on both sides, both with the Clip output's
  parameters (numerically the same as ORT's removal, 34 more Q/DQ pairs).
- ORT w8a16: the opset-18 model is upgraded to opset 21 for 16-bit Q/DQ. At 16 bits mpsearch
  too takes activation ranges from min/max, whatever the method.
- `eq=auto` equalizes only exact Conv -> Conv pairs (no activation between), which changes two
  activation ranges and four weight tensors but not the float function; `eq=off` leaves the
  graph as ORT sees it.
- The "FP32 graph" rows are the float models mpsearch quantizes, before quantization. With
  `eq=relu6` the ReLU6 -> ReLU replacement alone sets the float model's SQNR, and so bounds
  every model quantized from it.
"""
    (out / f"{NAME}.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EVAL} evaluation crops; writes no results unless --out")
    parser.add_argument("--ort-preprocess", action="store_true",
                        help="run ORT's quant_pre_process before quantize_static")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    paths = _prepare_example()
    model = load_model(paths["model"])
    cal = open_dataset(paths["calib"], model)
    ev = open_dataset(paths["eval"], model, name="evaluation")
    if args.quick:
        ev = ev.take(np.arange(min(QUICK_EVAL, len(ev))))
    rows = run_all(paths["model"], cal, ev, ort_preprocess=args.ort_preprocess)
    wall = time.perf_counter() - start
    meta = {
        "benchmark": NAME,
        "environment": environment(),
        "quick": args.quick,
        "ort_preprocess": args.ort_preprocess,
        "calibration_samples": len(cal),
        "evaluation_samples": len(ev),
        "wall_s": wall,
    }
    print()
    print(markdown_table(rows))
    print(f"\ntotal wall time {wall:.1f} s", file=sys.stderr)
    out = args.out if args.out is not None or args.quick else RESULTS
    if out is not None:
        write_results(out, rows, meta)
        print(f"wrote {out / NAME}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
