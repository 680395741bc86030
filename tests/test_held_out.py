"""Choosing on data nothing was fitted on, and honest figures: the check part held out of
calibration, the uniform plan that ships unless a mixed plan beats it, intervals over samples,
the reference measured, and warnings for data that weakens every figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import images, mbconv, mbconv_files

import mpsearch
from mpsearch.cli.main import main
from mpsearch.data.dataset import constant_samples, open_dataset
from mpsearch.graph.evaluate import paired_difference, sqnr_db, sqnr_interval
from mpsearch.job import selection
from mpsearch.job.config import CacheConfig, CandidateConfig, MeasureConfig, SearchConfig
from mpsearch.job.search import SearchData
from mpsearch.job.selection import MIN_CHECK, hold_out

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return mbconv_files(tmp_path_factory.mktemp("held"))


def test_intervals_cover_the_figure_and_pair_the_samples():
    """A bootstrap interval holds the SQNR over all samples and is the same on every call; a
    paired difference is exactly the difference of the two SQNRs, and its interval is narrower
    than the two separate intervals together when the two plans err on the same samples."""
    rng = np.random.default_rng(0)
    sig = rng.uniform(1.0, 2.0, 32)
    noise_a = rng.uniform(0.01, 0.02, 32) * sig
    noise_b = noise_a * rng.uniform(0.95, 1.0, 32)  # b a little better on every sample
    lo, hi = sqnr_interval(sig, noise_a)
    assert lo < sqnr_db(sig.sum(), noise_a.sum()) < hi
    assert sqnr_interval(sig, noise_a) == (lo, hi)
    d, (dlo, dhi) = paired_difference(sig, noise_b, noise_a)
    assert d == pytest.approx(sqnr_db(sig.sum(), noise_b.sum()) - sqnr_db(sig.sum(),
                                                                        noise_a.sum()))
    assert 0 < dlo < d < dhi  # b wins on every sample: the interval excludes 0
    b_lo, b_hi = sqnr_interval(sig, noise_b)
    assert dhi - dlo < (hi - lo) + (b_hi - b_lo)
    assert sqnr_interval(sig[:1], noise_a[:1]) is None


def test_the_check_part_is_a_seeded_split_and_too_little_data_has_none(files):
    ds = open_dataset(files["calib"], onnx.load(str(files["model"])))
    a, b = hold_out(ds, 0.25, seed=0), hold_out(ds, 0.25, seed=0)
    assert (len(a.fit), len(a.check)) == (18, 6) and a.warning is None
    ia = [a.check.source_index(k) for k in range(6)]
    assert ia == [b.check.source_index(k) for k in range(6)]
    fit = {a.fit.source_index(k) for k in range(18)}
    assert not fit & set(ia) and len(fit | set(ia)) == 24
    other = hold_out(ds, 0.25, seed=1)
    assert [other.check.source_index(k) for k in range(6)] != ia
    small = hold_out(ds.take(np.arange(2 * MIN_CHECK - 1)), 0.5, seed=0)
    assert small.check is None and "too few to hold out" in small.warning
    assert hold_out(ds, 0.0, seed=0).check is None


def _search(files, **refinement) -> mpsearch.SearchResult:
    from mpsearch.job.config import RefinementConfig

    cfg = SearchConfig(budgets=["bops=1.0"], cache=CacheConfig(enabled=False),
                       measurement=MeasureConfig(front_points=0),
                       refinement=RefinementConfig(**refinement),
                       candidates=CandidateConfig(only=["w8a8", "w4a8", "w8a16"]))
    return mpsearch.search(files["model"], PROFILE,
                           SearchData(calibration=files["calib"], evaluation=files["eval"]), cfg)


def test_a_mixed_plan_ships_only_when_it_beats_the_best_uniform_one(files, monkeypatch):
    """At bops=1.0 uniform w8a8 fits and is on the shortlist. Demanding an unreachable margin
    (SELECT_Z = inf) ships it, and the selection says why; demanding none ships the least
    error. Either way the shipped plan measures no worse than uniform w8a8 on the check part,
    and uniform w8a8 is measured on all three parts, with intervals."""
    monkeypatch.setattr(selection, "SELECT_Z", float("inf"))
    strict = _search(files, polish=0)
    sel = strict.selection
    assert "uniform w8a8" in [c.name for c in sel.contenders]
    assert sel.best.name == "uniform w8a8" and set(strict.plan.values()) == {
        mpsearch.parse_candidate("w8a8")}
    assert "beat it by only" in sel.reason or sel.best is min(sel.contenders,
                                                              key=lambda c: c.check_mse)
    monkeypatch.setattr(selection, "SELECT_Z", 0.0)
    loose = _search(files, polish=0)
    least = min(loose.selection.contenders, key=lambda c: c.check_mse)
    assert loose.selection.best is least
    u = next(c for c in loose.selection.contenders if c.name == "uniform w8a8")
    assert least.check_mse <= u.check_mse
    w8a8 = next(p for p in loose.uniform if p.name == "uniform w8a8")
    assert [m.data.value for m in w8a8.figures] == ["fit", "check", "evaluation"]
    for m in w8a8.figures:
        lo, hi = m.sqnr_ci
        assert lo <= m.sqnr_db <= hi


def test_the_run_measures_its_reference_and_says_how_sure_each_comparison_is(files, tmp_path,
                                                                            capsys):
    """plan.json and --json: uniform w8a8 measured (not only predicted) beside the plan, and
    every comparison with its paired interval and whether it excludes 0; the same figures in
    the report."""
    out = tmp_path / "out"
    assert main(["run", str(files["model"]), "--hw", str(PROFILE), "--data",
                 str(files["calib"]), "--eval-data", str(files["eval"]), "--out", str(out),
                 "-q", "--no-cache", "--budget", "bops=0.9", "--no-verify"]) == 0
    doc = json.loads((out / "plan.json").read_text())
    q = doc["quality"]
    assert doc["data"] == {"fit": 18, "check": 6, "evaluation": 16, "warnings": []}
    assert set(q["measured"]["figures"]) == {"fit", "check", "evaluation"}
    ref = next(b for b in doc["baselines"] if b["name"] == "uniform w8a8")
    assert ref["measured"]["data"] == "evaluation" and not ref["fits"]
    [c] = [c for c in q["comparisons"] if c["name"] == "uniform w8a8"]
    lo, hi = c["ci_db"]
    assert c["role"] == "reference" and c["data"] == "evaluation" and c["samples"] == 16
    assert lo <= c["difference_db"] <= hi and c["significant"] == (lo > 0 or hi < 0)
    assert c["difference_db"] == pytest.approx(
        q["measured"]["sqnr_db"] - ref["measured"]["sqnr_db"], abs=2e-3)
    html = (out / "report.html").read_text()
    assert "uniform w8a8 (reference)" in html and "90% interval" in html
    assert doc["selection"]["data"] == "check" and doc["selection"]["reason"]


def test_constant_samples_and_missing_evaluation_data_are_warned_of(files, tmp_path, capsys):
    """One all-zero sample among the calibration data and no --eval-data: both said on stderr,
    in plan.json and in a banner of the report; the run still succeeds."""
    x = images(24, seed=1)
    x[5] = 0.0
    np.savez(tmp_path / "calib.npz", x=x)
    assert constant_samples([{"x": x}]) == [5]
    out = tmp_path / "out"
    assert main(["run", str(files["model"]), "--hw", str(PROFILE), "--data",
                 str(tmp_path / "calib.npz"), "--out", str(out), "-q", "--no-cache",
                 "--budget", "bops=0.9", "--no-verify"]) == 0
    err = capsys.readouterr().err
    assert "are constant" in err and "sample(s) 5 of" in err and "no evaluation data" in err
    warnings = json.loads((out / "plan.json").read_text())["data"]["warnings"]
    assert len(warnings) == 2
    assert "rest on weak data" in (out / "report.html").read_text()


def test_per_sample_errors_follow_the_batch_not_a_state_output(tmp_path):
    """Silero-like: windows on a dynamic axis 0 beside a recurrent state [1, 1, 128] given once
    and returned. Each window gets its own squared error (the paired test then has 16 samples
    to work with), not one per batch from the state output's leading 1 (which made the
    uniform guard see '1 sample' and ship uniform w4a8 on a real VAD: 1.4 dB against 6.8)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import _stateful

    from mpsearch import parse_candidate
    from mpsearch.job.selection import plan_errors

    m = _stateful([1, 1, 128], ["seq", 576])
    audio = np.random.default_rng(0).standard_normal((16, 576)).astype(np.float32)
    analysis, batches, ref = _analysed(tmp_path, m, audio=audio, sr=np.array(16000, np.int64),
                                       state=np.full((1, 1, 128), 0.5, np.float32))
    plan = {g: parse_candidate("w8a8") for g in analysis.graph.group_names}
    per, _ = plan_errors(analysis, plan, batches, ref)
    assert per.shape == (16,) and np.unique(per).size > 8


