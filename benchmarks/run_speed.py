"""Wall time of a full ``mpsearch run`` on EfficientNet-Lite0 (the demo's arguments), against
an earlier commit side by side.

    python benchmarks/run_speed.py [--baseline REV] [--repeats 3]

Each repeat is a fresh process with ``--no-cache``: calibration, Hessian sensitivities,
refinement, the ILP and the front, the measured shortlist, exports, evaluation of the plan and
its baselines on the 200 evaluation crops, QNN HTP verification (emulated) and the report.
With ``--baseline REV`` (default: the commit before the speed work of the issue "fast enough
to run on every commit") that commit is checked out into a temporary git worktree and run with
the same arguments, alternating with this checkout so that drifts of the machine's load hit
both; the ratio is taken pair by pair. Also:

* the seconds per stage (``run --json``'s ``stages``), medians over the repeats;
* whether every repeat of a version wrote the same bytes (plan.json, model.qdq.onnx,
  report.html);
* the plan and its SQNR and top-1 agreement on the evaluation crops at ``bops=0.75``, ``0.9``
  and ``1.0`` for both versions (``--no-verify``: the plan does not depend on it);
* ``python -X importtime -c "import mpsearch"``: the total, for both versions.

Target: median <= 30 s on 2 cores. Writes benchmarks/results/run_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FILES = ("plan.json", "model.qdq.onnx", "report.html")
BASELINE = "8f46b51"  # main before the speed work of this issue
TARGET_S = 30.0
BUDGETS = ("bops=0.75", "bops=0.9", "bops=1.0")


def _run(src: Path, argv: list[str], out: Path) -> tuple[float, dict, dict[str, str]]:
    """One fresh ``mpsearch run`` from the checkout ``src``: wall seconds, its --json
    document, and the digests of FILES."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mpsearch", "run", *argv, "--out", str(out),
                        "--json", "-q"], check=False, capture_output=True, text=True, env=env,
                       cwd=src)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"mpsearch run from {src} failed ({r.returncode}): {r.stderr[-2000:]}")
    doc = json.loads(r.stdout)
    digests = {n: hashlib.sha256((out / n).read_bytes()).hexdigest()
               for n in FILES if (out / n).is_file()}
    return wall, doc, digests


def _import_ms(src: Path) -> float:
    """``python -X importtime -c "import mpsearch"``: the cumulative microseconds of the
    top-level import, as milliseconds (the median of 3 fresh processes)."""
    got = []
    for _ in range(3):
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mpsearch"],
                           capture_output=True, text=True, check=True, cwd=src,
                           env={**os.environ, "PYTHONPATH": str(src)})
        line = next(ln for ln in r.stderr.splitlines() if ln.rstrip().endswith("| mpsearch"))
        got.append(int(line.split("|")[1]) / 1000)
    return statistics.median(got)


def _plan_digest(out: Path) -> str:
    layers = json.loads((out / "plan.json").read_text())["layers"]
    text = json.dumps([[r["group"], r["candidate"]] for r in layers])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare against "
                    f"(default {BASELINE}); 'none': this checkout alone")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    p = prepare_example("efficientnet_lite0")
    base = [str(p["model"]), "--hw", str(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"),
            "--budget", "bops=0.75", "--data", str(p["calib"]), "--eval-data", str(p["eval"]),
            "--no-cache"]
    with tempfile.TemporaryDirectory() as tmp:
        versions: dict[str, Path] = {"this checkout": ROOT}
        if args.baseline != "none":
            wt = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f",
                            str(wt), args.baseline], check=True, capture_output=True)
            versions = {f"baseline {args.baseline}": wt, **versions}
        try:
            payload = _measure(versions, base, p, args.repeats, Path(tmp))
        finally:
            if args.baseline != "none":
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(Path(tmp) / "baseline")], check=False, capture_output=True)
    tables = payload.pop("tables")
    print("\n\n".join(tables))
    write_results("run_speed", title="mpsearch run on EfficientNet-Lite0 (Snapdragon 8 Gen 3, "
                  "bops=0.75): wall time, before and after",
                  command="python benchmarks/run_speed.py"
                  + (f" --baseline {args.baseline}" if args.baseline != BASELINE else "")
                  + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
                  table="\n\n".join(tables), payload=payload, git=True,
                  notes=f"Fresh processes, no sensitivity cache, the two versions alternating. "
                        f"Target: median <= {TARGET_S:g} s on 2 cores. 'same bytes': "
                        "plan.json, model.qdq.onnx and report.html identical across the "
                        "repeats of a version. Plans at the three budgets: one run each, "
                        "--no-verify; 'plan' is a digest of the layer -> format list.")


