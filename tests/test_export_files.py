"""The two side files of an export: AIMET encodings 1.0.0 (QNN's --quantization_overrides) and
ORT TensorQuantOverrides, checked against the QDQ model they describe and, for the overrides,
by letting ONNX Runtime's quantize_static rebuild the model from them."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import images, mbconv
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, quantize_static

from mpsearch import analyze, open_dataset, parse_candidate
from mpsearch.core.errors import ExportError
from mpsearch.core.formats import Candidate, Format
from mpsearch.export.encodings import encodings_document, encodings_schema
from mpsearch.export.overrides import ort_overrides, quantize_static_kwargs
from mpsearch.export.qdq import quantize
from mpsearch.graph.evaluate import sqnr_db
from mpsearch.quant.analysis import QuantizeOptions
from mpsearch.quant.layer import Rounding

X = images(32, seed=1)
_BITS = {TensorProto.INT4: (4, True), TensorProto.INT8: (8, True), TensorProto.UINT8: (8, False),
         TensorProto.INT16: (16, True), TensorProto.UINT16: (16, False),
         TensorProto.INT32: (32, True)}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    m = mbconv()
    np.savez(d / "calib.npz", x=X)
    # Round to nearest without bias correction: then quantize_static, which rounds the float
    # weights to nearest, must write mpsearch's integers too, not only its scales.
    opts = QuantizeOptions(rounding=Rounding.NEAREST, bias_correction=False)
    return analyze(m, open_dataset(d / "calib.npz", m, batch_size=16), options=opts)


def _mixed(a) -> dict[str, Candidate]:
    """int4 and int8 weights, uint8 and uint16 activations (so two conversions)."""
    plan = {g: parse_candidate("w8a8") for g in a.graph.group_names}
    plan["expand"] = parse_candidate("w4a16")
    plan["grouped"] = parse_candidate("w4a8")
    plan["fc"] = parse_candidate("w8a16")
    return plan


def _by_name(doc: dict) -> dict[str, dict]:
    entries = doc["activation_encodings"] + doc["param_encodings"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), "a tensor is listed twice"
    return {e["name"]: e for e in entries}


def _expected(model: onnx.ModelProto) -> dict[str, tuple[int, bool, list, list]]:
    """Independently of the exporter: float name -> (bits, signed, scale, zero point) of every
    Q/DQ pair and every integer initializer behind a DequantizeLinear. A conversion
    (Q reading a DQ output) is not a new tensor. Reads mpsearch's and ORT's naming."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = {}
    for dq in g.node:
        if dq.op_type != "DequantizeLinear":
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]]).reshape(-1).tolist()
        zp_t = inits[dq.input[2]]
        zp = numpy_helper.to_array(zp_t).astype(np.int64).reshape(-1).tolist()
        bits, signed = _BITS[zp_t.data_type]
        x = dq.input[0]
        if x in inits:
            assert x.endswith("_quantized")
            out[x.removesuffix("_quantized")] = (bits, signed, scale, zp)
            continue
        src = producer[x].input[0]
        if src in producer and producer[src].op_type == "DequantizeLinear":
            continue  # conversion
        renamed = (dq.output[0] + "_prequant",  # mpsearch's renamed producer output
                   dq.output[0] + "_QuantizeLinear_Input")  # ORT's
        name = dq.output[0] if src in renamed else src
        out.setdefault(name, (bits, signed, scale, zp))
    return out


