"""Pruned candidates end to end: the QDQ file holds the pattern (2:4 along the input dimension,
exactly half the weights of an unstructured@0.5 layer), layers that cannot take a pattern never
get it (with the reason), the Hessian prediction of a pruned candidate tracks its measured
error, and a search on an H100-like device buys latency with 2:4 where the budget needs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from models import images, mbconv, toy_profile
from onnx import numpy_helper
from scipy.stats import spearmanr

import mpsearch
from mpsearch import analyze, open_dataset, parse_candidate
from mpsearch.core.errors import UsageError
from mpsearch.export.qdq import quantize
from mpsearch.graph.calibrate import make_session
from mpsearch.graph.layer_graph import Layer
from mpsearch.hw.cost import CostModel
from mpsearch.hw.profile import load_profile, parse_profile
from mpsearch.job.config import (
    CacheConfig,
    CandidateConfig,
    MeasureConfig,
    RefinementConfig,
    SearchConfig,
)
from mpsearch.job.search import SearchData
from mpsearch.sensitivity.run import estimate
from mpsearch.sensitivity.table import candidates_for, legal_candidates

ROOT = Path(__file__).resolve().parent.parent
H100 = load_profile(ROOT / "hw_profiles" / "nvidia_h100.yaml")
SNAPDRAGON = load_profile(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml")
INT8_24 = parse_candidate("w:int8/a:int8+2:4")
INT8 = parse_candidate("w:int8/a:int8")

# An H100 in miniature: 2:4 doubles the int8 rate, no launch overhead and ample bandwidth, so
# latency is compute and 2:4 is the only way below the dense int8 time.
TOY_H100 = toy_profile("toy_h100", pairs="w8a8+2:4",
                       patterns='    "2:4": {speedup: 2.0, metadata_bits: 2}')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sparsity")
    model = mbconv(seed=5)
    onnx.save(model, str(d / "model.onnx"))
    np.savez(d / "calib.npz", x=images(64, seed=1))
    np.savez(d / "eval.npz", x=images(16, seed=2))
    data = open_dataset(d / "calib.npz", model)
    return {"dir": d, "model": model, "data": data,
            "analysis": analyze(model, data, hessians=True)}


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(ref.astype(np.float64) ** 2)
                               / np.mean((ref.astype(np.float64) - got) ** 2)))


def _stored_weights(qm: onnx.ModelProto, lg) -> dict[str, np.ndarray]:
    """Layer -> the integers its weight's DequantizeLinear reads, from the file."""
    inits = {t.name: t for t in qm.graph.initializer}
    producer = {o: n for n in qm.graph.node for o in n.output}
    weight_input = {n.name: n.input[1] for n in qm.graph.node if n.name in lg.layers}
    out = {}
    for name, t in weight_input.items():
        dq = producer.get(t)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            out[name] = numpy_helper.to_array(inits[dq.input[0]])
    return out


def _groups_of_four(layer: Layer, w: np.ndarray) -> np.ndarray:
    """Non-zeros per group of four consecutive input channels, at every output channel and
    kernel offset (a short last group padded with zeros)."""
    if layer.op_type == "Conv":  # (C_out, C_in/g, kh, kw): input channels on axis 1
        a = np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])
    else:  # Gemm/MatMul: the input dimension is the one that is not the channel axis
        a = w if layer.channel_axis == 0 else w.T
    pad = (-a.shape[1]) % 4
    a = np.pad(a, ((0, 0), (0, pad)))
    return (a.reshape(a.shape[0], -1, 4) != 0).sum(axis=2)


