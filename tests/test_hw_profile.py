"""Hardware profiles: the shipped ones load, broken ones fail with file, line and key path,
and the cost model's numbers match hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import images, mbconv

from mpsearch.cli.main import main
from mpsearch.core.errors import ProfileError
from mpsearch.core.formats import parse_candidate
from mpsearch.graph.layer_graph import build_layer_graph
from mpsearch.hw.cost import CostModel, reference_candidate
from mpsearch.hw.profile import load_profile, parse_profile

ROOT = Path(__file__).resolve().parent.parent
GOOD = """\
schema: 1
name: toy
target: {runtime: generic}
formats:
  weights: [int4, int8, int16, fp16]
  activations: [uint8, uint16, fp16]
ops:
  default: [w8a8, w8a16, w4a8]
  Gemm: [w8a8, fp16]
cost:
  compute:
    macs_per_s: {w8a8: 1.0e+9, w8a16: 5.0e+8, w4a8: 1.0e+9, fp16: 2.5e+8}
    source: placeholder
  memory: {bytes_per_s: 1.0e+9, source: placeholder}
  energy:
    pj_per_mac: {w8a8: 1, w8a16: 2, w4a8: 0.5, fp16: 4}
    pj_per_byte: 10
    source: placeholder
  overhead: {per_layer_s: 1.0e-6, source: placeholder}
  conversion: {per_edge_s: 1.0e-6, per_byte_s: 1.0e-9, source: placeholder}
rules:
  tie: [Add]
