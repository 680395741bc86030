"""AIMET's automatic mixed precision (AMP) against mpsearch run, EfficientNet-Lite0, same BOPs.

Side by side at the same bit-operations.

    python benchmarks/aimet_amp.py [--drop DB] [--aimet-python PATH] [--quant-scheme S]

AIMET runs in its own virtual environment (its dependencies are not mpsearch's), set up once:

    python3.11 -m venv /tmp/aimet_venv
    /tmp/aimet_venv/bin/pip install -c constraints.txt aimet-onnx    # 2.42.0; torch 2.13.0 CPU

(``--aimet-python``, default ``$AIMET_PYTHON`` or ``/tmp/aimet_venv/bin/python``). Nothing is
downloaded at run time. Both sides get the same model, the same 64 calibration crops
(``calib.npz``) and are measured on the same 200 evaluation crops of other photos
(``eval.npz``), SQNR ``10·log10(Σ y² / Σ (y - ŷ)²)`` of the logits and top-1 agreement against
FP32:

1. **AIMET AMP** (``benchmarks/_aimet_amp_worker.py``, in AIMET's venv):
   ``QuantizationSimModel(config_file="htp_v75")`` (Snapdragon 8 Gen 3 is HTP v75; per-channel
   symmetric int weights for Conv/Gemm), then ``aimet_onnx.mixed_precision.
   choose_mixed_precision`` with the candidates (activation bits, weight bits) = (16, 8),
   (8, 8), (8, 4), AIMET's phase 1 optimised (one evaluation per quantizer group and
   candidate) and its binary search in phase 2. AIMET needs an evaluation callback and has no
   held-out split: the score is the logits' SQNR against FP32 on the 64 calibration crops,
   which are also its forward-pass data; FP32 scores the cap of 100 dB, so ``--drop D`` is a
   target of ``100 - D`` dB. ``DROP`` is chosen so that AIMET's plan lands near 0.89x uniform
   w8a8's bit-operations, where it landed in an earlier measurement. Timed: the
   ``choose_mixed_precision`` call alone. Its plan's bit-operations: the sum over Conv/Gemm
   layers of MACs (mpsearch's layer graph) x weight bits x the bits of the layer's input
   activation, over the same sum at w8a8; measured: the sim itself (AIMET's QcQuantizeOp
   session) and its QDQ export (``sim.to_onnx_qdq()`` on plain ONNX Runtime).
2. **mpsearch** with the demo's profile at AIMET's bit-operations, rounded up to 2 decimals:
   ``mpsearch run MODEL --hw hw_profiles/snapdragon_8gen3.yaml --data calib.npz --eval-data
   eval.npz --budget bops=B --no-cache --out TMP --json -q``, timed as a whole process
   (calibration, sensitivities, refinement, ILP, measured shortlist, exports, evaluation,
   emulated HTP verification, report). Once with every candidate the profile allows (the demo:
   w8a8, w8a16, w4a8, w4a16, w16a16, fp16) and once with ``--candidates w8a16,w8a8,w4a8``,
   AIMET's three.

What differs between the two sides, besides the search: AIMET's sim is plain post-training
quantization (its ranges, round to nearest; AdaRound, SeqMSE and bias correction are
separate AIMET steps that AMP does not run), mpsearch's plans have bias correction and
Hessian-compensated rounding. AIMET fits and scores on all 64 crops, mpsearch holds 16 of them
out to choose between measured plans (``--check 0.25``). AIMET's quantizer groups include
activation-only ones (the pre-Clip outputs of the depthwise convs, the Adds): those it may keep
at 16 bits without any cost in bit-operations, which count MACs x weight bits x input bits;
mpsearch's activation format holds for a layer's inputs and output. tf_enhanced makes each of
AIMET's 20 ``compute_encodings`` calls cost several seconds (``min_max`` about 2.6 s each on 64
crops here), so about 40% of its search time is range setting.

Writes benchmarks/results/aimet_amp.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_aimet_amp_worker.py"
PROFILE = ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"
DEFAULT_AIMET_PYTHON = "/tmp/aimet_venv/bin/python"
DROP = 86.46  # dB below FP32's capped 100 dB: a target of 13.54 dB on the calibration crops
SAME_CANDIDATES = "w8a16,w8a8,w4a8"


def _aimet(python: str, p: dict, drop: float, scheme: str, work: Path) -> dict:
    out = work / "aimet.json"
    cmd = [python, str(WORKER), "--model", str(p["model"]), "--calib", str(p["calib"]),
           "--eval", str(p["eval"]), "--drop", str(drop), "--quant-scheme", scheme,
           "--work", str(work / "aimet"), "--out", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"AIMET worker failed ({r.returncode}):\n{r.stderr[-4000:]}")
    doc = json.loads(out.read_text())
    doc["process_wall_s"] = round(wall, 2)
    return doc


def _plan_bops(model: Path, plan: dict[str, dict]) -> tuple[float, dict[str, int]]:
    """Bit-operations of AIMET's per-layer bits relative to all-w8a8, with mpsearch's MACs."""
    from mpsearch.graph.layer_graph import build_layer_graph, load_model

    lg = build_layer_graph(load_model(model))
    macs = {name: int(layer.macs or 0) for name, layer in lg.layers.items()}
    missing = sorted(set(macs) ^ set(plan))
    if missing:
        raise SystemExit(f"AIMET's layers and mpsearch's differ: {missing[:10]}")
    bops = 0.0
    for name, m in macs.items():
        w, a = plan[name]["w_bits"] or 32, plan[name]["a_bits"] or 32  # None: float
        bops += m * w * a
    return bops / (64.0 * sum(macs.values())), macs


def _mpsearch(p: dict, budget: float, out: Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "mpsearch", "run", str(p["model"]),
           "--hw", str(PROFILE), "--data", str(p["calib"]), "--eval-data", str(p["eval"]),
           "--budget", f"bops={budget:.2f}", *extra, "--no-cache", "--out", str(out),
           "--json", "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"mpsearch run failed ({r.returncode}): {r.stderr[-3000:]}")
    doc = json.loads(r.stdout)
    doc["_returncode"] = r.returncode
    plan = out / "plan.json"
    doc["_layers"] = json.loads(plan.read_text())["layers"] if plan.is_file() else None
    return wall, doc


def _counts(layers: list[dict]) -> str:
    got: dict[str, int] = {}
    for row in layers:
        got[row["candidate"]] = got.get(row["candidate"], 0) + 1
    return ", ".join(f"{n} {c}" for c, n in sorted(got.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drop", type=float, default=DROP,
                    help=f"AIMET's allowed_accuracy_drop in dB (default {DROP:g}: a target of "
                         f"{100 - DROP:g} dB on the calibration crops)")
    ap.add_argument("--aimet-python",
                    default=os.environ.get("AIMET_PYTHON", DEFAULT_AIMET_PYTHON),
                    help="python of the venv with aimet-onnx (default $AIMET_PYTHON or "
                         f"{DEFAULT_AIMET_PYTHON})")
    ap.add_argument("--quant-scheme", default="tf_enhanced", choices=("tf_enhanced", "min_max"),
                    help="AIMET's range setting (default tf_enhanced, its SQNR-based one)")
    args = ap.parse_args()
    if not Path(args.aimet_python).is_file():
        raise SystemExit(f"no AIMET python at {args.aimet_python}: set up its venv (see "
                         "the docstring of benchmarks/aimet_amp.py) or pass --aimet-python")
    p = prepare_example("efficientnet_lite0")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        aimet = _aimet(args.aimet_python, p, args.drop, args.quant_scheme, work)
        print(f"AIMET AMP: {aimet['search_s']:.1f} s, {aimet['evaluations']} evaluations",
              flush=True)
        ratio, _ = _plan_bops(Path(p["model"]), aimet["plan"])
        budget = math.ceil(ratio * 100 - 1e-9) / 100
        runs = {}
        for label, extra in (("all profile candidates", []),
                             (f"--candidates {SAME_CANDIDATES}",
                              ["--candidates", SAME_CANDIDATES])):
            wall, doc = _mpsearch(p, budget, work / f"mp{len(runs)}", extra)
            runs[label] = (wall, doc)
            print(f"mpsearch ({label}): {wall:.1f} s", flush=True)

    rows, payload_runs = [], {}
    a_eval = aimet["qdq"]["evaluation"]
    s_eval = aimet["sim"]["evaluation"]
    pairs: dict[str, int] = {}
    for v in aimet["plan"].values():
        key = f"w{v['w_bits']}a{v['a_bits']}"
        pairs[key] = pairs.get(key, 0) + 1
    aimet_layers = ", ".join(f"{n} {c}" for c, n in sorted(pairs.items(), key=lambda kv: -kv[1]))
    rows.append([f"AIMET AMP {aimet['aimet_onnx']} (QDQ export)", f"{ratio:.3f}",
                 f"{a_eval['sqnr_db']:.2f}", f"{100 * a_eval['top1_agreement']:.1f}%",
                 f"{aimet['search_s']:.1f} (search)", aimet_layers])
    rows.append([f"AIMET AMP {aimet['aimet_onnx']} (its sim)", f"{ratio:.3f}",
                 f"{s_eval['sqnr_db']:.2f}", f"{100 * s_eval['top1_agreement']:.1f}%", "", ""])
    for label, (wall, doc) in runs.items():
        m = doc["quality"]["measured"] or {}
        rel = doc["totals"]["bops"]["relative_to_w8a8"]
        plan_layers = doc["_layers"]
        rows.append([f"mpsearch run, {label}", f"{rel:.3f}", f"{m.get('sqnr_db', math.nan):.2f}",
                     f"{100 * m.get('top1_agreement', math.nan):.1f}%", f"{wall:.1f} (whole run)",
                     _counts(plan_layers) if plan_layers else "-"])
        payload_runs[label] = {"wall_s": round(wall, 2), "bops_x_w8a8": rel,
                               "sqnr_db": m.get("sqnr_db"), "sqnr_ci_db": m.get("sqnr_ci_db"),
                               "top1_agreement": m.get("top1_agreement"),
                               "samples": m.get("samples"), "stages": doc.get("stages"),
                               "returncode": doc["_returncode"],
                               "layers": _counts(plan_layers) if plan_layers else None}
    table = markdown_table(["method", "BOPs x w8a8", "SQNR dB (200 eval crops)", "top-1 agree",
                            "seconds", "layers"], rows)
    speed = "\n".join(f"AIMET search s / mpsearch whole-run s ({label}): "
                      f"{aimet['search_s'] / wall:.2f}" for label, (wall, _) in runs.items())
    print(table + "\n\n" + speed)
    payload = {"aimet": {k: v for k, v in aimet.items() if k != "scores"},
               "aimet_bops_x_w8a8": ratio, "budget": f"bops={budget:.2f}",
               "mpsearch": payload_runs,
               "speed_ratio": {label: aimet["search_s"] / wall
                               for label, (wall, _) in runs.items()}}
    a = aimet
    notes = (
        f"AIMET: aimet-onnx {a['aimet_onnx']}, `{a['api']}`, config `{a['config_file']}`, "
        f"quant scheme {a['quant_scheme']}, candidates (a, w) = "
        f"{', '.join(str(tuple(c)) for c in a['candidates_a_w'])}; score = logits' SQNR "
        f"against FP32 on the {a['calib_samples']} calibration crops (capped at "
        f"{a['score_cap_db']:g} dB, FP32's score), allowed_accuracy_drop "
        f"{a['allowed_accuracy_drop_db']:g} dB, i.e. a target of "
        f"{a['target_calib_sqnr_db']:g} dB; its plan scores "
        f"{a['qdq']['calibration']['sqnr_db']:.2f} dB there. Search: {a['search_s']:.1f} s, "
        f"{a['evaluations']} evaluations ({a['eval_s']:.1f} s), {a['compute_encodings']} "
        f"compute_encodings ({a['compute_encodings_s']:.1f} s). mpsearch: `--budget "
        f"bops={budget:.2f}` (AIMET's {ratio:.3f} rounded up), whole process. Seconds on the "
        "same machine, one run each, one after the other.\n\n" + speed)
    write_results("aimet_amp", title="AIMET AMP against mpsearch run on EfficientNet-Lite0 "
                  "at the same bit-operations", command="python benchmarks/aimet_amp.py"
                  + (f" --drop {args.drop:g}" if args.drop != DROP else "")
                  + (f" --quant-scheme {args.quant_scheme}"
                     if args.quant_scheme != "tf_enhanced" else ""),
                  table=table, payload=payload, notes=notes, git=True)


if __name__ == "__main__":
    main()