def test_exported_2_4_layers_keep_two_of_every_four_inputs(setup):
    an = setup["analysis"]
    lg = an.graph
    cands = candidates_for(lg, CostModel(lg, H100), sparsity="2:4")
    plan = {g: INT8_24 if INT8_24 in cands[g] else INT8 for g in lg.group_names}
    sparse = [g for g, c in plan.items() if c.sparsity is not None]
    assert set(sparse) == {"expand", "project", "grouped", "fc"}
    qm = quantize(an, plan).model
    stored = _stored_weights(qm, lg)
    for g in sparse:
        nz = _groups_of_four(lg.layers[g], stored[g])
        assert nz.max() <= 2, g
        assert (stored[g] == 0).mean() >= 0.5
    assert (stored["expand"] != 0).mean() > 0.45  # the survivors are not rounded away
    # the file runs, and pruning half of four layers costs accuracy but not everything
    x = images(16, seed=2)
    ref = make_session(setup["model"]).run(None, {"x": x})[0]
    got = make_session(qm).run(None, {"x": x})[0]
    assert 5.0 < _sqnr(ref, got) < _sqnr(ref, make_session(
        quantize(an, {g: INT8 for g in lg.group_names}).model).run(None, {"x": x})[0])


def test_unstructured_half_prunes_exactly_half_of_every_layer(setup):
    an = setup["analysis"]
    lg = an.graph
    half = parse_candidate("w8a8+unstructured@0.5")
    cands = candidates_for(lg, CostModel(lg, SNAPDRAGON), sparsity="unstructured")
    assert all(half in cands[g] for g in lg.group_names)  # no layout refuses unstructured
    stored = _stored_weights(quantize(an, {g: half for g in lg.group_names}).model, lg)
    for g in lg.group_names:
        w = stored[g]
        assert (w == 0).sum() == round(0.5 * w.size), g


def test_layers_that_cannot_take_2_4_never_get_it(setup):
    lg = setup["analysis"].graph
    cs = legal_candidates(lg, CostModel(lg, H100), sparsity="all")
    two_four = [r for r in cs.refused if r.candidate.sparsity.pattern == "2:4"]
    assert {r.group for r in two_four} == {"stem", "depthwise"}
    assert all("input channels" in r.reason for r in two_four)
    assert all(c.sparsity is None for g in ("stem", "depthwise") for c in cs.by_group[g])
    # the default offers nothing pruned; a sparse candidate named in `only` is kept
    assert not any(c.sparsity for cs_ in candidates_for(lg, CostModel(lg, H100)).values()
                   for c in cs_)
    only = candidates_for(lg, CostModel(lg, H100), (INT8, INT8_24))
    assert only["fc"] == (INT8, INT8_24) and only["stem"] == (INT8,)
    with pytest.raises(UsageError, match="depthwise conv has 1 per group"):
        quantize(setup["analysis"], {g: INT8_24 if g == "depthwise" else INT8
                                  for g in lg.group_names})
    with pytest.raises(UsageError, match="output channels"):
        quantize(setup["analysis"], {g: parse_candidate("w8a8+channel@0.5") if g == "fc"
                                  else parse_candidate("w8a8") for g in lg.group_names})
    with pytest.raises(UsageError, match="sparsity 4:8 is not a known choice"):
        SearchConfig(budgets=["bops=1"], candidates=CandidateConfig(sparsity="4:8"))


def test_hessian_prediction_of_pruned_candidates_tracks_the_measured_error(setup):
    an, lg = setup["analysis"], setup["analysis"].graph
    names = ["w8a8", "w4a8", "w8a8+unstructured@0.5", "w4a8+unstructured@0.5",
             "w8a8+unstructured@0.25"]
    cands = {g: tuple(map(parse_candidate, names)) for g in lg.group_names}
    for g in ("expand", "project", "grouped", "fc"):
        cands[g] += (parse_candidate("w8a8+2:4"),)
    table = estimate(an, setup["data"], cands, method="both")
    sparse = [k for k in table.measured if k[1].sparsity is not None]
    assert len(sparse) == 6 * 3 + 4
    ratios = np.array([table.predicted[k] / table.measured[k] for k in sparse])
    assert np.all((ratios > 0.2) & (ratios < 5.0))  # the same spread as the dense ones
    pooled = spearmanr([table.predicted[k] for k in sparse], [table.measured[k] for k in sparse])
    assert pooled.statistic > 0.85
    for g in lg.group_names:  # and within a layer, the order of its candidates
        keys = [(g, c) for c in cands[g]]
        rho = spearmanr([table.predicted[k] for k in keys], [table.measured[k] for k in keys])
        assert rho.statistic >= 0.7, g


