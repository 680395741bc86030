"""``report.html``: built from a real run folder, it loads in headless Chromium with every image
decoded and no console error, renders a non-blank page, refers to nothing outside itself,
shows the chosen plan's numbers, the ops left in float with their reasons and the verification
state (absent, failed, passed), repeats byte for byte, and ``mpsearch report`` exits 2 on a
folder that is not a run."""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import images, mbconv

from mpsearch.cli.main import main
from mpsearch.report.html import build_report
from mpsearch.report.pareto import front_plot

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run "
                             "installs it)")

CANDS = "w8a8,w4a8,w8a16"


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A real ``mpsearch run`` on a tiny MBConv whose Softsign activations stay in float, plus
    the ``mpsearch sensitivity`` document (served from the run's cache). QNN's HTP refuses the
    float Softsign, so the run's verification fails: exit code 1, everything still written."""
    d = tmp_path_factory.mktemp("report")
    onnx.save(mbconv(seed=5, act="Softsign"), str(d / "model.onnx"))
    np.savez(d / "calib.npz", x=images(24, seed=1))
    np.savez(d / "eval.npz", x=images(16, seed=2))
    common = ["--hw", str(PROFILE), "--data", str(d / "calib.npz"), "--candidates", CANDS,
              "--cache-dir", str(d / "cache"), "-q"]
    assert main(["run", str(d / "model.onnx"), *common, "--eval-data", str(d / "eval.npz"),
                 "--budget", "bops=0.9", "--front-points", "1", "--refine", "1",
                 "--out", str(d / "run")]) == 1
    assert main(["sensitivity", str(d / "model.onnx"), *common, "--method", "hessian",
                 "--out", str(d / "sens")]) == 0
    run = d / "run"
    if not (run / "sensitivity.json").exists():
        shutil.copy(d / "sens" / "sensitivity.json", run / "sensitivity.json")
    for name in ("pareto.png", "allocation.png", "sensitivity.png"):
        shutil.copy(run / name, d / name.replace(".png", "_from_run.png"))
    return run


@pytest.fixture(scope="session")
def report(run_dir) -> str:
    return build_report(run_dir).read_text(encoding="utf-8")


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    for name in ("report.html", "verify.json"):
        (dst / name).unlink(missing_ok=True)
    return dst


def _plan(run_dir: Path) -> dict:
    return json.loads((run_dir / "plan.json").read_text())


# --------------------------------------------------------------------------- in a browser

_PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement("pre");
  out.id = "probe";
  var vw = document.documentElement.clientWidth;
  function boxed(e) {  // inside a box that scrolls (or clips) sideways by itself
    for (var a = e.parentElement; a; a = a.parentElement) {
      var o = getComputedStyle(a).overflowX;
      if (o === "auto" || o === "scroll" || o === "hidden") { return true; }
    }
    return false;
  }
  var over = Array.prototype.slice.call(document.querySelectorAll("table, img, .card"))
    .filter(function (e) { return !boxed(e) && e.getBoundingClientRect().right > vw + 1; })
    .map(function (e) { return e.tagName + "." + e.className; });
  out.textContent = "PROBE " + JSON.stringify({images: imgs.length, broken: bad.length,
    widths: imgs.map(function (i) { return i.naturalWidth; }),
    page: document.documentElement.scrollWidth, viewport: vw, overflowing: over});
  document.body.appendChild(out);
});
</script>"""


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True,
                          timeout=120, check=False)


def _console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines()
            if "CONSOLE" in ln and re.search(r"error|uncaught|failed", ln, re.I)
            or "ERR_" in ln and "net::" in ln]


@needs_chromium
def test_page_loads_every_image_without_console_errors(run_dir, report, tmp_path):
    page = tmp_path / "probe.html"
    page.write_text(report.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    r = _chromium(page.as_uri(), tmp_path, "--dump-dom")
    m = re.search(r"PROBE (\{.*?\})", r.stdout)
    assert m, f"the probe did not run: rc={r.returncode} stderr={r.stderr[-2000:]}"
    probe = json.loads(m.group(1))
    assert probe["images"] == 3 and probe["broken"] == 0, probe  # pareto, allocation, heatmap
    assert min(probe["widths"]) >= 400
    assert _console_errors(r.stderr) == [], _console_errors(r.stderr)
    # the check can fail: a page with a console error and a broken image is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="data:image/png;base64,AAAA">'
                   '<script>console.error("probe error")</script>' + _PROBE + "</body></html>")
    r = _chromium(bad.as_uri(), tmp_path, "--dump-dom")
    assert json.loads(re.search(r"PROBE (\{.*?\})", r.stdout).group(1))["broken"] == 1
    assert any("probe error" in ln for ln in _console_errors(r.stderr)), r.stderr[-2000:]


@needs_chromium
@pytest.mark.parametrize("width", [1280, 800])
def test_nothing_overflows_the_page_at_laptop_and_narrow_widths(run_dir, report, tmp_path,
                                                               width):
    """At 1280 and 800 px: no table, picture or card reaches past the window (wide tables
    scroll inside their own box), so the page never scrolls sideways."""
    page = tmp_path / "probe.html"
    page.write_text(report.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    r = _chromium(page.as_uri(), tmp_path, "--dump-dom", f"--window-size={width},1200")
    probe = json.loads(re.search(r"PROBE (\{.*?\})", r.stdout).group(1))
    assert probe["viewport"] <= width and probe["overflowing"] == [], probe
    assert probe["page"] <= probe["viewport"] + 1, probe


@needs_chromium
@pytest.mark.parametrize("width", [1280, 800])
def test_screenshot_is_not_blank(run_dir, report, tmp_path, width):
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    _chromium((run_dir / "report.html").as_uri(), tmp_path, f"--screenshot={shot}",
              f"--window-size={width},2000")
    assert shot.is_file() and shot.stat().st_size > 10_000
    px = mpimg.imread(shot)[..., :3]
    assert px.shape[:2] == (2000, width)
    not_white = (px.min(axis=2) < 0.9).mean()
    assert not_white > 0.05 and px.std() > 0.05, (not_white, px.std())


# --------------------------------------------------------------------------- the page's content


def test_nothing_outside_the_page_is_referenced(report):
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", report, re.I)
    srcs = re.findall(r'\bsrc="([^"]*)"', report)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(h.startswith("#") for h in re.findall(r'\bhref="([^"]*)"', report))
    assert "<script" not in report and "@import" not in report and "url(" not in report


def test_page_shows_the_chosen_plan_and_its_costs(run_dir, report):
    plan = _plan(run_dir)
    t, q = plan["totals"], plan["quality"]
    assert f"{t['bops']['relative_to_w8a8']:.3f}x" in report
    assert f"{t['latency_s']['relative_to_w8a8']:.3f}x" in report
    assert f"{q['predicted_sqnr_db']:.2f} dB" in report
    assert f"{q['measured']['sqnr_db']:.2f} dB" in report
    counts: dict[str, int] = {}
    for r in plan["layers"]:
        counts[r["candidate"]] = counts.get(r["candidate"], 0) + 1
        assert f"<td>{r['group']}</td>" in report
    for c, n in counts.items():
        assert f"{c} &times; {n}" in report
    for b in plan["baselines"]:
        assert f"<td>{b['name']}</td>" in report


def test_ops_left_in_float_are_listed_with_their_reasons(run_dir, report):
    ops = _plan(run_dir)["float_ops"]
    assert len(ops) == 3  # the three Softsign activations
    section = html.unescape(report.split('id="float"')[1].split("</section>")[0])
    for f in ops:
        assert f"<td>{f['node']}</td>" in section
        assert f"<td>{f['reason']}</td>" in section


def test_pngs_are_written_beside_the_page_and_redraw_the_runs_front(run_dir, report):
    for name in ("pareto.png", "allocation.png", "sensitivity.png"):
        assert (run_dir / name).stat().st_size > 5_000
    # pareto.png from plan.json is the figure `run` drew from the search result
    redrawn = run_dir.parent / "redrawn.png"
    front_plot(_plan(run_dir), redrawn)
    assert redrawn.read_bytes() == (run_dir.parent / "pareto_from_run.png").read_bytes()


def test_same_files_give_the_same_bytes(run_dir, report, tmp_path):
    a = build_report(run_dir, out=tmp_path / "elsewhere" / "page.html")
    assert a.read_bytes() == (run_dir / "report.html").read_bytes()
    for name in ("pareto.png", "allocation.png", "sensitivity.png"):
        assert (a.parent / name).read_bytes() == (run_dir / name).read_bytes()
        # `run` drew them from its search result while the device check ran: the same bytes
        # as drawn from the finished folder's files
        assert (a.parent / name).read_bytes() == (
            run_dir.parent / name.replace(".png", "_from_run.png")).read_bytes()


def test_without_verify_or_sensitivity_or_profile_the_page_says_so(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    (d / "sensitivity.json").unlink()
    (d / "sensitivity.png").unlink()
    plan = _plan(d)
    plan["profile"]["path"] = str(tmp_path / "gone.yaml")
    (d / "plan.json").write_text(json.dumps(plan))
    (d / "config.yaml").unlink()  # it names the profile too
    page = build_report(d).read_text()
    assert "not verified" in page and "no verify.json" in page
    assert "No sensitivity.json" in page and not (d / "sensitivity.png").exists()
    assert "is not here any more" in page and plan["profile"]["name"] in page
    assert len(re.findall(r"<img ", page)) == 2


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failed_verification_shows_its_reasons_at_the_top(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    reasons = ["QNN rejected node_Conv_3: standalone DQ with per-channel quantization",
               "2 nodes fell back to the CPU"]
    (d / "verify.json").write_text(json.dumps({
        "schema": "mpsearch.verify/1", "target": "qnn-htp", "soc_model": 57,
        "model": {"path": "model.qdq.onnx", "sha256": _sha(d / "model.qdq.onnx")},
        "input_shapes": {"x": [1, 3]},
        "shapes_fixed": ["x: N -> 1"], "compiled": False,
        "nodes": {"total": 40, "on_target": 38, "by_ep": {"QNN": 38, "CPU": 2},
                  "by_op": {"Conv": 6}, "not_on_target": [
                      {"node": "node_Conv_3", "op_type": "Conv", "reason": "standalone DQ"}]},
        "reasons": reasons, "samples": 4, "outputs": [], "sqnr_db": None, "seconds": 3.2}))
    page = build_report(d).read_text()
    top = page.split('id="pareto"')[0]  # the at-a-glance cards, before the first plot
    assert 'class="card fail"' in top and "FAILED" in top
    for r in reasons:
        assert r in top
    assert "node_Conv_3" in page.split('id="verification"')[1]


def _compiled_whole(d: Path, sqnr: float, cosine: float) -> None:
    """A verify.json of this folder's model: every node on the HTP, one output at ``sqnr``."""
    agrees = sqnr >= 25.0
    (d / "verify.json").write_text(json.dumps({
        "target": "qnn-htp", "soc_model": 57, "compiled": True,
        "model": {"path": "model.qdq.onnx", "sha256": _sha(d / "model.qdq.onnx")},
        "nodes": {"total": 40, "on_target": 40, "by_ep": {"QNN": 40}, "by_op": {},
                  "not_on_target": []},
        "reasons": [], "samples": 4,
        "outputs": [{"name": "logits", "sqnr_db": sqnr, "cosine": cosine}], "sqnr_db": sqnr,
        "min_sqnr_db": 25.0, "agrees": agrees, "verified": agrees, "seconds": 2.0}))


