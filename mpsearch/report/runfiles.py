"""A run folder read once: ``plan.json`` (required, checked), ``sensitivity.json`` and
``verify.json`` (optional; a file that cannot be read becomes a problem shown on the page, not
an error), and the one-line state of the verification."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpsearch.core.errors import UsageError
from mpsearch.sensitivity.table import SensitivityTable

__all__ = ["RunFiles", "load_run", "verify_status"]


@dataclass(frozen=True, kw_only=True)
class RunFiles:
    """What a run folder holds, read and checked once."""

    path: Path
    plan: Mapping[str, Any]
    sensitivity: Mapping[str, Any] | None = None
    sensitivity_table: SensitivityTable | None = None
    verify: Mapping[str, Any] | None = None
    config_hw: str | None = None  # config.yaml's profile path, relative to the folder
    problems: tuple[str, ...] = field(default=())  # optional files that could not be read


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_run(run_dir: str | os.PathLike[str]) -> RunFiles:
    """Read a run folder; a missing or invalid folder or ``plan.json`` raises UsageError."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UsageError(f"{d} is not a folder", fix="pass the --out folder of 'mpsearch run'")
    p = d / "plan.json"
    if not p.is_file():
        raise UsageError(f"{d} holds no plan.json", fix="pass the --out folder of 'mpsearch run'")
    try:
        plan = _read_json(p)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{p} cannot be read as JSON ({e})",
                         fix="run 'mpsearch run' again to rewrite it") from e
    if not isinstance(plan, dict) or not str(plan.get("schema", "")).startswith("mpsearch.plan/"):
        raise UsageError(f"{p} is not an mpsearch plan (no 'schema': 'mpsearch.plan/1')",
                         fix="pass the --out folder of 'mpsearch run'")
    for key in ("layers", "totals", "quality"):
        if key not in plan:
            raise UsageError(f"{p} has no '{key}'", fix="run 'mpsearch run' again to rewrite it")
    problems, optional = [], {}
    for name in ("sensitivity.json", "verify.json"):
        q = d / name
        if q.is_file():
            try:
                optional[name] = _read_json(q)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"{name} could not be read ({e})")
    sens, table = optional.get("sensitivity.json"), None
    if sens is not None:
        try:
            table = SensitivityTable.from_dict(sens)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            problems.append(f"sensitivity.json is not a sensitivity table ({e!r})")
            sens = None
    if table is not None:
        groups = {str(r.get("group")) for r in plan["layers"]}
        if not groups <= set(table.groups):
            problems.append("sensitivity.json is for another model: it lacks the groups "
                            + ", ".join(sorted(groups - set(table.groups))[:5]))
            sens, table = None, None
    verify = optional.get("verify.json")
    if verify is not None and not isinstance(verify, dict):
        problems.append("verify.json is not a JSON object")
        verify = None
    if verify is not None:  # shown only for the very file it checked
        checked = str((verify.get("model") or {}).get("sha256", ""))
        shipped = d / "model.qdq.onnx"
        have = _sha256(shipped) if shipped.is_file() else None
        if have != checked:
            problems.append(
                f"verify.json checked a model with sha256 {checked[:12] or '?'}, not this "
                f"folder's model.qdq.onnx ({have[:12] if have else 'missing'}): not shown")
            verify = None
    return RunFiles(path=d, plan=plan, sensitivity=sens, sensitivity_table=table,
                    verify=verify, config_hw=_config_hw(d / "config.yaml"),
                    problems=tuple(problems))


def _config_hw(path: Path) -> str | None:
    """The profile path a run's ``config.yaml`` names (relative to the folder), if any."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    hw = doc.get("hw") if isinstance(doc, dict) else None
    return hw if isinstance(hw, str) else None


def _db(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def verify_status(verify: Mapping[str, Any] | None) -> tuple[str, str]:
    """(css class, one line) for the verification result: none, ok, warn or fail."""
    if verify is None:
        return "none", "not verified: this run has no verify.json"
    nodes = verify.get("nodes") or {}
    target = verify.get("target", "the target")
    if not verify.get("compiled"):
        return "fail", f"FAILED: the plan did not compile for {target}"
    off = nodes.get("not_on_target") or []
    on, total = nodes.get("on_target"), nodes.get("total")
    if off:
        return "warn", f"compiled for {target}, but {len(off)} node(s) fall back off target"
    sq = verify.get("sqnr_db")
    shown = f"{sq:.2f} dB" if isinstance(sq, (int, float)) and math.isfinite(sq) else str(sq)
    threshold = verify.get("min_sqnr_db")
    replans = verify.get("replans") or []
    if replans:
        tried = "; ".join(
            f"{', '.join(sorted(set(r.get('avoided', {}).values())))} off "
            f"{len(r.get('avoided', {}))} layer(s): "
            + (f"no plan ({r['outcome']})" if r.get("outcome")
               else f"{_db(r.get('sqnr_db'))} -> {_db(r.get('after_db'))} dB") for r in replans)
        shown += (f" ({len(replans)} re-plan(s) around what the HTP computed differently: "
                  f"{tried}; shipped: the plan of round {verify.get('shipped_round', 1)})")
    if threshold is not None and not verify.get("agrees", False):
        culprit = (verify.get("culprit") or {}).get("description")
        return "fail", (f"NOT VERIFIED: compiled for {target} ({on}/{total} nodes on target), "
                        f"but its outputs agree with the CPU at only {shown}, below the "
                        f"{threshold:g} dB threshold" + (f"; {culprit}" if culprit else ""))
    against = (f", {shown} output SQNR against the CPU"
               if isinstance(sq, (int, float)) and math.isfinite(sq) else "")
    if threshold is None:  # a verify.json from before the agreement gate: no claim made
        return "warn", (f"compiled for {target}: {on}/{total} nodes on target{against} (no "
                        "agreement threshold was checked)")
    return "ok", (f"verified on {target}: {on}/{total} nodes on target{against} (threshold "
                  f"{threshold:g} dB)")

