"""How the cost of a run grows with the model: seconds per stage and peak resident memory of
``mpsearch run`` against the number of quantizer groups, and the solver alone on a synthetic
problem of 1,000 groups x 12 candidates.

    python benchmarks/scaling.py [--only mnist_cnn,...] [--profile ort_cpu] [--budget bops=0.9]
                                 [--solver-groups 1000] [--repeats 3]

Models: the examples that are built here (MNIST CNN, EfficientNet-Lite0, MiniLM, and
all-mpnet-base-v2 where ``examples/mpnet_base`` exists), each run once in a fresh process with
``--no-cache`` on ``hw_profiles/<profile>.yaml`` (default ``ort_cpu``: no device check, so
the table is the search), its evaluation data measured as in a user's run. Per run: the
groups, the candidates offered in all, the seconds of each stage (``run --json``'s
``stages``), the wall time and the peak resident set of the process (its children included,
``getrusage(RUSAGE_CHILDREN)`` of a one-child launcher). The solver row builds a random
problem (seeded) with the allocation's shape: per group 12 options over 4 activation ports,
errors spread over four decades, BOP and byte costs, one hard BOP budget at 0.9 of the
all-w8a8-like option's total; the median of ``--repeats`` exact MILP solves (HiGHS, through
cvxpy; cvxpy's import, once per process, is timed apart).

Writes benchmarks/results/scaling.{md,json}.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, markdown_table, prepare_example, write_results  # noqa: E402

EXAMPLES = ("mnist_cnn", "efficientnet_lite0", "minilm", "mpnet_base")
STAGES = ("calibrate", "sensitivity", "refine", "solve", "select", "polish", "measure")
# all-mpnet-base-v2 with refinement on was killed by the kernel at 21.3 GB resident in its first
# refinement round on this 23 GB machine (examples/mpnet_base/README.md): its row is the run
# without the measured stages that grow with the plan's departures
EXTRA = {"mpnet_base": ("--refine", "0", "--polish", "0", "--front-points", "0")}
# a launcher with one child: its RUSAGE_CHILDREN peak is that child's (and its children's)
_LAUNCH = ("import resource, subprocess, sys\n"
           "r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)\n"
           "sys.stdout.buffer.write(r.stdout)\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
           "sys.exit(r.returncode)\n")


def run_model(name: str, profile: Path, budget: str) -> dict:
    paths = prepare_example(name)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mpsearch", "run", str(paths["model"]), "--hw",
               str(profile), "--data", str(paths["calib"]), "--eval-data", str(paths["eval"]),
               "--budget", budget, "--out", str(Path(tmp) / "out"), "--no-cache", "--json",
               "-q", *EXTRA.get(name, ())]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], capture_output=True,
                           text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if r.returncode not in (0, 3):
            raise SystemExit(f"{name}: mpsearch run failed ({r.returncode}): {r.stderr[-2000:]}")
        peak_kb = int(r.stderr.strip().splitlines()[-1])
        doc = json.loads(r.stdout)
        plan = json.loads((Path(tmp) / "out" / "plan.json").read_text())
        offered = json.loads((Path(tmp) / "out" / "sensitivity.json").read_text())["candidates"]
    sens = plan.get("sensitivity", {})
    options = sum(len(v) for v in offered.values())
    return {"model": name, "flags": " ".join(EXTRA.get(name, ())),
            "groups": plan["model"]["groups"], "layers": plan["model"]["layers"],
            "options": options, "samples": sens.get("samples"), "wall_s": round(wall, 2),
            "peak_mb": round(peak_kb / 1024, 1), "stages": doc.get("stages", {}),
            "pairs_measured": (plan.get("refinement") or {}).get("pairs_measured"),
            "selection_plans": len((plan.get("selection") or {}).get("contenders", [])),
            "polish_evaluations": (plan.get("polish") or {}).get("evaluations"),
            "parameters": _parameters(paths["model"]),
            "sqnr_db": (doc.get("quality", {}).get("measured") or {}).get("sqnr_db")}


def _parameters(path: Path) -> int:
    """The float weights of the model (initializer elements)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims) for t in m.graph.initializer))


