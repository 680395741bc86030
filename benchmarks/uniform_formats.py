"""Every uniform format on all three examples, exported by mpsearch and run on ONNX Runtime's
CPU execution provider: SQNR against FP32 (plus top-1 agreement for EfficientNet-Lite0,
accuracy for the MNIST CNN, cosine for MiniLM's sentence embeddings).

    python benchmarks/uniform_formats.py [--quick]

One calibration pass per model (the examples' calibration sets), then one export and one
evaluation on the full evaluation set per format. Writes benchmarks/results/uniform_formats.*.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

from mpsearch import analyze, evaluate, load_model, open_dataset, parse_candidate  # noqa: E402
from mpsearch.export.qdq import quantize  # noqa: E402

EXAMPLES = ("efficientnet_lite0", "mnist_cnn", "minilm")
FORMATS = ("w8a8", "w8a16", "w4a8", "w4a16", "w16a16", "fp16", "fp8")


def run(quick: bool) -> list[dict]:
    rows = []
    for name in EXAMPLES:
        paths = prepare_example(name)
        model = load_model(paths["model"])
        cal = open_dataset(paths["calib"], model)
        ev = open_dataset(paths["eval"], model, name="evaluation")
        if quick:
            ev = ev.take(range(min(len(ev), 50)))
        t0 = time.perf_counter()
        analysis = analyze(model, cal)
        t_an = time.perf_counter() - t0
        print(f"{name}: analysed in {t_an:.1f} s ({len(analysis.graph.layers)} layers)",
              flush=True)
        for fmt in FORMATS:
            t0 = time.perf_counter()
            q = quantize(analysis, parse_candidate(fmt))
            t_ex = time.perf_counter() - t0
            r = evaluate(model, q.model, ev.batches(), labels=ev.labels).primary
            rows.append({"model": name, "format": fmt, "sqnr_db": r.sqnr_db,
                         "cosine": r.cosine, "top1_agreement": r.top1_agreement,
                         "accuracy": r.accuracy, "accuracy_fp32": r.accuracy_fp32,
                         "eval_samples": len(ev), "export_s": t_ex, "analyze_s": t_an,
                         "opset": q.opset})
            print(f"  {fmt:7s} {r.sqnr_db:6.2f} dB  cos {r.cosine:.4f}"
                  + (f"  top1 {r.top1_agreement:.3f}" if r.top1_agreement is not None else "")
                  + (f"  acc {r.accuracy:.4f}" if r.accuracy is not None else ""), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="50 evaluation samples per model")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = run(args.quick)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    table = markdown_table(
        ["model", "format", "SQNR dB", "cosine", "top-1 agree", "accuracy (FP32)", "opset"],
        [[r["model"], r["format"], f"{r['sqnr_db']:.2f}", f"{r['cosine']:.4f}",
          pct(r["top1_agreement"]),
          "-" if r["accuracy"] is None else f"{pct(r['accuracy'])} ({pct(r['accuracy_fp32'])})",
          str(r["opset"])] for r in rows])
    print(table)
    out = write_results(
        "uniform_formats", title="Uniform formats on the three examples (ORT CPU EP)",
        command="python benchmarks/uniform_formats.py" + (" --quick" if args.quick else ""),
        table=table, payload=rows,
        notes="Evaluation sets: EfficientNet-Lite0 200 crops, MNIST 1000 held-out digits "
              "(with labels), MiniLM 200 sentences. fp16 runs as float with fp16-rounded "
              "weights; fp8 is e4m3fn with per-channel weight and per-tensor activation scales.")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
