"""The command line: happy paths and every bad input the foundation issue lists. Each bad
input exits 2 with one line on stderr, writes nothing and leaves the input as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import images, mbconv

from mpsearch.cli.main import main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model.onnx"
    onnx.save(mbconv(), str(model))
    np.savez(tmp_path / "calib.npz", x=images(32, seed=1))
    np.savez(tmp_path / "eval.npz", x=images(16, seed=2))
    return {"model": model, "calib": tmp_path / "calib.npz", "eval": tmp_path / "eval.npz",
            "dir": tmp_path}


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _bad(capsys, argv: list[str], needle: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mpsearch: error: ")
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_quantize_writes_model_and_summary(files, capsys):
    out = files["dir"] / "out"
    before = _digest(files["model"])
    code = main(["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
                 str(files["calib"]), "--eval-data", str(files["eval"]), "--out", str(out),
                 "--json", "-q"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["model.qdq.onnx", "quantize.json"]
    assert summary["candidate"] == "w8a8" and summary["layers"] == 6
    assert summary["evaluation"]["outputs"][0]["sqnr_db"] > 15
    assert _digest(files["model"]) == before
    onnx.checker.check_model(onnx.load(str(out / "model.qdq.onnx")))


def test_quantize_with_holdout_split(files, capsys):
    out = files["dir"] / "out"
    assert main(["quantize", str(files["model"]), "--uniform", "w8a16", "--data",
                 str(files["calib"]), "--holdout", "0.25", "--out", str(out), "--json",
                 "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calibration_samples"] == 24
    assert summary["evaluation"]["samples"] == 8


def test_inspect_lists_layers_ties_and_float_ops(files, capsys):
    assert main(["inspect", str(files["model"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layers"] == 6 and doc["float_ops"] == []
    assert [sorted(c) for c in doc["tie_classes"]] == [["grouped", "project", "stem"]]
    assert main(["inspect", str(files["model"])]) == 0
    text = capsys.readouterr().out
    assert "depthwise" in text and "Conv dw" in text and "no ops left in float" in text


def test_eval_json_and_save(files, capsys):
    out = files["dir"] / "out"
    main(["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
          str(files["calib"]), "--out", str(out), "-q"])
    capsys.readouterr()
    save = files["dir"] / "eval.json"
    assert main(["eval", str(files["model"]), str(out / "model.qdq.onnx"), "--data",
                 str(files["eval"]), "--json", "--save", str(save)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert json.loads(save.read_text()) == doc
    o = doc["outputs"][0]
    assert o["name"] == "logits" and 0 <= o["top1_agreement"] <= 1 and o["cosine"] > 0.9


def test_truncated_model(files, capsys):
    data = files["model"].read_bytes()
    bad = files["dir"] / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 3])
    out = files["dir"] / "out"
    _bad(capsys, ["quantize", str(bad), "--uniform", "w8a8", "--data", str(files["calib"]),
                  "--out", str(out)], "trunc.onnx")
    assert not out.exists()


def test_not_an_onnx_file(files, capsys):
    bad = files["dir"] / "notes.onnx"
    bad.write_text("just some text, certainly not a model\n" * 20)
    before = bad.read_bytes()
    line = _bad(capsys, ["inspect", str(bad)], f"{bad} is not a readable ONNX model")
    assert line.endswith("re-export it"), line  # the fix, after the problem
    assert bad.read_bytes() == before


def test_data_missing_an_input(files, capsys):
    np.savez(files["dir"] / "wrong.npz", y=images(4))
    out = files["dir"] / "out"
    _bad(capsys, ["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
                  str(files["dir"] / "wrong.npz"), "--out", str(out)], "'x'")
    assert not out.exists()


def test_a_failed_json_command_still_prints_one_json_document(files, capsys):
    """With --json a script reads stdout alone: a refused input gives the error, its fix and
    the exit code there, beside the one line on stderr."""
    np.savez(files["dir"] / "wrong.npz", y=images(4))
    profile = Path(__file__).resolve().parent.parent / "hw_profiles" / "ort_cpu.yaml"
    code = main(["run", str(files["model"]), "--hw", str(profile), "--data",
                 str(files["dir"] / "wrong.npz"), "--out", str(files["dir"] / "o"), "--json"])
    got = capsys.readouterr()
    doc = json.loads(got.out)
    assert code == 2 and doc["error"]["exit"] == 2 and doc["error"]["type"] == "DataError"
    assert "'x'" in doc["error"]["problem"] and doc["error"]["fix"]
    assert got.err.startswith("mpsearch: error: ") and "Traceback" not in got.err


def test_data_of_the_wrong_shape(files, capsys):
    np.savez(files["dir"] / "shape.npz", x=images(4, shape=(3, 8, 8)))
    out = files["dir"] / "out"
    line = _bad(capsys, ["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
                         str(files["dir"] / "shape.npz"), "--out", str(out)], "'x'")
    assert "16" in line and "8" in line
    assert not out.exists()


def test_nan_in_the_data(files, capsys):
    x = images(16)
    x[5, 1, 2, 3] = np.nan
    np.savez(files["dir"] / "nan.npz", x=x)
    out = files["dir"] / "out"
    line = _bad(capsys, ["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
                         str(files["dir"] / "nan.npz"), "--out", str(out)], "NaN")
    assert "5" in line
    assert not out.exists()


def test_nan_in_evaluation_data_leaves_no_partial_output(files, capsys):
    x = images(16)
    x[9] = np.inf
    np.savez(files["dir"] / "inf.npz", x=x)
    out = files["dir"] / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _bad(capsys, ["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
                  str(files["calib"]), "--eval-data", str(files["dir"] / "inf.npz"),
                  "--out", str(out)], "Inf")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_output_folder_that_cannot_be_written(files, capsys):
    blocker = files["dir"] / "a_file"
    blocker.write_text("x")
    _bad(capsys, ["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
                  str(files["calib"]), "--out", str(blocker / "sub")], "cannot write")
    _bad(capsys, ["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
                  str(files["calib"]), "--out", str(blocker)], "not a folder")
    assert blocker.read_text() == "x"


def test_output_path_equal_to_the_input(files, capsys):
    d = files["dir"] / "work"
    d.mkdir()
    model = d / "model.qdq.onnx"
    model.write_bytes(files["model"].read_bytes())
    before = _digest(model)
    _bad(capsys, ["quantize", str(model), "--uniform", "w8a8", "--data", str(files["calib"]),
                  "--out", str(d)], "overwrite the input")
    assert _digest(model) == before
    _bad(capsys, ["eval", str(files["model"]), str(model), "--data", str(files["eval"]),
                  "--save", str(files["eval"])], "overwrite the input")


def test_unknown_candidate_and_bad_input_shape(files, capsys):
    _bad(capsys, ["quantize", str(files["model"]), "--uniform", "w3a7", "--data",
                  str(files["calib"]), "--out", str(files["dir"] / "o")], "w3a7")
    _bad(capsys, ["inspect", str(files["model"]), "--input-shape", "x=1,three"], "x=1,three")


def test_console_entry_point_exit_code_and_no_traceback(files):
    bad = files["dir"] / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    r = subprocess.run([sys.executable, "-m", "mpsearch", "inspect", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mpsearch", "inspect", str(bad), "--debug"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_help_for_every_command():
    """Every command's --help exits 0, and every sub-command's ends with examples, one
    command a line, each a command of that name."""
    from mpsearch.cli.main import EXAMPLES

    for cmd in ("run", "pareto", "inspect", "quantize", "sensitivity", "eval", "verify",
                "report", "hw", "hw validate", "hw show", "hw measure"):
        r = subprocess.run([sys.executable, "-m", "mpsearch", *cmd.split(), "--help"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "usage: mpsearch " + cmd in r.stdout, (cmd, r.stderr)
        if cmd != "hw":
            tail = r.stdout.split("examples:\n")[-1].splitlines()
            assert 1 <= len(EXAMPLES[cmd]) <= 3 and len(tail) == len(EXAMPLES[cmd]), cmd
            assert all(line.startswith(f"  mpsearch {cmd} ") for line in tail), tail


def test_relu6_equalization_that_changes_the_float_model_is_refused(files, capsys):
    # scale the stem so that its ReLU6 really clips: replacing it by Relu changes the model
    m = onnx.load(str(files["model"]))
    for t in m.graph.initializer:
        if t.name == "exp_w":
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 20, t.name))
    path = files["dir"] / "clipping.onnx"
    onnx.save(m, str(path))
    out = files["dir"] / "out"
    _bad(capsys, ["quantize", str(path), "--uniform", "w8a8", "--data", str(files["calib"]),
                  "--out", str(out), "--equalize", "relu6"], "changes this model's FP32 output")
    assert not out.exists()


def test_same_inputs_give_the_same_bytes(files, capsys):
    outs = []
    for k in range(2):
        out = files["dir"] / f"out{k}"
        assert main(["quantize", str(files["model"]), "--uniform", "w4a16", "--data",
                     str(files["calib"]), "--out", str(out), "-q"]) == 0
        outs.append(out)
    assert _digest(outs[0] / "model.qdq.onnx") == _digest(outs[1] / "model.qdq.onnx")
    umask = os.umask(0)
    os.umask(umask)
    assert (outs[0] / "model.qdq.onnx").stat().st_mode & 0o777 == 0o666 & ~umask


def test_hw_show_with_a_model_skips_what_a_layer_cannot_take_with_the_reason(files, capsys):
    """Snapdragon's profile pairs Conv with +channel@d candidates: a depthwise conv cannot prune
    its output channels alone, nor can a layer whose channels reach a graph output. show lists
    those pairs with the reason and costs every other one; it never aborts."""
    profile = Path(__file__).resolve().parent.parent / "hw_profiles" / "snapdragon_8gen3.yaml"
    assert main(["hw", "show", str(profile), "--model", str(files["model"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    dw = doc["not_legal"]["depthwise"]
    assert "a depthwise conv's output channel is its input channel" in dw["w8a8+channel@0.5"]
    assert "graph output 'logits'" in doc["not_legal"]["fc"]["w8a8+channel@0.5"]
    assert not any("+channel" in c for c in doc["layers"]["depthwise"])
    assert "w8a8+channel@0.5" in doc["layers"]["expand"]  # a dense consumer reads it: legal
    assert set(doc["layers"]["depthwise"]) | set(dw) == set(doc["layers"]["expand"])
    assert doc["uniform_plans"]["w8a8"]["relative"]["bops"] == pytest.approx(1.0)


def test_json_stdout_holds_the_document_alone(files, tmp_path):
    """QNN's HTP libraries print " # LIBNATIVE: ..." to file descriptor 1 when they load: it
    never reaches stdout, which parses as one JSON document with --json and holds only the
    tool's own lines without it; with -v the line goes to stderr."""
    q = tmp_path / "q"
    assert main(["quantize", str(files["model"]), "--uniform", "w8a8", "--data",
                 str(files["calib"]), "--out", str(q), "-q"]) == 0
    verify = [sys.executable, "-m", "mpsearch", "verify", str(q / "model.qdq.onnx"), "--data",
              str(files["eval"]), "--samples", "1"]
    r = subprocess.run([*verify, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # nothing else on stdout
    assert doc["schema"] == "mpsearch.verify/1" and doc["verified"] is True
    plain = subprocess.run(verify, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "LIBNATIVE" not in plain.stdout + plain.stderr
    assert plain.stdout.strip()  # the tool's own table is there
    loud = subprocess.run([*verify, "-v"], capture_output=True, text=True, timeout=300)
    assert "LIBNATIVE" not in loud.stdout


@pytest.mark.parametrize("profile", ["snapdragon_8gen3", "ort_cpu", "nvidia_h100"])
def test_run_json_is_one_document_on_every_profile(files, tmp_path, profile):
    """``mpsearch run ... --json`` in a fresh process: stdout parses as one JSON document (the
    QNN libraries' native line never reaches it), with the shipped model's digest (bops=1.0:
    the H100 profile has no 4-bit integer weights, so w8a8 is its cheapest plan)."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "mpsearch", "run", str(files["model"]), "--hw",
                        str(root / "hw_profiles" / f"{profile}.yaml"), "--data",
                        str(files["calib"]), "--eval-data", str(files["eval"]), "--out",
                        str(tmp_path / "out"), "--budget", "bops=1.0", "--no-cache",
                        "--verify-samples", "1", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    digest = hashlib.sha256((tmp_path / "out" / "model.qdq.onnx").read_bytes()).hexdigest()
    assert doc["model"]["sha256"] == digest
    assert doc["quality"]["measured"]["data"] == "evaluation"
    stages = doc["stages"]  # seconds per stage, the whole search last
    assert {"calibrate", "sensitivity", "refine", "select", "measure"} <= set(stages)
    assert stages["total"] >= max(v for k, v in stages.items() if k != "total")