@pytest.mark.parametrize("which", ["w8a8", "mixed"])
def test_encodings_validate_and_cover_every_quantized_tensor(cnn, which):
    a = cnn
    plan = _mixed(a) if which == "mixed" else {g: parse_candidate("w8a8")
                                               for g in a.graph.group_names}
    q = quantize(a, plan)
    doc = json.loads(json.dumps(encodings_document(q.model)))
    jsonschema.Draft202012Validator.check_schema(encodings_schema())
    jsonschema.validate(doc, encodings_schema(), cls=jsonschema.Draft202012Validator)
    got = _by_name(doc)
    expected = _expected(q.model)
    assert set(got) == set(expected)
    for name, (bits, signed, scale, zp) in expected.items():
        e = got[name]
        assert (e["dtype"], e["bw"]) == ("INT", bits), name
        assert e["scale"] == pytest.approx(scale, rel=0, abs=0), name
        # AIMET's offsets are on the unsigned grid: offset = -zp (- 2^(bw-1) when signed)
        assert e["offset"] == [-z - (2 ** (bits - 1) if signed else 0) for z in zp], name
        assert e["is_sym"] == (signed and not any(zp)), name
        assert e["enc_type"] == ("PER_CHANNEL" if len(scale) > 1 else "PER_TENSOR"), name
    # the formats are the plan's: weights, biases, activations at their producers' formats
    for layer, cand in plan.items():
        w = a.graph.layers[layer].weight
        assert got[w]["bw"] == cand.weight.bits and got[w]["is_sym"]
        assert got[a.graph.layers[layer].bias]["bw"] == 32
    for t, fmt in q.tensor_formats.items():
        assert got[t]["bw"] == fmt.bits and got[t]["is_sym"] == fmt.spec.signed
    if which == "mixed":
        assert got["exp_w"]["bw"] == 4 and got["exp_w"]["offset"] == [-8] * 16
        assert got["e"]["bw"] == 16 and got["s_act"]["bw"] == 8
        assert len(q.conversions) >= 2  # listed once, in the producer's format


def test_encoding_offsets_reproduce_the_dequantized_weights(cnn):
    # x = scale * (q_u + offset) on the unsigned grid must equal ONNX's scale * (q - zp)
    q = quantize(cnn, _mixed(cnn))
    got = _by_name(encodings_document(q.model))
    inits = {t.name: t for t in q.model.graph.initializer}
    for name in ("exp_w", "grp_w", "fc_w", "dw_w"):
        ints = numpy_helper.to_array(inits[f"{name}_quantized"]).astype(np.int64)
        s = numpy_helper.to_array(inits[f"{name}_scale"])
        zp = numpy_helper.to_array(inits[f"{name}_zero_point"]).astype(np.int64)
        shape = (-1,) + (1,) * (ints.ndim - 1)
        onnx_x = s.reshape(shape) * (ints - zp.reshape(shape))
        e = got[name]
        q_u = ints + 2 ** (e["bw"] - 1)  # signed weights on the unsigned grid
        aimet_x = (np.asarray(e["scale"], np.float32).reshape(shape)
                   * (q_u + np.asarray(e["offset"]).reshape(shape)))
        np.testing.assert_array_equal(aimet_x, onnx_x)


