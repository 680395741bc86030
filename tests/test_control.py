"""An ``If`` the data decides both ways, on a target with no control flow (QNN's HTP): both
branches and a ``Where`` (mpsearch.graph.control.select_ifs), on the layout of openWakeWord's
*hey jarvis* (tests/models.py: if_detector)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import if_detector

from mpsearch.cli.main import main
from mpsearch.graph.calibrate import make_session
from mpsearch.graph.control import select_ifs

ROOT = Path(__file__).resolve().parent.parent


def _scores(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the model's output and the detector's score that decides the If."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, None))
    sess = make_session(m)
    got = [sess.run(None, {"x": xi[None]}) for xi in x]
    return (np.array([g[0].reshape(-1)[0] for g in got]),
            np.array([g[1].reshape(-1)[0] for g in got]))


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((160, 24)).astype(np.float32)
    _, p = _scores(if_detector(), x)
    return x, p


def test_both_branches_and_a_where_compute_what_the_if_computes(samples):
    x, p = samples
    assert 0.2 < (p >= 0.5).mean() < 0.5  # the data takes both branches
    original = if_detector()
    rewritten, [s] = select_ifs(original)
    assert (s.node, s.branch, s.value, s.nodes) == ("verify_if", "both", None, 5)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "If" not in ops and ops.count("Where") == 1 and ops.count("Gemm") == 4
    onnx.checker.check_model(rewritten, full_check=True)
    want, _ = _scores(original, x)
    got, _ = _scores(rewritten, x)
    assert np.array_equal(got, want)  # bit for bit, on samples of both branches
    # an If whose branches' output shapes are unknown is left as it is
    unknown = if_detector(shapes=False)
    assert select_ifs(unknown) == (unknown, ())


def test_snapdragon_run_ships_no_if_and_verifies_on_the_htp(samples, tmp_path, capsys):
    """The calibration data never fires the detector (as openWakeWord's calibration audio
    never holds the wake word); the evaluation data does. The verifier's Gemms are planned,
    the shipped model has no If and runs whole on the HTP, and the Where's range is the union
    of its branches' (the calibration data alone would clip the verifier's scores)."""
    x, p = samples
    quiet, fires = x[p < 0.5], x[p >= 0.5]
    np.savez(tmp_path / "c.npz", x=quiet[:48])
    np.savez(tmp_path / "e.npz", x=np.concatenate([quiet[48:64], fires[:16]]))
    out = tmp_path / "out"
    assert main(["run", str(_save(tmp_path)), "--hw",
                 str(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"), "--data",
                 str(tmp_path / "c.npz"), "--eval-data", str(tmp_path / "e.npz"), "--out",
                 str(out), "-q", "--no-cache", "--budget", "bops=0.9"]) == 0
    assert "computed as both branches and a Where" in capsys.readouterr().err
    doc = json.loads((out / "plan.json").read_text())
    [s] = doc["specialized"]
    assert (s["node"], s["branch"]) == ("verify_if", "both")
    assert {g["group"] for g in doc["layers"]} == {"detector1", "detector2",
                                                 "verify_if/then/verifier1",
                                                 "verify_if/then/verifier2"}
    v = json.loads((out / "verify.json").read_text())
    assert v["verified"] and v["nodes"]["on_target"] == v["nodes"]["total"]
    assert float(v["sqnr_db"]) >= 25  # "inf" where the HTP computes exactly what the CPU does
    shipped = onnx.load(str(out / "model.qdq.onnx"))
    assert not any(n.op_type == "If" for n in shipped.graph.node)
    where = next(n for n in shipped.graph.node if n.op_type == "Where")
    q = next(n for n in shipped.graph.node if n.op_type == "QuantizeLinear"
             and n.input[0] == where.output[0])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in shipped.graph.initializer}
    scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
    top = (np.iinfo(inits[q.input[2]].dtype).max - zp) * scale
    want, _ = _scores(if_detector(), fires[:16])
    assert top >= want.max() > quiet_max(quiet[:48])  # the range reaches what calibration missed
    page = (out / "report.html").read_text()
    assert "computed as both branches and a Where" in page
    # the calibration data never fires: the verifier's errors go unseen, and the run says so
    [warned] = [w for w in doc["data"]["warnings"] if "never takes the then branch" in w]
    assert "'verify_if'" in warned and "never takes the then branch" in page


def quiet_max(x: np.ndarray) -> float:
    return float(_scores(if_detector(), x)[0].max())


def _save(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(if_detector(), str(path))
    return path