def _config(budget: str, **candidates: str) -> SearchConfig:
    return SearchConfig(budgets=[budget], cache=CacheConfig(enabled=False),
                        measurement=MeasureConfig(front_points=0),
                        refinement=RefinementConfig(rounds=1),
                        candidates=CandidateConfig(**candidates))


def test_search_buys_latency_with_2_4_where_the_budget_needs_it(setup, tmp_path):
    d = setup["dir"]
    prof = parse_profile(TOY_H100, where="toy_h100.yaml")
    data = SearchData(calibration=d / "calib.npz", evaluation=d / "eval.npz")
    with pytest.raises(mpsearch.InfeasibleBudgetError):
        mpsearch.search(d / "model.onnx", prof, data, _config("latency=0.85"))
    res = mpsearch.search(d / "model.onnx", prof, data, _config("latency=0.85", sparsity="2:4"))
    assert res.chosen.cost.relative["latency_s"] <= 0.85 + 1e-9 and res.chosen.fits
    picked = {g for g, c in res.plan.items() if c.sparsity is not None}
    assert picked and picked <= {"expand", "project", "grouped", "fc"}
    stored = _stored_weights(res.qdq().model, res.analysis.graph)
    for g in picked:
        assert _groups_of_four(res.analysis.graph.layers[g], stored[g]).max() <= 2
    assert res.chosen.measured is not None and res.chosen.measured.sqnr_db > 5.0


# Output-channel pruning: an H100 in miniature where only the expand conv's channels can go
# (the other layers' channels meet the residual Add or a Concat, are a depthwise conv's or
# reach the logits), and the only way below the dense int8 BOPs is to drop them.
TOY_CHANNEL = toy_profile("toy_channel", pairs="w8a8+channel@0.5",
                          patterns="    channel: {speedup: 1.0, metadata_bits: 0}")
CHANNEL = parse_candidate("w8a8+channel@0.5")


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return m


def test_channel_candidates_only_where_the_route_allows_it(setup):
    lg = setup["analysis"].graph
    cs = legal_candidates(lg, CostModel(lg, H100), sparsity="channel")
    offered = {g for g, cands in cs.by_group.items() if any(c.sparsity for c in cands)}
    assert offered == {"expand"}
    assert all(c.sparsity.pattern == "channel" for cands in cs.by_group.values()
               for c in cands if c.sparsity)
    reasons = {r.group: r.reason for r in cs.refused}
    assert set(reasons) == {"stem", "depthwise", "project", "grouped", "fc"}
    assert "tie" in reasons["stem"] and "tie" in reasons["project"]
    assert "depthwise" in reasons["depthwise"] and "unequal groups" in reasons["grouped"]
    assert "graph output" in reasons["fc"]
    # "all" offers both kinds, each where it is legal
    both = legal_candidates(lg, CostModel(lg, H100), sparsity="all").by_group
    assert {c.sparsity.pattern for c in both["expand"] if c.sparsity} == {"2:4", "channel"}
    assert {c.sparsity.pattern for c in both["project"] if c.sparsity} == {"2:4"}


