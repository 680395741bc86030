"""Do mpsearch's plans for the Snapdragon 8 Gen 3 compile for its NPU, and compute there what ORT's
CPU EP computes?

    python benchmarks/qnn_verify.py [--models efficientnet_lite0,mnist_cnn,minilm] [--samples 8]

For each example, ``mpsearch run`` with the Snapdragon profile (hw_profiles/snapdragon_8gen3.yaml)
under a bit-operation budget, then ``mpsearch verify`` of its ``model.qdq.onnx`` on QNN HTP
soc_model 57 (Qualcomm's real compiler through ONNX Runtime's QNN EP, CPU fallback disabled; the
graph runs in emulation on x86): compiled, nodes on QNN / nodes of the compiled graph, and the
HTP output against the CPU EP on the first ``--samples`` evaluation samples (SQNR, worst
output). Target: every node on QNN and >= 25 dB for all three models. Emulation is 100-250x
slower than the CPU EP, hence few samples (8 take seconds here).

Writes benchmarks/results/qnn_verify.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"
SOC = 57
TARGET_DB = 25.0
# The demo's budget for the CNNs; MiniLM needs 16-bit activations (docs/design.md §4: w8a8
# reaches 0.84 cosine even on the CPU EP), so it gets room for them.
BUDGETS = {"efficientnet_lite0": "bops=0.75", "mnist_cnn": "bops=0.75", "minilm": "bops=1.5"}


def _mpsearch(*args: str) -> tuple[int, dict | None, str]:
    proc = subprocess.run([sys.executable, "-m", "mpsearch", *args, "--json", "-q"],
                          capture_output=True, text=True, cwd=ROOT)
    try:
        doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        doc = None
    return proc.returncode, doc, proc.stderr.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BUDGETS))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", metavar="DIR", help="keep the runs' outputs here (default: a "
                                                 "temporary folder)")
    args = ap.parse_args()
    rows, payload = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        for name in args.models.split(","):
            p = prepare_example(name)
            out = root / name
            budget = BUDGETS[name]
            t0 = time.perf_counter()
            code, run, err = _mpsearch("run", str(p["model"]), "--hw", str(PROFILE),
                                       "--budget", budget, "--data", str(p["calib"]),
                                       "--eval-data", str(p["eval"]), "--out", str(out))
            run_s = time.perf_counter() - t0
            if code != 0 or run is None:
                raise SystemExit(f"mpsearch run failed on {name} ({code}): {err}")
            t0 = time.perf_counter()
            code, doc, err = _mpsearch("verify", str(out / "model.qdq.onnx"), "--target",
                                       "qnn-htp", "--soc", str(SOC), "--data", str(p["eval"]),
                                       "--samples", str(args.samples),
                                       "--out", str(out / "verify.json"))
            verify_s = time.perf_counter() - t0
            if doc is None:
                raise SystemExit(f"mpsearch verify failed on {name} ({code}): {err}")
            n = doc["nodes"]
            sqnr = doc["sqnr_db"]
            ok = (code == 0 and doc["compiled"] and n["on_target"] == n["total"]
                  and isinstance(sqnr, (int, float)) and sqnr >= TARGET_DB)
            plan = ", ".join(f"{k} x{v}" for k, v in run["formats"].items())
            payload.append({"model": name, "budget": budget, "plan": run["formats"],
                            "cpu_quality": run["quality"], "verify": doc, "exit_code": code,
                            "meets_target": ok, "run_seconds": round(run_s, 1),
                            "verify_seconds": round(verify_s, 1)})
            reasons = "; ".join(sorted({r["reason"] for r in n["not_on_target"]})) or (
                doc["reasons"][0] if doc["reasons"] else "")
            rows.append([name, budget, plan, "yes" if doc["compiled"] else "no",
                         f"{n['on_target']}/{n['total']}" + ("" if doc["compiled"] else
                                                             " (model nodes)"),
                         f"{sqnr:.2f}" if isinstance(sqnr, (int, float)) else str(sqnr or "-"),
                         str(doc["samples"]), "yes" if ok else "NO",
                         f"{run_s:.0f} / {verify_s:.0f}", reasons])
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["model", "budget", "plan (formats x groups)", "compiled",
                            "nodes on QNN / total", "HTP vs CPU EP SQNR dB (worst output)",
                            "samples", "meets target", "run / verify s", "refusals"], rows)
    print(table)
    write_results("qnn_verify", title="mpsearch plans on Qualcomm's HTP (QNN EP, soc_model 57, "
                  "emulated): compiled, nodes on QNN, agreement with the CPU EP",
                  command="python benchmarks/qnn_verify.py" + (
                      f" --models {args.models}" if args.models != ",".join(BUDGETS) else "")
                  + (f" --samples {args.samples}" if args.samples != 8 else ""),
                  table=table, payload=payload, git=True,
                  notes="`mpsearch run MODEL --hw hw_profiles/snapdragon_8gen3.yaml --budget B "
                        "--data calib.npz --eval-data eval.npz`, then `mpsearch verify "
                        "OUT/model.qdq.onnx --target qnn-htp --soc 57 --data eval.npz "
                        "--samples N`. Nodes are those of ORT's placement record of the "
                        "compiled graph (after its NHWC layout transformation, so with "
                        "Transpose nodes the file lacks). SQNR: HTP emulation against ORT's "
                        "CPU EP on the same fixed-shape QDQ model, first N evaluation samples, "
                        "batch 1. Target: every node on QNN and >= 25 dB for every model."
                        " MiniLM is the example as built since its builder_version 3, exact "
                        "GELUs fused into ONNX Gelu (opset 20): with the exported Erf subgraphs "
                        "the compiler refused all six Erf nodes (\"Operators of type `Erf` are "
                        "not supported by QNN EP\"), 6 of 730 nodes, and nothing else.")


if __name__ == "__main__":
    main()
