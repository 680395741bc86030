"""The three real examples (EfficientNet-Lite0 with ImageNet weights, a CNN trained on real
MNIST digits, all-MiniLM-L6-v2), built from offline packages, quantized to every uniform format
and run on ONNX Runtime's CPU EP. Bounds sit a few dB under what benchmarks/uniform_formats.py
measured on the full evaluation sets (benchmarks/results/uniform_formats.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mpsearch import analyze, evaluate, load_model, open_dataset, parse_candidate
from mpsearch.core.formats import Candidate, Format
from mpsearch.export.qdq import quantize
from mpsearch.export.readback import read_formats

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _prepare(name: str) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location(f"prepare_{name}",
                                                  ROOT / "examples" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepare()


@pytest.fixture(scope="module", params=["efficientnet_lite0", "mnist_cnn", "minilm"])
def example(request):
    paths = _prepare(request.param)
    model = load_model(paths["model"])
    cal = open_dataset(paths["calib"], model)
    ev = open_dataset(paths["eval"], model, name="evaluation")
    if request.param != "mnist_cnn":
        ev = ev.take(range(48))
    return request.param, model, analyze(model, cal), ev


# (minimum SQNR dB, for MNIST: minimum accuracy) per format and example.
BOUNDS = {
    "efficientnet_lite0": {"w8a8": 18.0, "w8a16": 21.0, "w4a8": -1.0, "w16a16": 55.0,
                           "fp16": 38.0, "fp8": 2.0},
    "mnist_cnn": {"w8a8": 36.0, "w8a16": 45.0, "w4a8": 20.0, "w16a16": 70.0, "fp16": 60.0,
                  "fp8": 22.0},
    "minilm": {"w8a8": 6.0, "w8a16": 27.5, "w4a8": 4.0, "w16a16": 44.0, "fp16": 60.0,
               "fp8": 12.0},
}
MNIST_ACCURACY = {"w8a8": 0.97, "w8a16": 0.97, "w4a8": 0.965, "w16a16": 0.97, "fp16": 0.97,
                  "fp8": 0.96}


@pytest.mark.parametrize("fmt", ["w8a8", "w8a16", "w4a8", "w16a16", "fp16", "fp8"])
def test_uniform_export_runs_on_ort_cpu(example, fmt):
    name, model, analysis, ev = example
    cand = parse_candidate(fmt)
    q = quantize(analysis, cand)
    r = evaluate(model, q.model, ev.batches(), labels=ev.labels).primary
    assert r.sqnr_db > BOUNDS[name][fmt], f"{name} {fmt}: {r.sqnr_db:.2f} dB"
    if name == "mnist_cnn":
        assert r.accuracy >= MNIST_ACCURACY[fmt], f"{fmt}: accuracy {r.accuracy:.3f}"
    stored = read_formats(q.model)
    weighted = [g.name for g in analysis.graph.groups if g.has_weight]
    assert all(g in stored for g in weighted)
    if cand.activation.is_quantized:
        for g in analysis.graph.groups:  # activation x activation MatMuls have no weight
            want = cand if g.has_weight else Candidate(weight=Format.FLOAT,
                                                       activation=cand.activation)
            assert stored[g.name] == want, g.name
