"""Wall time of ``mpsearch sensitivity`` on EfficientNet-Lite0 (Snapdragon profile, its six
candidates for 50 groups = 300 pairs), each configuration run several times side by side in
one session, medians reported.

    python benchmarks/sensitivity_speed.py [--repeats 3]

Every run is the command line in a fresh process (imports, model and data loading, the
calibration pass, the estimates, writing CSV/JSON/PNG), as a user runs it:

* ``--method hessian --no-cache``: one calibration pass with the layer Hessians, noise gains,
  4 measured runs for the fit;
* ``--method measured --no-cache`` with ``--workers 1`` and ``--workers 2``;
* a cached re-run (the table is in the cache: no calibration).

For reference (docs/design.md §6): AIMET's AMP needed 102 s and 172 full evaluations for three
candidates on this model here. Writes benchmarks/results/sensitivity_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, prepare_example, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], out: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mpsearch", "sensitivity", *argv, "--out", str(out),
                    "-q", "--json"], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    doc = json.loads((out / "sensitivity.json").read_text())
    return wall, doc.get("seconds", {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-measured", action="store_true",
                    help="time the hessian and cached configurations only; results go to "
                         "results/sensitivity_speed_hessian.md")
    args = ap.parse_args()
    p = prepare_example("efficientnet_lite0")
    base = [str(p["model"]), "--hw", str(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"),
            "--data", str(p["calib"])]
    configs = {
        "hessian": [*base, "--method", "hessian", "--no-cache"],
        "measured, 1 worker": [*base, "--method", "measured", "--no-cache", "--workers", "1"],
        "measured, 2 workers": [*base, "--method", "measured", "--no-cache", "--workers", "2"],
    }
    if args.skip_measured:
        configs = {k: v for k, v in configs.items() if not k.startswith("measured")}
    walls: dict[str, list[float]] = {k: [] for k in [*configs, "cached re-run"]}
    stages: dict[str, list[dict]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        cache = tmpd / "cache"
        _run([*base, "--method", "hessian", "--cache-dir", str(cache)], tmpd / "warm")
        for r in range(args.repeats):  # interleaved, so load drifts hit every configuration
            for name, argv in configs.items():
                wall, sec = _run(argv, tmpd / f"{name}-{r}".replace(" ", "_").replace(",", ""))
                walls[name].append(wall)
                stages[name].append(sec)
                print(f"{name}: {wall:.1f} s", flush=True)
            for k in range(2):
                wall, _ = _run([*base, "--method", "hessian", "--cache-dir", str(cache)],
                               tmpd / f"cached-{r}-{k}")
                walls["cached re-run"].append(wall)
                print(f"cached re-run: {wall:.2f} s", flush=True)
    rows = []
    for name, ws in walls.items():
        st = stages.get(name) or [{}]
        keys = sorted({k for s in st for k in s})
        parts = ", ".join(f"{k} {statistics.median(s.get(k, 0.0) for s in st):.1f}"
                          for k in keys)
        rows.append([name, f"{statistics.median(ws):.2f}", " / ".join(f"{w:.1f}" for w in ws),
                     parts or "-"])
    table = markdown_table(["configuration", "median wall s", "runs", "median stage seconds"],
                           rows)
    print(table)
    name = "sensitivity_speed_hessian" if args.skip_measured else "sensitivity_speed"
    write_results(name, title="mpsearch sensitivity: wall time on "
                  "EfficientNet-Lite0 (300 group x candidate pairs)",
                  command="python benchmarks/sensitivity_speed.py"
                  + (" --skip-measured" if args.skip_measured else "")
                  + (f" --repeats {args.repeats}" if args.repeats != 3 else ""), table=table,
                  payload={"walls": walls, "stages": stages}, git=True,
                  notes="Targets (issue): hessian <= 15 s, measured <= 120 s, cached <= 2 s. "
                        "AIMET AMP: 102 s and 172 evaluations for three candidates here.")


if __name__ == "__main__":
    main()