def test_passed_verification(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    _compiled_whole(d, 31.5, 0.9996)
    page = build_report(d).read_text()
    assert 'class="card ok"' in page and "40/40 nodes on target" in page and "31.50 dB" in page
    assert "verified on qnn-htp" in page


def test_compiled_whole_but_disagreeing_is_not_verified(run_dir, tmp_path):
    """Compiling is not computing: every node on the HTP at 2.5 dB against the CPU is a
    failure in red, and the page never says verified."""
    d = _copy(run_dir, tmp_path)
    _compiled_whole(d, 2.5, 0.4)
    page = build_report(d).read_text()
    top = page.split('id="pareto"')[0]
    assert 'class="card fail"' in top and "NOT VERIFIED" in top and "2.50 dB" in top
    assert "verified on" not in page


# --------------------------------------------------------------------------- the command


def test_report_command_rebuilds_and_rejects_what_is_not_a_run(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path)
    assert main(["report", str(d), "-q"]) == 0 and (d / "report.html").is_file()
    capsys.readouterr()

    def bad(path: Path, needle: str) -> None:
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err

    bad(tmp_path / "missing", "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad(empty, "holds no plan.json")
    (empty / "plan.json").write_text("{ not json")
    bad(empty, "cannot be read as JSON")
    (empty / "plan.json").write_text(json.dumps({"schema": "something/1"}))
    bad(empty, "is not an mpsearch plan")


def test_the_runs_own_failed_verification_is_on_the_page(run_dir):
    v = json.loads((run_dir / "verify.json").read_text())
    assert v["schema"] == "mpsearch.verify/1" and v["fully_on_target"] is False
    assert {n["node"] for n in v["nodes"]["not_on_target"]} == {"stem_act", "expand_act",
                                                                "dw_act"}
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["verification"]["fully_on_target"] is False
    page = (run_dir / "report.html").read_text()
    assert "not supported by QNN EP" in page and "stem_act" in page


def test_report_from_another_directory_finds_the_profile_and_checks_the_verified_file(
        tmp_path, monkeypatch):
    """A run made with relative paths: from elsewhere, plan.json's profile path no longer
    resolves, config.yaml's (relative to the folder) does. A verify.json of another model is
    not shown as this run's."""
    work = tmp_path / "work"
    (work / "profiles").mkdir(parents=True)
    shutil.copy(PROFILE, work / "profiles" / "snap.yaml")
    onnx.save(mbconv(seed=5), str(work / "model.onnx"))
    np.savez(work / "calib.npz", x=images(16, seed=1))
    monkeypatch.chdir(work)
    assert main(["run", "model.onnx", "--hw", "profiles/snap.yaml", "--data", "calib.npz",
                 "--budget", "bops=0.9", "--candidates", CANDS, "--no-cache", "--refine", "0",
                 "--front-points", "0", "--verify-samples", "1", "--out", "out", "-q"]) == 0
    monkeypatch.chdir(tmp_path)
    page = build_report(work / "out", out=tmp_path / "page.html").read_text()
    assert "is not here any more" not in page and "snapdragon_8gen3" in page
    assert "verified on qnn-htp" in page
    v = json.loads((work / "out" / "verify.json").read_text())
    v["model"]["sha256"] = "0" * 64  # as if it had checked another file
    (work / "out" / "verify.json").write_text(json.dumps(v))
    page = build_report(work / "out", out=tmp_path / "page2.html").read_text()
    assert "not verified" in page and "verify.json checked a model with sha256 000000000000" \
        in page


def test_a_plan_far_below_its_prediction_is_flagged_at_the_top(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    plan = _plan(d)
    plan["quality"]["prediction_check"] = {
        "short_by_db": 15.6, "threshold_db": 3.0, "data": "evaluation", "note": "compounding",
        "layers": [{"group": "expand", "candidate": "w4a8", "measured_over_predicted_db": 6.2}]}
    (d / "plan.json").write_text(json.dumps(plan))
    top = build_report(d).read_text().split('id="pareto"')[0]
    assert "measured 15.6 dB below its prediction" in top
    assert "expand (w4a8): measured 6.2 dB above its prediction" in top
