"""The docs say what the code does: the README's option tables are the parsers' own, its Python
example runs, docs/config.md names every config key, and the sources cite sections of
docs/design.md that exist."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import images, mbconv

from mpsearch.cli.docs import render
from mpsearch.cli.main import build_parser
from mpsearch.job.config import RunConfig
from mpsearch.sensitivity.run import FIT_RUNS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_option_tables_are_the_parsers():
    text = README.read_text(encoding="utf-8")
    assert text.count("<!-- options: ") >= 12
    assert render(text) == text, "run: python -m mpsearch.cli.docs README.md"


def test_help_states_the_measured_runs_of_the_hessian_fit():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert f"a scale fitted on {FIT_RUNS} measured runs" in sub.choices["sensitivity"].description
    assert f"fitted on {FIT_RUNS} measured runs" in README.read_text(encoding="utf-8")


def _python_block(text: str) -> str:
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    onnx.save(mbconv(seed=5), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=images(24, seed=1))
    np.savez(tmp_path / "eval.npz", x=images(16, seed=2))
    os.symlink(ROOT / "hw_profiles", tmp_path / "hw_profiles")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(_python_block(README.read_text(encoding="utf-8")), "README.md", "exec"), scope)
    res, v = scope["res"], scope["v"]
    assert res.chosen.fits and res.chosen.cost.relative["bops"] <= 0.75 + 1e-9
    assert onnx.load(str(tmp_path / "model.qdq.onnx")) is not None
    assert scope["strict"].budgets[0].value == 0.6 and scope["strict"].seed == 1
    assert v.fully_on_target and v.sqnr_db > 20, (v.reasons, v.sqnr_db)
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def _keys(kind: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(kind, include_extras=True)
    for f in dataclasses.fields(kind):
        path = f"{prefix}{f.name}"
        out.append(path)
        inner = typing.get_origin(hints[f.name]) or hints[f.name]
        if dataclasses.is_dataclass(inner):
            out += _keys(inner, path + ".")
    return out


def test_config_doc_names_every_key():
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    missing = [k for k in _keys(RunConfig) if f"`{k}`" not in doc]
    assert not missing, missing


@pytest.mark.parametrize("folder", ["mpsearch", "tests", "benchmarks", "examples", "hw_profiles"])
def test_design_citations_point_at_sections_that_exist(folder):
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    for path in sorted((ROOT / folder).rglob("*")):
        if path.suffix not in (".py", ".yaml", ".md") or "cache" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        assert "DESIGN" + ".md" not in text, f"{path}: cite docs/design.md"
        for sec in re.findall(r"docs/design\.md\s*§\s*(\d+)", text):
            assert sec in sections, f"{path}: docs/design.md §{sec} does not exist"


def test_config_doc_example_is_a_valid_config():
    import yaml

    from mpsearch.job.config import parse

    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    data = yaml.safe_load(re.search(r"```yaml\n(.*?)```", doc, re.S).group(1))
    assert data.pop("schema") == "mpsearch.run/1"
    cfg = parse(RunConfig, data)
    assert cfg.search.refinement.polish == 6 and cfg.verification.samples == 4
    assert cfg == parse(RunConfig, {k: data[k] for k in ("model", "hw", "data", "eval_data",
                                                         "out")} | {"search": {
        "budgets": ["bops=0.75"]}}), "the example shows the defaults"