def synthetic_problem(groups: int, seed: int = 0):
    """A random allocation problem of ``groups`` groups x 12 candidates (module docstring)."""
    from mpsearch.solve.problem import Problem

    rng = np.random.default_rng(seed)
    names = tuple(f"layer{i:04d}" for i in range(groups))
    ports = ("a8", "a16", "fp16", "a4")
    options, error, bops, size, port = {}, {}, {}, {}, {}
    for g in names:
        macs = float(rng.uniform(1e5, 1e8))
        weights = float(rng.uniform(1e3, 1e6))
        wbits = rng.choice([4, 8, 16], 12)
        abits = rng.choice([8, 16], 12)
        options[g] = tuple(f"c{j}" for j in range(12))
        scale = 10 ** rng.uniform(-4, 0)
        error[g] = tuple(float(scale * 4.0 ** -(w / 4) * 2.0 ** -(a / 8) * rng.uniform(0.5, 2))
                         for w, a in zip(wbits, abits, strict=True))
        bops[g] = tuple(float(macs * w * a) for w, a in zip(wbits, abits, strict=True))
        size[g] = tuple(float(weights * w / 8) for w in wbits)
        port[g] = tuple(ports[int(j % 4)] for j in range(12))
    return Problem(groups=names, options=options, error=error, ports=port,
                   costs={"bops": bops, "weight_bytes": size})


def solver_row(groups: int, repeats: int) -> dict:
    from mpsearch.solve.ilp import solve

    t0 = time.perf_counter()
    import cvxpy  # noqa: F401  (imported once per process by the run too; timed apart)
    import_s = time.perf_counter() - t0
    problem = synthetic_problem(groups)
    w8a8 = sum(max(problem.costs["bops"][g]) / 4 for g in problem.groups)
    times, status = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        sol = solve(problem, {"bops": 0.9 * w8a8})
        times.append(time.perf_counter() - t0)
        status = sol.status.value
    return {"model": f"synthetic ({groups} groups x 12)", "groups": groups,
            "options": groups * 12, "solve_s": round(statistics.median(times), 3),
            "solve_runs_s": [round(t, 3) for t in times], "status": status,
            "cvxpy_import_s": round(import_s, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(EXAMPLES))
    ap.add_argument("--profile", default="ort_cpu")
    ap.add_argument("--budget", default="bops=0.9")
    ap.add_argument("--solver-groups", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    profile = ROOT / "hw_profiles" / f"{args.profile}.yaml"
    rows = []
    for name in args.only.split(","):
        if not (ROOT / "examples" / name / "prepare.py").exists():
            print(f"{name}: no example here, skipped")
            continue
        rows.append(run_model(name, profile, args.budget))
        print(json.dumps(rows[-1]), flush=True)
    solver = solver_row(args.solver_groups, args.repeats)
    print(json.dumps(solver), flush=True)
    header = ["model", "groups", "options", *[f"{s} s" for s in STAGES], "wall s", "peak MB",
              "s per group"]
    table = [[r["model"] + (f" ({r['flags']})" if r["flags"] else ""), str(r["groups"]),
              str(r["options"]),
              *[f"{r['stages'].get(s, 0):.2f}" for s in STAGES], f"{r['wall_s']:.1f}",
              f"{r['peak_mb']:.0f}", f"{r['wall_s'] / r['groups']:.2f}"] for r in rows]
    table.append([solver["model"], str(solver["groups"]), str(solver["options"]),
                  *["-"] * 3, f"{solver['solve_s']:.2f}", *["-"] * 3, "-", "-", "-"])
    text = markdown_table(header, table)
    print(text)
    write_results("scaling", title="Cost against model size", git=True,
                  command="python benchmarks/scaling.py" + (
                      f" --only {args.only}" if args.only != ",".join(EXAMPLES) else ""),
                  table=text, payload={"runs": rows, "solver": solver,
                                       "profile": args.profile, "budget": args.budget})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
