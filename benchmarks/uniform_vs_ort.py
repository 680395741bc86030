"""Uniform W8A8 on EfficientNet-Lite0: mpsearch against ONNX Runtime's ``quantize_static``.

What it measures, in one run on exactly the same data (the example's 64 calibration crops, fed
to both tools in the same batches, of ``QuantizeOptions().batch_size``, and its 200 held-out
evaluation crops):

- ORT ``quantize_static``, QDQ, ``per_channel=True``, weights QInt8, activations QUInt8, with
  MinMax and with Percentile (99.99) calibration, plus W8A16 (activations QUInt16) for reference;
- mpsearch uniform ``w8a8`` and ``w8a16`` through its Python API (``analyze`` then
  ``quantize(analysis, candidate)``) with several ``QuantizeOptions``: activation range mse /
  minmax / percentile, weight range mse / minmax, empirical bias correction on (the default) / off,
  cross-layer equalization ``off`` (the default), ``exact`` (exact pairs only) and ``relu6``
  (also through ReLU6, which it replaces by ReLU). ``act=minmax w=minmax eq=off bc=off`` is
  ORT's MinMax recipe. ``analyze`` refuses ``relu6`` when the replacement moves the FP32
  output by more than 40 dB SQNR, as it does here: that row records the refusal and its
  message, no numbers;
- two float rows: the FP32 graphs mpsearch quantizes (BN folded, equalized), not quantized, to
  show what equalization alone does to the float model. The ``relu6`` one is built directly
  with ``mpsearch.graph.equalize``, since ``analyze`` refuses it.

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
import io
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

from mpsearch import (  # noqa: E402
    Analysis,
    Dataset,
    QuantizeOptions,
    analyze,
    evaluate,
    load_model,
    open_dataset,
    parse_candidate,
)
from mpsearch.core.errors import UsageError  # noqa: E402
from mpsearch.export.qdq import quantize  # noqa: E402
from mpsearch.graph.equalize import EqualizeMode, equalize  # noqa: E402
from mpsearch.graph.ingest import prepare_model  # noqa: E402
from mpsearch.graph.layer_graph import build_layer_graph  # noqa: E402
from mpsearch.graph.ranges import RangeMethod  # noqa: E402

NAME = "uniform_vs_ort"
EXAMPLE = "efficientnet_lite0"
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
                f"w={o.weight_range.value} eq={o.equalize.value}"
                + ("" if o.bias_correction else " bc=off"))
        notes = [n for n in ("default" if o == QuantizeOptions() else "", self.note) if n]
        return f"{text} ({', '.join(notes)})" if notes else text


@dataclass(frozen=True, kw_only=True)
class Row:
    method: str
    refused: str | None = None  # mpsearch refused these options: its message, no numbers
    sqnr_db: float | None = None
    top1_agreement: float | None = None
    top5_containment: float | None = None
    cosine: float | None = None
    quantize_s: float | None = None  # FP32 file -> quantized model; None for the float rows
    analyze_s: float | None = None  # mpsearch: the (shared) analyze of this row's options
    export_s: float | None = None  # mpsearch: this row's export alone
    size_mb: float | None = None
    op_counts: dict[str, int] | None = None


ORT_RECIPES = (
    OrtRecipe(name="ORT w8a8 MinMax", activation=QuantType.QUInt8,
              method=CalibrationMethod.MinMax),
    OrtRecipe(name="ORT w8a8 Percentile 99.99", activation=QuantType.QUInt8,
              method=CalibrationMethod.Percentile, extra={"CalibPercentile": 99.99}),
    OrtRecipe(name="ORT w8a16 MinMax", activation=QuantType.QUInt16,
              method=CalibrationMethod.MinMax),
)


def _options(act: RangeMethod, weight: RangeMethod, eq: EqualizeMode, *,
             bias_correction: bool = True) -> QuantizeOptions:
    return QuantizeOptions(activation_range=act, weight_range=weight, equalize=eq,
                           bias_correction=bias_correction)


MSE, MINMAX, PERCENTILE = RangeMethod.MSE, RangeMethod.MINMAX, RangeMethod.PERCENTILE
DEFAULT = QuantizeOptions()
# ORT does no bias correction. At 16 bits activations take min/max whatever the method, so
# w8a16 with these options is ORT's w8a16 recipe; it shares the analysis of the w8a8 row.
ORT_LIKE = _options(MINMAX, MINMAX, EqualizeMode.OFF, bias_correction=False)
EXACT = _options(MSE, MSE, EqualizeMode.EXACT)
MP_RECIPES = (
    MpRecipe(candidate="w8a8", options=DEFAULT),
    MpRecipe(candidate="w8a8", options=_options(MSE, MSE, EqualizeMode.OFF,
                                                bias_correction=False),
             note="default without bias correction"),
    MpRecipe(candidate="w8a8", options=EXACT),
    MpRecipe(candidate="w8a8", options=_options(MSE, MSE, EqualizeMode.RELU6)),
    MpRecipe(candidate="w8a8", options=_options(MINMAX, MINMAX, EqualizeMode.OFF)),
    MpRecipe(candidate="w8a8", options=ORT_LIKE, note="ORT's recipe"),
    MpRecipe(candidate="w8a8", options=_options(PERCENTILE, MSE, EqualizeMode.OFF)),
    MpRecipe(candidate="w8a16", options=DEFAULT),
    MpRecipe(candidate="w8a16", options=ORT_LIKE, note="ORT's recipe"),
)


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

    analyses: dict[QuantizeOptions, tuple[Analysis, float] | UsageError] = {}
    for r in MP_RECIPES:
        if r.options not in analyses:
            start = time.perf_counter()
            try:
                a = analyze(model, cal, options=r.options)
            except UsageError as e:
                analyses[r.options] = e
            else:
                analyses[r.options] = (a, time.perf_counter() - start)
        done = analyses[r.options]
        if isinstance(done, UsageError):
            rows.append(Row(method=r.name, refused=str(done)))
            print(_line(rows[-1]), flush=True)
            continue
        a, analyze_s = done
        start = time.perf_counter()
        q = quantize(a, parse_candidate(r.candidate))
        export_s = time.perf_counter() - start
        rows.append(_row(r.name, model, q.model, ev, quantize_s=analyze_s + export_s,
                         analyze_s=analyze_s, export_s=export_s))
        print(_line(rows[-1]), flush=True)

    # The float models mpsearch quantizes (or would): exact's from its analysis, relu6's
    # built here with the same steps, as analyze refuses it.
    exact = analyses[EXACT]
    assert not isinstance(exact, UsageError)
    eq_exact = exact[0]
    eq_relu6, report = equalize(build_layer_graph(prepare_model(model)), mode=EqualizeMode.RELU6)
    for mode, float_model, eq_report in ((EqualizeMode.EXACT, eq_exact.graph.model,
                                          eq_exact.equalization),
                                         (EqualizeMode.RELU6, eq_relu6, report)):
        pairs = len(eq_report.pairs) if eq_report else 0
        clips = len(eq_report.clips_replaced) if eq_report else 0
        method = (f"mpsearch FP32 graph eq={mode.value} ({pairs} pairs equalized, "
                  f"{clips} ReLU6->ReLU), not quantized")
        rows.append(_row(method, model, float_model, ev, quantize_s=None))
        print(_line(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- reporting

HEADER = ["method", "SQNR dB", "top-1 agree", "top-5 contain", "cosine", "quantize s",
          "of which export s", "size MB", "nodes (Q/DQ)"]


def _fmt(v: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if v is None else f"{scale * v:{spec}}{suffix}"


def _cells(r: Row) -> list[str]:
    if r.refused is not None:
        return [r.method, "refused (see below)", *["-"] * (len(HEADER) - 2)]
    ops = r.op_counts or {}
    q, dq = ops.get("QuantizeLinear", 0), ops.get("DequantizeLinear", 0)
    return [r.method, _fmt(r.sqnr_db, ".2f"), _fmt(r.top1_agreement, ".1f", 100, "%"),
            _fmt(r.top5_containment, ".1f", 100, "%"), _fmt(r.cosine, ".4f"),
            _fmt(r.quantize_s, ".1f"), _fmt(r.export_s, ".2f"), _fmt(r.size_mb, ".2f"),
            f"{sum(ops.values())} ({q}/{dq})"]


def _line(r: Row) -> str:
    if r.refused is not None:
        return f"method={r.method}  refused: {r.refused}"
    return "  ".join(f"{h}={c}" for h, c in zip(HEADER, _cells(r), strict=True))


def _notes(rows: list[Row], *, wall_s: float) -> str:
    refused = [f"- `{r.method}`: `analyze` refused it: \"{r.refused}\"" for r in rows
               if r.refused is not None]
    return "\n".join([
        *refused,
        "- \"top-5 contain\": FP32's top-1 class among the model's five best. \"size MB\": "
        "serialized model. `bc=off`: empirical bias correction off (every other mpsearch row "
        "has it on, the default).",
        "- ORT's quantizer drops every ReLU6 (Clip) after a Conv and lets the output quantizer's "
        "range do the clipping, hence fewer nodes than mpsearch's models, which keep each Clip "
        "with a Q/DQ pair on both sides, both with the Clip output's parameters (numerically "
        "the same as ORT's removal). Both quantize the graph output (the Gemm's logits).",
        "- ORT w8a16: the opset-18 model is upgraded to opset 21 for 16-bit Q/DQ. At 16 bits "
        "mpsearch's default widens the observed min/max by 50% (headroom for held-out data); "
        "with `act=minmax` it takes min/max as ORT does.",
        "- `eq=exact` equalizes only exact Conv -> Conv pairs (no activation between), which "
        "changes activation ranges and weight tensors but not the float function; `eq=off` "
        "leaves the graph as ORT sees it.",
        "- The \"FP32 graph\" rows are the float models mpsearch quantizes, before "
        "quantization. The `eq=relu6` one is built directly (`prepare_model`, "
        "`build_layer_graph`, `equalize(mode=RELU6)`), since `analyze` refuses that mode: the "
        "ReLU6 -> ReLU replacement alone sets that float model's SQNR, and so would bound "
        "every model quantized from it.",
        "- Calibration and evaluation crops are different random crops of the same 17 "
        "photographs (`examples/efficientnet_lite0/prepare.py`), so what is fitted to the "
        "calibration data (mse and percentile ranges, bias correction) is scored in "
        "distribution; images unlike the calibration set may show smaller gains.",
        f"- Total wall time of the run {wall_s:.0f} s (data preparation, every quantization "
        "and evaluation).",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EVAL} evaluation crops; writes no results")
    parser.add_argument("--ort-preprocess", action="store_true",
                        help="run ORT's quant_pre_process before quantize_static")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    paths = prepare_example(EXAMPLE)
    model = load_model(paths["model"])
    cal = open_dataset(paths["calib"], model)
    ev = open_dataset(paths["eval"], model, name="evaluation")
    if args.quick:
        ev = ev.take(np.arange(min(QUICK_EVAL, len(ev))))
    rows = run_all(paths["model"], cal, ev, ort_preprocess=args.ort_preprocess)
    wall = time.perf_counter() - start
    header = (f"Data: {len(cal)} calibration crops (both tools, same batches of {CALIB_BATCH}), "
              f"{len(ev)} held-out evaluation crops. Every model is scored by `mpsearch.evaluate` "
              "against the original FP32 model (logits). ORT: `quantize_static`, QDQ, "
              "per-channel QInt8 weights, "
              f"{'with' if args.ort_preprocess else 'without'} `quant_pre_process`. mpsearch: "
              "`analyze` once per distinct `QuantizeOptions` (its time is in \"quantize s\" of "
              "every row that uses it), then `quantize(analysis, candidate)`.")
    table = markdown_table(HEADER, [_cells(r) for r in rows])
    print()
    print(table)
    print(f"\ntotal wall time {wall:.1f} s", file=sys.stderr)
    if args.quick:
        return 0
    command = f"python benchmarks/{NAME}.py" + (" --ort-preprocess" if args.ort_preprocess
                                                 else "")
    payload = {"ort_preprocess": args.ort_preprocess, "calibration_samples": len(cal),
               "evaluation_samples": len(ev), "calibration_batch": CALIB_BATCH,
               "wall_s": wall, "rows": [asdict(r) for r in rows]}
    out = write_results(NAME, title="Uniform W8A8 on EfficientNet-Lite0: mpsearch vs ONNX Runtime",
                        command=command, table=f"{header}\n\n{table}", payload=payload,
                        notes=_notes(rows, wall_s=wall), git=True)
    print(f"wrote {out} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
