"""What every benchmark shares: building the examples, describing the machine, writing results.

Results go to ``benchmarks/results/<name>.md`` (a table a person reads) and ``.json`` (the
same numbers for scripts), both stamped with the machine and the date.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def prepare_example(name: str) -> dict[str, Path]:
    """Build (or reuse) ``examples/<name>/cache``; returns the paths of model and data."""
    path = ROOT / "examples" / name / "prepare.py"
    spec = importlib.util.spec_from_file_location(f"_prepare_{name}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.prepare()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("onnx", "onnxruntime", "numpy", "mpsearch")},
    }


def git_commit() -> str | None:
    """``git describe --always --dirty`` of the checkout, or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, *, title: str, command: str, table: str, payload: Any,
                  notes: str = "", git: bool = False) -> Path:
    """Write ``results/<name>.md`` and ``.json``; returns the markdown path. ``git``: also
    stamp the checkout's commit (``git describe --dirty``) next to the machine."""
    RESULTS.mkdir(exist_ok=True)
    m = machine()
    if git:
        m["git"] = git_commit()
    md = [f"# {title}", "", f"Command: `{command}`", "",
          f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), {m['platform']}, "
          f"Python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
          + (f", git {m['git']}" if git else ""),
          "", table, ""]
    if notes:
        md += [notes, ""]
    out = RESULTS / f"{name}.md"
    out.write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"machine": m, "command": command, "results": payload}, indent=2) + "\n")
    return out