def test_search_prunes_channels_and_exports_the_smaller_model(setup):
    from mpsearch.export.channels import mask_channels, shrink_channels
    from mpsearch.export.qdq import export_qdq

    d = setup["dir"]
    prof = parse_profile(TOY_CHANNEL, where="toy_channel.yaml")
    data = SearchData(calibration=d / "calib.npz", evaluation=d / "eval.npz")
    with pytest.raises(mpsearch.InfeasibleBudgetError):
        mpsearch.search(d / "model.onnx", prof, data, _config("bops=0.9"))
    res = mpsearch.search(d / "model.onnx", prof, data, _config("bops=0.9", sparsity="channel"))
    lg = res.analysis.graph
    assert res.plan["expand"] == CHANNEL and res.chosen.fits
    assert all(c.sparsity is None for g, c in res.plan.items() if g != "expand")
    qm = res.qdq()
    kept = list(qm.kept_channels["expand"])
    assert len(kept) == 8
    cut = sorted(set(range(16)) - set(kept))
    masked = export_qdq(lg, res.plan, res.analysis.ranges, shrink=False)
    # the masked export: expand's pruned rows and bias, and the depthwise conv's, are zeros
    for model, rows in ((masked.model, 16), (qm.model, 8)):
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        for layer in ("expand", "depthwise"):
            node = next(n for n in model.graph.node if n.name == layer)
            w_dq, b_dq = producer[node.input[1]], producer[node.input[2]]
            q, s, zp = (inits[i] for i in w_dq.input)
            b = inits[b_dq.input[0]]
            assert q.shape[0] == s.size == zp.size == b.size == rows, layer
            if rows == 16:
                assert np.all(q[cut] == zp[cut].reshape(-1, 1, 1, 1)), layer
                assert np.all(b[cut] == 0), layer
        proj = next(n for n in model.graph.node if n.name == "project")
        assert inits[producer[proj.input[1]].input[0]].shape[1] == rows
    # the file is the physically smaller model, and it computes what the masked one does
    x = images(16, seed=2)
    d_act = make_session(_with_outputs(masked.model, ["d_act"])).run(["d_act"], {"x": x})[0]
    assert np.all(d_act[:, cut] == 0) and np.any(d_act[:, kept] != 0)
    small_q = make_session(qm.model).run(None, {"x": x})[0]
    masked_q = make_session(masked.model).run(None, {"x": x})[0]
    assert np.mean((small_q - masked_q) ** 2) <= 1e-6 * np.mean(masked_q**2)  # >= 60 dB

    def stored(m: onnx.ModelProto) -> int:
        return sum(int(np.prod(t.dims)) for t in m.graph.initializer)

    assert stored(masked.model) - stored(qm.model) >= 8 * 8 + 8 * 9 + 8 * 8  # rows, columns
    # and, in float, the masked model with those channels is the physically smaller one
    small = shrink_channels(lg, qm.kept_channels)
    assert [i.dims for i in small.model.graph.initializer if i.name.startswith("proj_w")] == \
        [[8, 8, 1, 1]]
    a = make_session(mask_channels(lg, qm.kept_channels)).run(None, {"x": x})[0]
    b = make_session(small.model).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert res.chosen.measured is not None and res.chosen.measured.sqnr_db > 5.0


