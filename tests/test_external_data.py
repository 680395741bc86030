"""Models whose weights live in an external data file go through the whole pipeline.

Exports above 2 GB must keep their weights beside the graph (protobuf's limit), and many
smaller ones do too. The model here is built in code and saved with every tensor in one
external file; ``mpsearch run`` must ingest, calibrate and export it, write a checked model,
and leave the input files as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mpsearch.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "hw_profiles" / "ort_cpu.yaml"


def _conv_gemm_matmul(seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu, global pooling, Gemm-Relu, MatMul: [N,3,16,16] -> [N,10]."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    inits = [w("c1_w", 16, 3, 3, 3), w("c1_b", 16, scale=0.1), w("c2_w", 32, 16, 3, 3, scale=0.1),
             w("c2_b", 32, scale=0.1), w("fc_w", 64, 32), w("fc_b", 64, scale=0.1),
             w("out_w", 64, 10, scale=0.2),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat")]
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["c2"], name="conv2", pads=[1] * 4,
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Reshape", ["p", "flat"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], name="fc", transB=1),
        helper.make_node("Relu", ["g"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "out_w"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "external", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                          ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(ref**2) / np.mean((ref - got) ** 2)))


def _save_external(model: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    (folder / "m.onnx.data").unlink(missing_ok=True)  # onnx.save appends to an existing one
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    return path


def _data(folder: Path) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((48, 3, 16, 16)).astype(np.float32)
    np.savez(folder / "calib.npz", x=x[:32])
    np.savez(folder / "eval.npz", x=x[32:])
    return x


def _run(path: Path, folder: Path, out: Path, *extra: str) -> int:
    return main(["run", str(path), "--hw", str(PROFILE), "--data", str(folder / "calib.npz"),
                 "--eval-data", str(folder / "eval.npz"), "--budget", "size=0.6",
                 "--no-verify", "--out", str(out), "-q", *extra])


def test_run_quantizes_a_model_with_external_data(tmp_path):
    model_dir = tmp_path / "model"
    path = _save_external(_conv_gemm_matmul(), model_dir)
    header = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    weights = sum(numpy_helper.to_array(t).nbytes
                  for t in onnx.load(str(path)).graph.initializer)
    assert (model_dir / "m.onnx.data").stat().st_size >= weights > 10 * path.stat().st_size
    before = _digests(model_dir)

    x = _data(tmp_path)
    out = tmp_path / "out"
    assert _run(path, tmp_path, out, "--no-cache") == 0

    shipped = out / "model.qdq.onnx"
    onnx.checker.check_model(str(shipped), full_check=True)
    # self-contained: it refers to no data file (the input's, or one of its own)
    written = onnx.load(str(shipped), load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)
    assert not any(p.name.endswith(".data") for p in out.iterdir())
    session = ort.InferenceSession(str(shipped), providers=["CPUExecutionProvider"])
    # ORT itself cannot open m.onnx: its Reshape shape inference does not read an external
    # shape tensor ("Cannot parse data from external tensors"); the reference runs from memory.
    reference = ort.InferenceSession(onnx.load(str(path)).SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    feed = {"x": x[32:]}
    got = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(32, 48)])
    ref = reference.run(None, feed)[0]
    assert _sqnr_db(ref, got) > 30  # measured 35.1 dB (w4a16 x2, w8a16 x2)

    doc = json.loads((out / "plan.json").read_text())
    assert doc["totals"]["weight_bytes"]["relative_to_w8a8"] <= 0.6  # measured 0.593
    assert _digests(model_dir) == before  # the input model and its data file untouched


def test_the_sensitivity_cache_sees_new_weights_in_the_data_file(tmp_path):
    """Only ``m.onnx.data`` changes between the runs (``m.onnx`` keeps its bytes): the second
    run must not take the first one's cached sensitivities."""
    path = _save_external(_conv_gemm_matmul(seed=0), tmp_path / "model")
    header = path.read_bytes()
    _data(tmp_path)
    cache = tmp_path / "cache"
    assert _run(path, tmp_path, tmp_path / "a", "--cache-dir", str(cache)) == 0
    _save_external(_conv_gemm_matmul(seed=2), tmp_path / "model")
    assert path.read_bytes() == header
    assert _run(path, tmp_path, tmp_path / "b", "--cache-dir", str(cache)) == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    a, b = (json.loads((tmp_path / d / "sensitivity.json").read_text()) for d in "ab")
    assert a != b
