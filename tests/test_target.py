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
    assert t["limit_relative_to_w8a8"] == min(met)
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
