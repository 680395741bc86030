"""Latency tables measured on ORT's CPU EP: one-layer models cut as the exporter writes them,
a table with an entry for every (layer, allowed candidate), written into a profile below the
marker (the hand-written part kept) and read back, and used by the cost model. No speed
thresholds: speed is a benchmark (benchmarks/latency_prediction.py), not a test; the one
comparison of times is between models whose work differs 64-fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from models import images, mbconv
from onnx import TensorProto

from mpsearch import analyze, open_dataset, parse_candidate
from mpsearch.core.errors import ProfileError
from mpsearch.device.latency import (
    MARKER,
    measure_latency_table,
    median_latencies,
    one_layer_model,
    write_latency_table,
)
from mpsearch.export.qdq import quantize, uniform_plan
from mpsearch.graph.calibrate import make_session
from mpsearch.hw.cost import CostModel
from mpsearch.hw.profile import load_profile

PROFILES = Path(__file__).resolve().parent.parent / "hw_profiles"
ORT_CPU = PROFILES / "ort_cpu.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("measure")
    model = mbconv()
    np.savez(tmp / "calib.npz", x=images(16, seed=1))
    data = open_dataset(tmp / "calib.npz", model)
    profile = load_profile(ORT_CPU)
    table = measure_latency_table(model, data, profile, warmup=1, repeats=3)
    return model, data, profile, table, analyze(model, data)


def test_one_layer_model_starts_and_ends_quantized(setup):
    model, data, _, _, analysis = setup
    layer = analysis.graph.layers["expand"]
    cut = one_layer_model(quantize(analysis, parse_candidate("w8a8")).model, layer)
    g = cut.model.graph
    assert [n.op_type for n in g.node] == ["DequantizeLinear"] * 3 + ["Conv", "QuantizeLinear"]
    assert [i.type.tensor_type.elem_type for i in g.input] == [TensorProto.UINT8]
    assert [o.type.tensor_type.elem_type for o in g.output] == [TensorProto.UINT8]
    x = np.random.default_rng(0).integers(0, 255, (1, 8, 8, 8), dtype=np.uint8)
    (y,) = make_session(cut.model).run(None, {cut.inputs[0]: x})
    assert y.dtype == np.uint8 and y.shape == (1, 16, 8, 8)

    w16 = one_layer_model(quantize(analysis, parse_candidate("w8a16")).model, layer)
    assert [i.type.tensor_type.elem_type for i in w16.model.graph.input] == [TensorProto.UINT16]
    fp = one_layer_model(quantize(analysis, parse_candidate("fp16")).model, layer)
    assert [n.op_type for n in fp.model.graph.node] == ["Conv"]
    assert fp.inputs == layer.inputs and fp.outputs == (layer.output,)


def test_table_has_every_layer_and_allowed_candidate(setup):
    _, _, profile, table, analysis = setup
    lg = analysis.graph
    assert set(table.layers) == set(lg.layers)
    for name, entries in table.layers.items():
        assert list(entries) == list(profile.pairs_for(lg.layers[name].op_type))
        assert all(v > 0 for v in entries.values())
    assert {str(f) for f in table.other_s} == {"uint8", "uint16", "float"}
    assert all(v >= 0 for v in table.other_s.values())
    assert table.conversion_s_per_byte > 0
    assert len(table.model_sha256) == 64 and "onnxruntime" in table.source


def test_written_table_reloads_and_the_cost_model_uses_it(setup, tmp_path):
    _, _, _, table, analysis = setup
    out = write_latency_table(ORT_CPU, table, tmp_path / "measured.yaml")
    text = out.read_text()
    head = ORT_CPU.read_text().split(MARKER)[0].rstrip("\n")
    assert text.startswith(head) and text.count(MARKER) == 1
    p = load_profile(out)
    t = p.latency_table
    assert t is not None and t.model_sha256 == table.model_sha256
    assert set(t.layers) == set(table.layers)
    for name, entries in table.layers.items():
        assert t.layers[name] == pytest.approx(entries, rel=1e-4)
    assert t.other_s == pytest.approx(table.other_s, rel=1e-4, abs=1e-12)

    cost = CostModel(analysis.graph, p)
    for g in analysis.graph.group_names:
        for c in cost.candidates(g):
            assert cost.layer(g, c).latency_from == "table"
    w8a8 = parse_candidate("w8a8")
    plan = uniform_plan(analysis.graph, w8a8)
    expected = sum(t.layers[g][w8a8] for g in plan) + t.other_s[w8a8.activation]
    assert cost.plan(plan).latency_s == pytest.approx(expected, rel=1e-9)

    again = write_latency_table(out, table, tmp_path / "again.yaml")  # replaces, not appends
    assert again.read_text() == text


def test_a_hand_written_table_is_replaced_and_comments_kept(setup, tmp_path):
    _, _, _, table, _ = setup
    head = ORT_CPU.read_text().split(MARKER)[0].rstrip("\n")
    base = tmp_path / "hand.yaml"
    base.write_text(head + "\n# my own note\nlatency_table:\n  model_sha256: x\n  layers: {}\n"
                    "  other_s: {}\n  conversion_s_per_byte: 0\n  source: by hand\n")
    text = write_latency_table(base, table, base).read_text()
    assert "# my own note" in text and "by hand" not in text
    assert [ln for ln in text.splitlines() if ln.startswith("latency_table:")] == ["latency_table:"]
    assert load_profile(base).latency_table.model_sha256 == table.model_sha256


def test_profiles_for_other_runtimes_are_refused(setup):
    model, data, _, _, _ = setup
    with pytest.raises(ProfileError, match="qnn-htp"):
        measure_latency_table(model, data, load_profile(PROFILES / "snapdragon_8gen3.yaml"))


def _matmul_chain(count: int):
    """``count`` 256x256 MatMuls in a row on a [64, 256] input: work proportional to count."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((256, 256)) / 16).astype(np.float32), "w")
    nodes, prev = [], "x"
    for i in range(count):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"y{i}"]))
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes, f"chain{count}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [64, 256])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_median_latencies_times_each_model():
    """One median per model, in the order given: a model doing 64x the work of another is
    timed far slower (the factor asked, 4, leaves a wide margin for a loaded machine)."""
    light, heavy = _matmul_chain(1), _matmul_chain(64)
    feed = {"x": np.ones((64, 256), np.float32), "unused": np.ones(3, np.float32)}
    times = median_latencies([heavy, light, heavy], feed, warmup=1, repeats=6, rounds=3,
                             threads=1)
    assert len(times) == 3
    assert times[0] > 4 * times[1] and times[2] > 4 * times[1], times
