"""``--target``: the cheapest plan whose quality on the check part meets a target, found by
bisection over the cost limit; targets parsed as users write them; an unreachable one exits 2
naming the best reached and the closest uniform plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from models import mbconv_files

from mpsearch.cli.main import main
from mpsearch.core.errors import UsageError
from mpsearch.graph.evaluate import evaluate, reference_run
from mpsearch.job.target import STEPS, bisect, parse_target

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return mbconv_files(tmp_path_factory.mktemp("target"))


@pytest.mark.parametrize(("text", "key", "value"), [
    ("sqnr=25", "sqnr", 25.0), ("SQNR = 12.5", "sqnr", 12.5), ("top1_drop=1%", "top1_drop", 0.01),
    ("top1_drop=0.02", "top1_drop", 0.02), ("accuracy_drop=0.5%", "accuracy_drop", 0.005)])
def test_targets_parse_as_users_write_them(text, key, value):
    t = parse_target(text)
    assert (t.key, t.value) == (key, pytest.approx(value))
    assert parse_target(str(t)) == t


@pytest.mark.parametrize(("text", "needle"), [
    ("sqnr", "is not KEY=VALUE"), ("snr=25", "did you mean 'sqnr'"),
    ("sqnr=nan", "not a finite number"), ("top1_drop=150%", "between 0% and 100%"),
    ("sqnr=25%", "in dB, not %"), ("top1_drop=abc", "is not a number")])
def test_bad_targets_name_the_problem(text, needle):
    with pytest.raises(UsageError, match=needle):
        parse_target(text)


def test_bisection_finds_the_least_limit_that_meets_a_monotone_target():
    """Quality 10·log10(limit) + 40 dB: sqnr=43 is met from limit 10^0.3 = 1.995 on. The
    bisection returns a limit that meets it within TOLERANCE of that, in at most STEPS
    searches (plus one at the dearest end), from any start; an unreachable target returns
    None after trying the dearest limit."""
    def quality(limit: float) -> float:
        return 10 * math.log10(limit) + 40

    least = 10 ** 0.3
    for start in (0.3, 1.0, 2.0, 3.9):
        limit, steps = bisect(parse_target("sqnr=43"), quality, lo=0.25, hi=4.0, start=start)
        assert limit is not None and quality(limit) >= 43
        assert least <= limit <= least * 1.2  # four halvings of a log-bracket of 16x
        assert len(steps) <= STEPS + 1 and steps[0].limit == start
    limit, steps = bisect(parse_target("sqnr=60"), quality, lo=0.25, hi=4.0, start=1.0)
    assert limit is None and max(s.limit for s in steps) == 4.0 and not any(s.met for s in steps)
    limit, steps = bisect(parse_target("sqnr=20"), quality, lo=0.25, hi=4.0, start=1.0)
    assert limit == 0.25  # the cheapest plan already meets it


def test_the_shipped_plan_is_the_cheapest_searched_that_meets_the_target(files, tmp_path):
    """sqnr=45 on the MBConv block: each step of the bisection recorded in plan.json with its
    check-part SQNR; the limit shipped met the target and is the least limit that did; the
    shipped bytes measure at least 45 dB on the check part, recomputed here; the front's axis
    is bit-operations."""
    from mpsearch.data.dataset import open_dataset, split

    out = tmp_path / "out"
    assert main(["run", str(files["model"]), "--hw", str(PROFILE), "--data", str(files["calib"]),
                 "--eval-data", str(files["eval"]), "--out", str(out), "-q", "--no-cache",
                 "--target", "sqnr=45", "--no-verify"]) == 0
    doc = json.loads((out / "plan.json").read_text())
    t = doc["target"]
    assert t["target"] == "sqnr=45" and t["axis"] == "bops"
    steps = t["steps"]
    assert 2 <= len(steps) <= STEPS + 1
    for s in steps:
        assert s["met"] == (s["quality"] >= 45)
    met = [s["limit_relative_to_w8a8"] for s in steps if s["met"]]
    # the least limit that met it, rounded up to 3 decimals
    assert min(met) <= t["limit_relative_to_w8a8"] <= min(met) + 1e-3
    assert doc["totals"]["bops"]["relative_to_w8a8"] <= min(met) + 1e-9
    assert doc["budgets"][0]["budget"].startswith("bops=")
    # the shipped bytes on the check part (the seeded quarter of --data)
    import onnx

    fp32 = onnx.load(str(files["model"]))
    check = split(open_dataset(files["calib"], fp32), 0.25, seed=0, name="check").evaluation
    ref = reference_run(fp32, check.batches(1))  # the device model takes batch 1
    got = evaluate(fp32, str(out / "model.qdq.onnx"), reference_outputs=ref).primary.sqnr_db
    assert got >= 45


def test_a_target_no_plan_meets_exits_2_naming_the_closest_uniform_plan(files, tmp_path,
                                                                        capsys):
    out = tmp_path / "out"
    code = main(["run", str(files["model"]), "--hw", str(PROFILE), "--data", str(files["calib"]),
                 "--out", str(out), "--no-cache", "--target", "sqnr=200", "--no-verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no plan meets target sqnr=200" in err[0] and "closest uniform plan is uniform" \
        in err[0] and "lower the target" in err[0]
    assert not out.exists()


def test_an_accuracy_target_without_labels_is_refused_before_any_work(files, tmp_path, capsys):
    code = main(["run", str(files["model"]), "--hw", str(PROFILE), "--data", str(files["calib"]),
                 "--out", str(tmp_path / "o"), "--no-cache", "--target", "accuracy_drop=1%"])
    err = capsys.readouterr().err
    assert code == 2 and "needs labels in --data" in err
    assert np.load(files["calib"])["x"].shape[0] == 24  # the input is untouched


def test_the_shortest_form_finds_its_data_beside_the_model_and_ships_the_default_target(
        files, tmp_path, monkeypatch, capsys):
    """``mpsearch run model.onnx --hw PROFILE`` in a fresh working directory: calib.npz and
    eval.npz beside the model are the data, the output is ``model.mpsearch/`` there, and the
    plan is the cheapest within 0.5 dB of uniform w8a8 on the check part (sqnr_drop=0.5),
    which the summary names. A second run into that folder is allowed (mpsearch wrote it); a
    folder of that name mpsearch did not write is refused."""
    import shutil

    src = tmp_path / "m"
    src.mkdir()
    for k in ("model", "calib", "eval"):
        shutil.copy(files[k], src / files[k].name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["run", str(src / "model.onnx"), "--hw", str(PROFILE), "--no-cache",
                 "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "target sqnr_drop=0.5 (SQNR >= " in out and "uniform w8a8's minus 0.5" in out
    doc = json.loads((work / "model.mpsearch" / "plan.json").read_text())
    t = doc["target"]
    assert t["key"] == "sqnr_drop" and t["value"] == 0.5
    assert doc["data"]["evaluation"] == 16 and doc["data"]["check"] == 6
    met = [s for s in t["steps"] if s["met"]]
    assert met and all(s["quality"] >= t["as_sqnr"] for s in met)
    assert main(["run", str(src / "model.onnx"), "--hw", str(PROFILE), "--no-cache",
                 "--no-verify", "-q", "--budget", "bops=0.9"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    (other / "model.mpsearch").mkdir()
    (other / "model.mpsearch" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["run", str(src / "model.onnx"), "--hw", str(PROFILE), "--no-cache"]) == 2
    assert "was not written by mpsearch" in capsys.readouterr().err
    assert (other / "model.mpsearch" / "notes.txt").read_text() == "mine"


def test_without_any_data_the_run_is_data_free_and_says_so(files, tmp_path, monkeypatch,
                                                           capsys):
    """No --data and nothing beside the model: random inputs of the declared shapes, written
    as synthetic_data.npz into the run folder (config.yaml points at it), a warning on stderr,
    in plan.json and in the report's banner; the same seed gives the same bytes."""
    import shutil

    import yaml

    src = tmp_path / "m"
    src.mkdir()
    shutil.copy(files["model"], src / "model.onnx")
    monkeypatch.chdir(tmp_path)
    for out in ("a", "b"):
        assert main(["run", str(src / "model.onnx"), "--hw", str(PROFILE), "--no-cache",
                     "--no-verify", "-q", "--budget", "bops=0.9", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "data-free" in err and "no figure of this run says how the plan does" in err
    a = tmp_path / "a"
    assert any("data-free" in w for w in json.loads((a / "plan.json").read_text())["data"][
        "warnings"])
    assert "data-free" in (a / "report.html").read_text()
    x = np.load(a / "synthetic_data.npz")["x"]
    assert x.shape == (32, 3, 16, 16) and x.dtype == np.float32
    assert yaml.safe_load((a / "config.yaml").read_text())["data"] == "synthetic_data.npz"
    assert (a / "model.qdq.onnx").read_bytes() == (tmp_path / "b" / "model.qdq.onnx").read_bytes()
