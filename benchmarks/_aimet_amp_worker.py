"""AIMET AMP on one ONNX model, run in AIMET's own virtual environment (not mpsearch's).

Called by ``benchmarks/aimet_amp.py``; imports aimet_onnx, onnxruntime and numpy only, never
mpsearch. What it does:

1. FP32 logits of the model (plain ONNX Runtime session of the unmodified file) on the
   calibration and the evaluation samples;
2. ``QuantizationSimModel(model, config_file=CONFIG, quant_scheme=SCHEME)`` (per-channel
   symmetric int weights for Conv/Gemm in AIMET's HTP configs);
3. ``aimet_onnx.mixed_precision.choose_mixed_precision`` (AIMET's phase 1: one evaluation per
   quantizer group and non-baseline candidate; phase 2: binary search along its Pareto
   walk for the cheapest point whose score is within ``allowed_accuracy_drop`` of FP32's), with
   the calibration samples as forward-pass data and as evaluation data. The score is the
   SQNR ``10·log10(Σ y² / Σ (y - ŷ)²)`` of the logits against FP32 over all the calibration
   samples, capped at ``SCORE_CAP_DB`` (FP32 itself scores the cap, so an allowed drop ``D``
   means a target of ``SCORE_CAP_DB - D`` dB). Only this call is timed as the search;
4. the plan AIMET left in the sim: per Conv/Gemm node the bit-width of its weight quantizer
   and of the quantizer of its activation input;
5. SQNR and top-1 agreement against FP32 on the evaluation samples, of the sim itself
   (AIMET's QcQuantizeOp session) and of its QDQ export (``sim.to_onnx_qdq()`` run on plain
   ONNX Runtime).

    python benchmarks/_aimet_amp_worker.py --model M --calib C --eval E --drop D \
        --work DIR --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

SCORE_CAP_DB = 100.0
BATCH = 16
# (activation bits, weight bits): the three candidates of the comparison, in AIMET's order
CANDIDATES = ((16, 8), (8, 8), (8, 4))


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    signal = float(np.sum(np.square(ref, dtype=np.float64)))
    noise = float(np.sum(np.square(ref.astype(np.float64) - got.astype(np.float64))))
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def _run(session, name: str, x: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(None, {name: x[i:i + BATCH]})[0]
                           for i in range(0, len(x), BATCH)])


def _metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    return {"sqnr_db": round(_sqnr_db(ref, got), 4),
            "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
            "samples": int(len(ref))}


def _plan(model: onnx.ModelProto, sim) -> dict[str, dict]:
    """Per Conv/Gemm node: bits of its weight quantizer and of its activation input's
    quantizer (the first enabled quantizer found walking back through the producers; None
    where the tensor stays float)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    q = sim.qc_quantize_op_dict

    def act_quantizer(tensor: str):
        seen = set()
        while tensor not in seen:
            seen.add(tensor)
            if tensor in q and q[tensor].enabled:
                return q[tensor]
            node = producer.get(tensor)
            if node is None or not node.input:
                return None
            tensor = node.input[0]
        return None

    plan = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        wq = q.get(n.input[1])
        aq = act_quantizer(n.input[0])
        oq = q.get(n.output[0])
        plan[n.name] = {
            "w_bits": int(wq.bitwidth) if wq is not None and wq.enabled else None,
            "a_bits": int(aq.bitwidth) if aq is not None else None,
            "out_bits": int(oq.bitwidth) if oq is not None and oq.enabled else None}
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--drop", type=float, required=True,
                    help=f"allowed_accuracy_drop in dB below FP32's capped {SCORE_CAP_DB:g} dB")
    ap.add_argument("--work", required=True, help="AIMET's results_dir and the QDQ export")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--config", default="htp_v75", help="AIMET quantsim config alias")
    ap.add_argument("--quant-scheme", default="tf_enhanced", choices=("tf_enhanced", "min_max"))
    ap.add_argument("--calib-samples", type=int, default=None, help="first N only (smoke tests)")
    ap.add_argument("--eval-samples", type=int, default=None, help="first N only (smoke tests)")
    ap.add_argument("--reuse", action="store_true",
                    help="clean_start=False: reuse AIMET's cache in --work (to tune --drop; "
                         "such a run's time is not a search time)")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    from aimet_onnx.common.amp.utils import AMPSearchAlgo
    from aimet_onnx.common.defs import CallbackFunc, QuantizationDataType, QuantScheme
    from aimet_onnx.common.utils import AimetLogger
    from aimet_onnx.mixed_precision import choose_mixed_precision
    from aimet_onnx.quantsim import QuantizationSimModel

    for area in AimetLogger.LogAreas:
        AimetLogger.set_area_logger_level(area, logging.WARNING)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = onnx.load(args.model)
    name = model.graph.input[0].name
    xc = np.load(args.calib)[name][:args.calib_samples]
    xe = np.load(args.eval)[name][:args.eval_samples]

    fp32 = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    ref_c = _run(fp32, name, xc)
    ref_e = _run(fp32, name, xe)
    fp32_s = time.perf_counter() - t0

    scheme = {"tf_enhanced": QuantScheme.post_training_tf_enhanced,
              "min_max": QuantScheme.min_max}[args.quant_scheme]
    t0 = time.perf_counter()
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8",
                               quant_scheme=scheme, config_file=args.config)
    sim_s = time.perf_counter() - t0

    counts = {"evaluations": 0, "eval_s": 0.0, "forward_passes": 0, "forward_s": 0.0,
              "compute_encodings": 0, "compute_encodings_s": 0.0}
    compute_encodings = sim.compute_encodings

    def timed_compute_encodings(*a, **k):
        """sim.compute_encodings, counted and timed (AMP calls it on the instance)."""
        t = time.perf_counter()
        try:
            return compute_encodings(*a, **k)
        finally:
            counts["compute_encodings"] += 1
            counts["compute_encodings_s"] += time.perf_counter() - t

    sim.compute_encodings = timed_compute_encodings
    scores: list[float] = []

    def forward_pass(session, _args) -> None:
        t = time.perf_counter()
        for i in range(0, len(xc), BATCH):
            session.run(None, {name: xc[i:i + BATCH]})
        counts["forward_passes"] += 1
        counts["forward_s"] += time.perf_counter() - t

    def score(session, _args) -> float:
        t = time.perf_counter()
        s = min(_sqnr_db(ref_c, _run(session, name, xc)), SCORE_CAP_DB)
        counts["evaluations"] += 1
        counts["eval_s"] += time.perf_counter() - t
        scores.append(round(s, 4))
        return s

    dt = QuantizationDataType.int
    candidates = [((a, dt), (w, dt)) for a, w in CANDIDATES]
    t0 = time.perf_counter()
    pareto = choose_mixed_precision(
        sim, candidates, CallbackFunc(score), CallbackFunc(score),
        allowed_accuracy_drop=args.drop, results_dir=str(work / "amp"), clean_start=not args.reuse,
        forward_pass_callback=CallbackFunc(forward_pass), use_all_amp_candidates=False,
        phase1_optimize=True, amp_search_algo=AMPSearchAlgo.Binary)
    search_s = time.perf_counter() - t0
    evals_in_search = counts["evaluations"]
    sim.compute_encodings = compute_encodings

    plan = _plan(model, sim)
    t0 = time.perf_counter()
    sim_eval = _metrics(ref_e, _run(sim.session, name, xe))
    sim_calib = _metrics(ref_c, _run(sim.session, name, xc))
    qdq_path = work / "aimet_amp.qdq.onnx"
    qdq = sim.to_onnx_qdq()
    onnx.save(qdq, str(qdq_path))
    qs = ort.InferenceSession(str(qdq_path), providers=["CPUExecutionProvider"])
    qdq_eval = _metrics(ref_e, _run(qs, name, xe))
    qdq_calib = _metrics(ref_c, _run(qs, name, xc))
    measure_s = time.perf_counter() - t0

    info_path = work / "amp" / "amp_info_list.json"
    info = dict(json.loads(info_path.read_text())) if info_path.is_file() else {}
    # AIMET's own Pareto points: (bit-ops relative to its baseline candidate, score)
    points = [[float(p[0]), float(p[1])] for p in (pareto or [])]
    result = {
        "aimet_onnx": version("aimet-onnx"), "onnxruntime": version("onnxruntime"),
        "torch": version("torch"),
        "api": "aimet_onnx.mixed_precision.choose_mixed_precision(..., phase1_optimize=True, "
               "amp_search_algo=AMPSearchAlgo.Binary)",
        "config_file": args.config, "quant_scheme": args.quant_scheme,
        "candidates_a_w": [list(c) for c in CANDIDATES],
        "allowed_accuracy_drop_db": args.drop, "score_cap_db": SCORE_CAP_DB,
        "target_calib_sqnr_db": SCORE_CAP_DB - args.drop,
        "calib_samples": int(len(xc)), "eval_samples": int(len(xe)),
        "search_s": round(search_s, 2), "evaluations": evals_in_search,
        "forward_passes": counts["forward_passes"], "eval_s": round(counts["eval_s"], 2),
        "forward_s": round(counts["forward_s"], 2),
        "compute_encodings": counts["compute_encodings"],
        "compute_encodings_s": round(counts["compute_encodings_s"], 2),
        "reused_cache": args.reuse, "sim_build_s": round(sim_s, 2),
        "fp32_reference_s": round(fp32_s, 2), "measure_s": round(measure_s, 2),
        "scores": scores[:evals_in_search], "pareto_points": points,
        "amp_info": info, "plan": plan,
        "sim": {"evaluation": sim_eval, "calibration": sim_calib},
        "qdq": {"evaluation": qdq_eval, "calibration": qdq_calib, "path": str(qdq_path)},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
