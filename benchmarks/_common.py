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


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, *, title: str, command: str, table: str, payload: Any,
                  notes: str = "") -> Path:
    """Write ``results/<name>.md`` and ``.json``; returns the markdown path."""
    RESULTS.mkdir(exist_ok=True)
    m = machine()
    md = [f"# {title}", "", f"Command: `{command}`", "",
          f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), {m['platform']}, "
          f"Python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
          "", table, ""]
    if notes:
        md += [notes, ""]
    out = RESULTS / f"{name}.md"
    out.write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"machine": m, "command": command, "results": payload}, indent=2) + "\n")
    return out