def _measure(versions: dict[str, Path], base: list[str], p: dict, repeats: int,
             tmp: Path) -> dict:
    walls: dict[str, list[float]] = {v: [] for v in versions}
    stages: dict[str, list[dict[str, float]]] = {v: [] for v in versions}
    digests: dict[str, list[dict[str, str]]] = {v: [] for v in versions}
    for r in range(repeats):
        for k, (name, src) in enumerate(versions.items()):
            wall, doc, dig = _run(src, base, tmp / f"t{k}-{r}")
            walls[name].append(wall)
            stages[name].append(doc.get("stages") or {})
            digests[name].append(dig)
            print(f"{name}: {wall:.1f} s", flush=True)
    names = list(versions)
    rows = []
    for name in names:
        same = all(d == digests[name][0] for d in digests[name])
        rows.append([name, f"{statistics.median(walls[name]):.1f}",
                     " / ".join(f"{w:.1f}" for w in walls[name]), "yes" if same else "NO",
                     "yes" if statistics.median(walls[name]) <= TARGET_S else "no"])
    ratio = None
    if len(names) == 2:
        ratio = statistics.median(a / b for a, b in zip(walls[names[1]], walls[names[0]],
                                                         strict=True))
    timing = markdown_table(["version", "median wall s", "runs", "same bytes every run",
                             f"<= {TARGET_S:g} s"], rows)
    if ratio is not None:
        timing += f"\n\nThis checkout / baseline, pair by pair (median): {ratio:.3f}"
    keys = list(dict.fromkeys(k for name in names for s in stages[name] for k in s))
    stage_rows = [[k, *[f"{statistics.median(s.get(k, float('nan')) for s in stages[n]):.2f}"
                        if any(k in s for s in stages[n]) else "-" for n in names]]
                  for k in keys]
    stage_table = markdown_table(["stage (s, median)", *names], stage_rows)
    plan_rows, plans = [], {}
    for b in BUDGETS:
        row = [b]
        for k, (name, src) in enumerate(versions.items()):
            out = tmp / f"b{k}-{b}"
            _, doc, _ = _run(src, [*base[:3], "--budget", b, *base[5:], "--no-verify"], out)
            m = doc["quality"]["measured"] or {}
            plans[(b, name)] = {"plan": _plan_digest(out), "sqnr_db": m.get("sqnr_db"),
                                "top1": m.get("top1_agreement"),
                                "bops": doc["totals"]["bops"]["relative_to_w8a8"]
                                if isinstance(doc.get("totals", {}).get("bops"), dict) else None}
            q = plans[(b, name)]
            row += [q["plan"], f"{q['sqnr_db']:.3f}" if q["sqnr_db"] is not None else "-",
                    f"{100 * q['top1']:.1f}%" if q["top1"] is not None else "-"]
            print(f"{b} {name}: {q}", flush=True)
        if len(names) == 2:
            a, c = plans[(b, names[0])], plans[(b, names[1])]
            row.append("same plan" if a["plan"] == c["plan"] else "other plan")
        plan_rows.append(row)
    head = ["budget"]
    for n in names:
        head += [f"{n}: plan", f"{n}: eval SQNR dB", f"{n}: top-1"]
    if len(names) == 2:
        head.append("")
    plan_table = markdown_table(head, plan_rows)
    imports = {name: _import_ms(src) for name, src in versions.items()}
    import_table = markdown_table(["version", "import mpsearch (ms, -X importtime, median of 3)"],
                                  [[n, f"{v:.0f}"] for n, v in imports.items()])
    return {"tables": [timing, stage_table, plan_table, import_table], "walls": walls,
            "stages": stages, "digests": digests, "ratio": ratio,
            "plans": {f"{b} | {n}": v for (b, n), v in plans.items()}, "import_ms": imports}


if __name__ == "__main__":
    main()