def test_errors_below_float_rounding_count_as_the_floor(tmp_path):
    """PaddleOCR's text-direction classifier on its check part: a saturated softmax, where
    plans agreed with FP32 to float32's rounding (134 and 143 dB on 4 samples, called 1.0
    standard errors apart; on other data 27.3 and 22.6 dB). A sample's error below
    FLOAT_FLOOR_DB counts as that floor: the float plan, exact but for rounding, measures
    exactly the floor on every sample, so two plans there tie."""
    from mpsearch import parse_candidate
    from mpsearch.job.selection import FLOAT_FLOOR_DB, measure_plan, plan_errors

    analysis, batches, ref = _analysed(tmp_path, mbconv(), x=images(16, seed=3))
    exact = {g: parse_candidate("float") for g in analysis.graph.group_names}
    raw, count = plan_errors(analysis, exact, batches, ref)
    mse, per = measure_plan(analysis, exact, batches, ref)
    signal = selection._signal(ref)
    floor = signal * count / per.size * 10 ** (-FLOAT_FLOOR_DB / 10)
    assert raw.max() < floor and per == pytest.approx(np.full(16, floor))
    assert sqnr_db(signal, mse) == pytest.approx(FLOAT_FLOOR_DB)
    w8a8 = {g: parse_candidate("w8a8") for g in analysis.graph.group_names}
    _, quantized = measure_plan(analysis, w8a8, batches, ref)
    assert quantized.min() > floor * 1e3  # a real quantization error is left as it is


def _analysed(tmp_path: Path, model: onnx.ModelProto, **arrays: np.ndarray):
    """``model`` calibrated on ``arrays``, its batches of 8, and its FP32 outputs on them."""
    from mpsearch import analyze
    from mpsearch.sensitivity.suffix import reference_outputs

    np.savez(tmp_path / "c.npz", **arrays)
    ds = open_dataset(tmp_path / "c.npz", model)
    analysis = analyze(model, ds)
    batches = list(ds.batches(8))
    return analysis, batches, reference_outputs(analysis.graph, batches)