def test_fp16_layers_are_float16_entries_and_fp8_is_refused(cnn):
    plan = {g: parse_candidate("w8a8") for g in cnn.graph.group_names}
    plan["project"] = parse_candidate("fp16")
    q = quantize(cnn, plan)
    got = _by_name(encodings_document(q))
    for name in ("proj_w", "p"):
        assert got[name] == {"name": name, "dtype": "FLOAT", "bw": 16, "enc_type": "PER_TENSOR"}
    jsonschema.validate(encodings_document(q), encodings_schema())
    with pytest.raises(ExportError, match="fp8"):
        encodings_document(quantize(cnn, parse_candidate("fp8")).model)


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self._it = iter([{"x": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def _ort_rebuild(a, q, tmp_path) -> tuple[onnx.ModelProto, dict]:
    doc = json.loads(json.dumps(ort_overrides(q)))  # through JSON, as a user would read it
    src, dst = tmp_path / "float.onnx", tmp_path / "ort_qdq.onnx"
    onnx.save(a.graph.model, src)  # the float model the export started from
    quantize_static(str(src), str(dst), _Reader(X[:4]),
                    **quantize_static_kwargs(doc, model_opset=17))
    return onnx.load(dst), doc


@pytest.mark.parametrize("which", ["w8a8", "mixed"])
def test_ort_overrides_rebuild_the_same_qdq_model(cnn, which, tmp_path):
    a = cnn
    plan = _mixed(a) if which == "mixed" else {g: parse_candidate("w8a8")
                                               for g in a.graph.group_names}
    q = quantize(a, plan)
    rebuilt, doc = _ort_rebuild(a, q, tmp_path)
    assert doc["not_reproduced"] == []
    mine, theirs = _expected(q.model), _expected(rebuilt)
    assert set(mine) == set(theirs)
    for name, (bits, signed, scale, zp) in mine.items():
        assert theirs[name] == (bits, signed, scale, zp), name  # types, scales, zero points
    # conversions: the same tensors re-quantized to the same types for the same consumers
    ours = {(t, f.spec.onnx_type) for t, _, f in q.conversions}
    assert ours == _conversions(rebuilt)
    # the same integer weights, except where mpsearch's symmetric grid ends at -qmax and
    # ORT, given explicit scales, rounds to -qmax - 1 (docs/exports.md)
    ints = {TensorProto.INT8, TensorProto.INT4, TensorProto.INT16}
    theirs_w = {t.name: numpy_helper.to_array(t) for t in rebuilt.graph.initializer
                if t.data_type in ints and t.name.endswith("_quantized")}
    for t in q.model.graph.initializer:
        if t.name in theirs_w:
            a, b = numpy_helper.to_array(t).astype(np.int64), theirs_w[t.name].astype(np.int64)
            d = a != b
            assert np.all((b[d] == a[d] - 1) & (a[d] == a.min())), t.name
    mine_inits = {x.name: x for x in q.model.graph.initializer}
    for t in rebuilt.graph.initializer:  # that one difference undone: the same model
        if t.name in theirs_w and t.name in mine_inits:
            t.CopyFrom(mine_inits[t.name])
    # it runs, and computes what mpsearch's export computes (same integers, same grids)
    feed = {"x": X[:8]}
    ref = ort.InferenceSession(q.model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feed)[0]
    out = ort.InferenceSession(rebuilt.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feed)[0]
    err = float(((ref.astype(np.float64) - out) ** 2).sum())
    assert sqnr_db(float((ref.astype(np.float64) ** 2).sum()), err) > 60


def _conversions(model: onnx.ModelProto) -> set[tuple[str, int]]:
    """(float tensor, converted type) of every Q that reads a DequantizeLinear output."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    out = set()
    for n in g.node:
        p = producer.get(n.input[0])
        if n.op_type == "QuantizeLinear" and p is not None and p.op_type == "DequantizeLinear":
            first_q = producer[p.input[0]]
            base = first_q.input[0]
            base = base.removesuffix("_prequant").removesuffix("_QuantizeLinear_Input")
            out.add((base, inits[n.input[2]].data_type))
    return out


def test_int4_overrides_are_per_channel_with_axis(cnn):
    doc = ort_overrides(quantize(cnn, _mixed(cnn)))
    exp_w = doc["TensorQuantOverrides"]["exp_w"]
    assert len(exp_w) == 16 and all(e["axis"] == 0 and e["quant_type"] == "QInt4"
                                    for e in exp_w)
    assert doc["opset"] == 21
    kw = quantize_static_kwargs(doc, model_opset=17)
    first = kw["extra_options"]["TensorQuantOverrides"]["exp_w"][0]
    assert isinstance(first["scale"], np.ndarray) and first["scale"].dtype == np.float32
    assert kw["extra_options"]["UseQDQContribOps"] is True
    assert "UseQDQContribOps" not in quantize_static_kwargs(doc, model_opset=21)["extra_options"]


def test_weight_only_layer_is_reported_not_reproduced(cnn, tmp_path):
    plan = {g: parse_candidate("w8a8") for g in cnn.graph.group_names}
    plan["depthwise"] = Candidate(weight=Format.INT4, activation=Format.FLOAT)
    q = quantize(cnn, plan)
    rebuilt, doc = _ort_rebuild(cnn, q, tmp_path)
    assert [r["node"] for r in doc["not_reproduced"]] == ["depthwise"]
    assert "dw_w" not in doc["TensorQuantOverrides"]
    mine, theirs = _expected(q.model), _expected(rebuilt)
    assert set(mine) - set(theirs) == {"dw_w"}
    assert all(theirs[k] == mine[k] for k in theirs)


def test_a_foreign_document_is_refused():
    with pytest.raises(ExportError, match="not an mpsearch"):
        quantize_static_kwargs({"x": [{"quant_type": "QUInt8"}]})