@pytest.mark.parametrize("gating", ["exact", "gates"])
def test_gating_candidates_enter_the_search_and_the_budget_holds(setup, gating):
    """On the Snapdragon profile nothing below uniform int4 fits this model's size (0.599x)
    without pruning; the gate sweep offers expand (the one layer whose channels can go: the
    others meet the residual Add, a Concat, are depthwise or reach the logits) bit-widths with
    channel counts off the fixed 0.5/0.75 ladder, the solver picks one within the budget, and
    the exported file has that many channels."""
    d = setup["dir"]
    data = SearchData(calibration=d / "calib.npz", evaluation=d / "eval.npz")
    with pytest.raises(mpsearch.InfeasibleBudgetError, match="size=0.599"):
        mpsearch.search(d / "model.onnx", SNAPDRAGON, data, _config("size=0.52"))
    res = mpsearch.search(d / "model.onnx", SNAPDRAGON, data,
                          _config("size=0.52", gating=gating))
    assert set(res.gating.by_group) == {"expand"}
    offered = res.gating.by_group["expand"]
    assert offered and all(c.sparsity.pattern == "channel" and c.weight.bits in (4, 8, 16)
                           and (c.sparsity.density * 16).is_integer() for c in offered)
    assert any(c.sparsity.density not in (0.5, 0.75) for c in offered)
    assert all(("expand", c) in res.table.predicted for c in offered)
    chosen = res.plan["expand"]
    assert chosen in offered and res.chosen.fits
    assert res.chosen.cost.relative["weight_bytes"] <= 0.52 + 1e-9
    assert all(c.sparsity is None for g, c in res.plan.items() if g != "expand")
    qm = res.qdq()
    assert len(qm.kept_channels["expand"]) == round(16 * chosen.sparsity.density)
    expand = next(n for n in qm.model.graph.node if n.name == "expand")
    producer = {o: n for n in qm.model.graph.node for o in n.output}
    w = next(t for t in qm.model.graph.initializer
             if t.name == producer[expand.input[1]].input[0])
    assert w.dims[0] == len(qm.kept_channels["expand"])
    assert res.chosen.measured is not None and res.chosen.measured.sqnr_db > 10.0


def test_run_with_gating_writes_a_smaller_model_that_compiles_on_the_htp(setup, tmp_path):
    """`mpsearch run --gating exact` on the Snapdragon profile: plan.json records the sweep,
    the shipped model is the physically smaller one, and QNN places every node of it."""
    import json

    from mpsearch.cli.main import main

    d, out = setup["dir"], tmp_path / "run"
    code = main(["run", str(d / "model.onnx"), "--hw",
                 str(ROOT / "hw_profiles" / "snapdragon_8gen3.yaml"), "--data",
                 str(d / "calib.npz"), "--budget", "size=0.52", "--gating", "exact",
                 "--front-points", "0", "--refine", "1", "--no-cache", "-q", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "plan.json").read_text())
    assert doc["gating"]["search"] == "exact" and set(doc["gating"]["candidates"]) == {"expand"}
    expand = next(r for r in doc["layers"] if r["group"] == "expand")
    assert expand["candidate"] in doc["gating"]["candidates"]["expand"]
    kept = doc["exports"]["channel_pruning"]["kept"]["expand"]
    assert doc["exports"]["channel_pruning"]["exported"] == "smaller" and 0 < len(kept) < 16
    model = onnx.load(str(out / "model.qdq.onnx"))
    conv = next(n for n in model.graph.node if n.name == "expand")
    producer = {o: n for n in model.graph.node for o in n.output}
    w = next(t for t in model.graph.initializer if t.name == producer[conv.input[1]].input[0])
    assert w.dims[0] == len(kept)
    v = json.loads((out / "verify.json").read_text())
    assert v["fully_on_target"] and v["nodes"]["on_target"] == v["nodes"]["total"] > 0
    assert "gating candidates" in (out / "report.html").read_text()


def test_fp8_plan_with_pruned_channels_shrinks_past_its_rewritten_clips(setup):
    """fp8 exports rewrite each Clip on the route (export/qdq.py: fp8-safe bounds), so the
    shrink finds them under other names; they carry no channel constants and are passed."""
    a = setup["analysis"]
    fp8 = parse_candidate("fp8")
    plan = {g: parse_candidate("fp8+channel@0.5") if g == "expand" else fp8
            for g in a.graph.group_names}
    qm = quantize(a, plan)
    conv = next(n for n in qm.model.graph.node if n.name == "expand")
    producer = {o: n for n in qm.model.graph.node for o in n.output}
    w = next(t for t in qm.model.graph.initializer
             if t.name == producer[conv.input[1]].input[0])
    assert w.dims[0] == len(qm.kept_channels["expand"]) == 8
    x = images(4, seed=3)
    ref = make_session(setup["model"]).run(None, {"x": x})[0]
    assert _sqnr(ref, make_session(qm.model).run(None, {"x": x})[0]) > 5.0
