"""Wall time of a full ``mpsearch run`` on EfficientNet-Lite0 (the demo's arguments).

    python benchmarks/run_speed.py [--repeats 3]

Each repeat is a fresh process with ``--no-cache``: calibration, Hessian sensitivities,
refinement, the ILP and the front, the measured shortlist, exports, evaluation of the plan and
its baselines on 200 held-out crops, QNN HTP verification (emulated, 8 samples) and the report.
A second configuration skips the verification (``--no-verify``), so the search alone is timed
too; the two alternate so that load drifts hit both. Also checks that every repeat wrote the
same bytes. Target (issue "search"): median <= 60 s on 2 cores.

Writes benchmarks/results/run_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
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


def _run(argv: list[str], out: Path) -> tuple[float, dict[str, str]]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mpsearch", "run", *argv, "--out", str(out), "-q"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t0
    return wall, {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in FILES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    p = prepare_example("efficientnet_lite0")
    base = [str(p["model"]), "--hw", str(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"),
            "--budget", "bops=0.75", "--data", str(p["calib"]), "--eval-data", str(p["eval"]),
            "--no-cache"]
    configs = {"run (with QNN verification)": base, "run --no-verify": [*base, "--no-verify"]}
    walls: dict[str, list[float]] = {k: [] for k in configs}
    digests: dict[str, list[dict[str, str]]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, argv in configs.items():
                wall, dig = _run(argv, Path(tmp) / f"{len(walls[name])}-{r}-{hash(name) & 0xff}")
                walls[name].append(wall)
                digests[name].append(dig)
                print(f"{name}: {wall:.1f} s", flush=True)
    rows = []
    for name, ws in walls.items():
        same = all(d == digests[name][0] for d in digests[name])
        rows.append([name, f"{statistics.median(ws):.1f}", " / ".join(f"{w:.1f}" for w in ws),
                     "yes" if same else "NO"])
    table = markdown_table(["configuration", "median wall s", "runs", "same bytes every run"],
                           rows)
    print(table)
    write_results("run_speed", title="mpsearch run on EfficientNet-Lite0 (Snapdragon 8 Gen 3, "
                  "bops=0.75): wall time", command="python benchmarks/run_speed.py"
                  + (f" --repeats {args.repeats}" if args.repeats != 3 else ""), table=table,
                  payload={"walls": walls, "digests": digests}, git=True,
                  notes="Fresh processes, no sensitivity cache. Target: median <= 60 s on "
                        "2 cores. 'same bytes': plan.json, model.qdq.onnx and report.html "
                        "identical across the repeats of a configuration.")


if __name__ == "__main__":
    main()