"""


@pytest.mark.parametrize("name", ["snapdragon_8gen3", "nvidia_h100", "ort_cpu"])
def test_shipped_profiles_load_and_name_every_source(name):
    path = ROOT / "hw_profiles" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not written yet")
    p = load_profile(path)
    for src in (p.compute.source, p.memory.source, p.energy.source, p.conversion.source,
                p.overhead_source):
        assert src.strip()
    assert reference_candidate(p).name in ("w8a8", "w:int8/a:int8")


def test_snapdragon_profile_matches_the_htp_facts():
    p = load_profile(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml")
    assert p.soc_model == 57 and p.runtime == "qnn-htp"
    names = {c.name for c in p.all_pairs}
    assert {"w8a8", "w8a16", "w4a8", "w4a16", "w16a16", "fp16"} <= names
    assert not any("fp8" in n for n in names)


# (what is broken, the YAML, the key path in the message, the line it names)
BROKEN = [
    ("unknown key", GOOD.replace("name: toy", "name: toy\ncolour: blue"), "colour", 3),
    ("wrong type", GOOD.replace("schema: 1", "schema: one"), "schema must be a int", 1),
    ("unknown format", GOOD.replace("[int4, int8, int16, fp16]", "[int4, int7]"),
     "formats.weights.1", 5),
    ("pair with undeclared format", GOOD.replace("activations: [uint8, uint16, fp16]",
                                                 "activations: [uint8, fp16]"),
     "ops.default.1", 8),
    ("negative cost", GOOD.replace("bytes_per_s: 1.0e+9", "bytes_per_s: -5"),
     "cost.memory.bytes_per_s", 14),
    ("empty op list", GOOD.replace("Gemm: [w8a8, fp16]", "Gemm: []"), "ops.Gemm", 9),
    ("bad YAML syntax", GOOD.replace("default: [w8a8, w8a16, w4a8]", "default: [w8a8, w8a16"),
     "invalid YAML", None),
    ("missing section", GOOD.replace("  overhead: {per_layer_s: 1.0e-6, source: placeholder}\n",
                                     ""), "cost.overhead is missing", 10),
    ("duplicate op", GOOD.replace("Gemm: [w8a8, fp16]", "Gemm: [w8a8, fp16]\n  Gemm: [w8a8]"),
     "ops.Gemm is defined twice", 10),
]


@pytest.mark.parametrize("what,text,needle,line", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_profile_exits_2_with_key_path_and_line(tmp_path, capsys, what, text, needle,
                                                       line):
    f = tmp_path / "broken.yaml"
    f.write_text(text)
    assert main(["hw", "validate", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mpsearch: error: ")
    assert needle in err, err
    if line is not None:
        assert f"broken.yaml:{line}:" in err, err


def test_profile_file_not_found(tmp_path, capsys):
    assert main(["hw", "validate", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1


def test_good_profile_and_cost_model_by_hand():
    p = parse_profile(GOOD)
    assert p.pairs_for("Conv") == tuple(map(parse_candidate, ["w8a8", "w8a16", "w4a8"]))
    assert p.pairs_for("Gemm") == tuple(map(parse_candidate, ["w8a8", "fp16"]))
    lg = build_layer_graph(mbconv(), input_shapes={"x": (1, 3, 16, 16)})
    cm = CostModel(lg, p)
    c = cm.layer("expand", parse_candidate("w8a16"))
    # expand: 1x1 conv 8 -> 16 on 8x8; bias 16 (int32); input 8x8x8, output 16x8x8
    assert c.macs == 16 * 8 * 8 * 8
    assert c.bops == c.macs * 8 * 16
    assert c.weight_bytes == 16 * 8 * 1 + 16 * 4
    assert c.activation_bytes == (8 * 64 + 16 * 64) * 2
    roof = max(c.macs / 5e8, (c.weight_bytes + c.activation_bytes) / 1e9) + 1e-6
    assert c.latency_s == pytest.approx(roof) and c.latency_from == "roofline"
    assert c.energy_j == pytest.approx((c.macs * 2 + (c.weight_bytes + c.activation_bytes)
                                        * 10) * 1e-12)
    w8 = {g: parse_candidate("w8a8") for g in lg.group_names}
    total = cm.plan(w8)
    assert total.relative == {m: 1.0 for m in total.relative}
    assert total.conversions == 0
    mixed = dict(w8, expand=parse_candidate("w8a16"))
    pc = cm.plan(mixed)
    # expand reads the stem's uint8 output and its output is read by the uint8 depthwise:
    # two conversions, each per edge + bytes x per byte
    assert pc.conversions == 2
    conv = 2e-6 + (8 * 64 + 16 * 64) * (1 + 2) * 1e-9
    assert pc.conversion_s == pytest.approx(conv)
    assert pc.latency_s == pytest.approx(total.latency_s - cm.layer("expand", w8["expand"])
                                         .latency_s + c.latency_s + conv)
    assert pc.relative["bops"] > 1 and math.isclose(pc.relative["weight_bytes"], 1.0)


def test_a_legal_candidate_without_costs_is_refused():
    with pytest.raises(ProfileError, match=r":12: cost.compute.macs_per_s has no entry for w8a8"):
        parse_profile(GOOD.replace("w8a8: 1.0e+9, w8a16", "w8a16"))


def test_pins_restrict_candidates(tmp_path):
    p = parse_profile(GOOD.replace("  tie: [Add]", "  tie: [Add]\n  pin: {stem: w8a16}"))
    lg = build_layer_graph(mbconv())
    cm = CostModel(lg, p)
    assert cm.candidates("stem") == (parse_candidate("w8a16"),)
    assert cm.candidates("fc") == tuple(map(parse_candidate, ["w8a8", "fp16"]))


def test_sparse_candidates_cost_metadata_and_speed_up():
    p = load_profile(ROOT / "hw_profiles" / "nvidia_h100.yaml")
    lg = build_layer_graph(mbconv(), input_shapes={"x": (1, 3, 16, 16)})
    cm = CostModel(lg, p)
    dense = cm.layer("expand", parse_candidate("w:int8/a:int8"))
    sparse = cm.layer("expand", parse_candidate("w:int8/a:int8+2:4"))
    bias = 16 * 4
    assert sparse.weight_bytes - bias == pytest.approx((dense.weight_bytes - bias) / 2
                                                       * (8 + 2) / 8)
    assert sparse.bops == dense.bops / 2
    snap = CostModel(lg, load_profile(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"))
    with pytest.raises(ProfileError, match="no sparsity pattern '2:4'"):
        snap.layer("expand", parse_candidate("w8a8+2:4"))


def test_a_sparse_candidate_needs_its_pattern():
    with pytest.raises(ProfileError, match=r"ops.default.1 'w8a8\+2:4' uses sparsity pattern"):
        parse_profile(GOOD.replace("default: [w8a8, w8a16, w4a8]", "default: [w8a8, w8a8+2:4]"))


def test_sparsity_names_round_trip():
    for text in ("w8a8+2:4", "w4a8+unstructured@0.5", "fp16+channel@0.75"):
        assert parse_candidate(text).name == text


def test_a_latency_table_of_another_model_is_not_used(tmp_path, capsys):
    p = load_profile(ROOT / "hw_profiles" / "ort_cpu.yaml")  # measured on EfficientNet-Lite0
    assert p.latency_table is not None
    cm = CostModel(build_layer_graph(mbconv()), p)
    assert cm.table is None
    assert cm.layer("stem", parse_candidate("w8a8")).latency_from == "roofline"
    # a run says so once (its budget check before calibration builds a quiet cost model)
    onnx.save(mbconv(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=images(16, seed=1))
    capsys.readouterr()  # what the cost model above said
    assert main(["run", str(tmp_path / "m.onnx"), "--hw", str(ROOT / "hw_profiles" /
                 "ort_cpu.yaml"), "--data", str(tmp_path / "c.npz"), "--out",
                 str(tmp_path / "out"), "-q", "--no-cache", "--budget", "bops=0.9",
                 "--refine", "0", "--polish", "0"]) == 0
    assert capsys.readouterr().err.count("was measured on another model") == 1


def test_the_device_agreement_threshold_is_a_profile_setting():
    assert parse_profile(GOOD).verify_min_sqnr_db is None  # the default, 25 dB, applies
    p = parse_profile(GOOD.replace("target: {runtime: generic}",
                                   "target: {runtime: generic, verify_min_sqnr_db: 30}"))
    assert p.verify_min_sqnr_db == 30.0
    with pytest.raises(ProfileError, match=r"target.verify_min_sqnr_db must be zero or more"):
        parse_profile(GOOD.replace("target: {runtime: generic}",
                                   "target: {runtime: generic, verify_min_sqnr_db: -3}"))
