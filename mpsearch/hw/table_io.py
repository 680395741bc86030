"""The latency table as text in a profile. It is written below a marker comment so that the
hand-written part above (its comments) survives, since PyYAML cannot round-trip comments; the
result is validated before it is written, and written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

from mpsearch.core.errors import ProfileError
from mpsearch.hw.profile import LatencyTable, parse_profile

__all__ = ["MARKER", "table_yaml", "write_latency_table"]

MARKER = "# ---- latency_table: written by mpsearch hw measure; do not edit below ----"


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _key(name: str) -> str:
    if _PLAIN_KEY.fullmatch(name) and name.lower() not in _YAML_WORDS:
        return name
    return json.dumps(name)  # a JSON string is a YAML double-quoted scalar


def _num(v: float) -> str:
    return f"{v:.4e}"  # always a dot and a signed exponent: YAML 1.1 reads it as a float


def table_yaml(table: LatencyTable) -> str:
    """The table as the top-level ``latency_table:`` section (seconds, batch 1)."""
    lines = ["latency_table:",
             f"  model_sha256: {table.model_sha256}",
             f"  source: {json.dumps(table.source)}",
             f"  conversion_s_per_byte: {_num(table.conversion_s_per_byte)}",
             "  other_s: {" + ", ".join(f"{_key(str(f))}: {_num(v)}"
                                        for f, v in table.other_s.items()) + "}",
             "  layers:"]
    for name, entries in table.layers.items():
        inner = ", ".join(f"{_key(c.name)}: {_num(v)}" for c, v in entries.items())
        lines.append(f"    {_key(name)}: {{{inner}}}")
    return "\n".join(lines) + "\n"


def _without_table(text: str) -> str:
    """The profile text above the marker; without a marker, the text less any top-level
    ``latency_table:`` block."""
    lines = text.splitlines()
    if MARKER in (ln.rstrip() for ln in lines):
        return "\n".join(lines[:[ln.rstrip() for ln in lines].index(MARKER)])
    out, inside = [], False
    for ln in lines:
        if re.match(r"latency_table\s*:", ln):
            inside = True
            continue
        if inside and ln.strip() and not ln[0].isspace() and not ln.startswith("#"):
            inside = False
        if not inside:
            out.append(ln)
    return "\n".join(out)


def write_latency_table(profile_path: str | os.PathLike[str], table: LatencyTable,
                        out_path: str | os.PathLike[str]) -> Path:
    """Write the profile at ``profile_path`` with ``table`` as its ``latency_table:`` section
    to ``out_path`` (which may be the same file): everything above the marker line is kept
    verbatim, a previous table is replaced. The text is validated before it is written, and
    written atomically."""
    src, out = Path(profile_path), Path(out_path)
    try:
        text = src.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"hardware profile {src} cannot be read ({e})",
                           fix="check the file") from e
    head = _without_table(text).rstrip("\n")
    new = (f"{head}\n\n{MARKER}\n# Seconds per run, batch 1; what is timed: "
           f"mpsearch/device/latency.py.\n{table_yaml(table)}")
    parse_profile(new, where=str(out), path=out)  # what is written must read back
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, src.stat().st_mode & 0o777 if src.exists() else 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out
