"""A QDQ model -> ONNX Runtime ``TensorQuantOverrides`` that make ``quantize_static`` write it.

For users whose toolchain starts from ``onnxruntime.quantization.quantize_static``: the
overrides pin every tensor's type and exact scale/zero point, so ORT's own quantizer
reproduces mpsearch's plan on the float model (same Q/DQ types and scales per tensor; the
weight integers are ORT's round-to-nearest of the float weights at those scales).

File format (JSON, written by :func:`ort_overrides`)::

    {
      "format": "mpsearch-ort-overrides", "version": 1,
      "opset": 21,                      # opset the plan's Q/DQ types need (int4/16-bit: 21)
      "nodes_to_quantize": ["conv1", ...],   # pass to quantize_static
      "extra_options": {"QDQKeepRemovableActivations": true, ...},
      "TensorQuantOverrides": {
        "x":    [{"quant_type": "QUInt8", "scale": 0.0213, "zero_point": 117}],
        "relu": [{"quant_type": "QUInt8", "scale": 0.0106, "zero_point": 0,
                  "convert": {"quant_type": "QUInt16", "scale": 4.1e-05, "zero_point": 0,
                              "recv_nodes": ["conv2"]}}],
        "w1":   [{"quant_type": "QInt4", "axis": 0, "scale": 0.031, "zero_point": 0},
                 {"quant_type": "QInt4", "axis": 0, "scale": 0.027, "zero_point": 0}, ...]
      },
      "not_reproduced": [{"node": "fc", "reason": "..."}]
    }

``TensorQuantOverrides`` is ORT's documented extra option (tensor name -> list of dicts, one
dict per tensor or one per channel) with JSON values: ``quant_type`` is a ``QuantType`` member
name, scale and zero point plain numbers. :func:`quantize_static_kwargs` turns the document back
into ``quantize_static`` keyword arguments. Facts about ORT 1.2x/1.3x it relies on, each seen
here (docs/design.md §6):

- scale/zero-point overrides must be numpy arrays (0-d will do; ``QuantizationParams`` refuses
  numpy scalars, ``calc_quant_params`` calls ``.squeeze()``, scales must be float32), and
  ``recv_nodes`` a set (it is subtracted from one);
- a per-channel override needs ``axis`` in its first dict, else it is read as per tensor (an
  int4 weight silently loses its per-channel scales);
- only the first tensor in ``TensorQuantOverrides`` is validated, and the switch to
  ``com.microsoft`` Q/DQ (needed below opset 21 for 4- and 16-bit types) looks at that one
  only, so ``UseQDQContribOps`` is set here whenever such types appear below opset 21;
- conversions between activation formats (mixed A8/A16) are written as ``convert`` entries
  with their receiving nodes, the form ORT's ``MixedPrecisionTensorQuantOverridesFixer`` writes,
  taken from mpsearch's export so the fixer is not needed;
- Clip/Relu keep their own Q/DQ (``QDQKeepRemovableActivations``) and weight scales are not
  enlarged for int32 biases (``QDQDisableWeightAdjustForInt32Bias``: mpsearch already keeps the
  bias in range), both as in mpsearch's export.

Not expressible, listed under ``not_reproduced``: weight-only layers (``quantize_static``
always quantizes a quantized node's activations). Biases are left to ORT, which computes the
same int32 scale ``s_x · s_w``. Bias correction and Hessian rounding live in the weights, not
in the overrides: quantize the float model whose weights mpsearch scored for those.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from mpsearch.core.errors import ExportError
from mpsearch.export.encodings import TensorEncoding, param_name, read_qdq
from mpsearch.export.qdq import QdqModel

__all__ = ["OVERRIDES_FORMAT", "ort_overrides", "quantize_static_kwargs"]

log = logging.getLogger(__name__)

OVERRIDES_FORMAT = "mpsearch-ort-overrides"
_VERSION = 1
_QUANT_TYPE = {TensorProto.INT4: "QInt4", TensorProto.UINT4: "QUInt4",
               TensorProto.INT8: "QInt8", TensorProto.UINT8: "QUInt8",
               TensorProto.INT16: "QInt16", TensorProto.UINT16: "QUInt16"}
_OPSET21_TYPES = {"QInt4", "QUInt4", "QInt16", "QUInt16"}
_NP_TYPE = {"QInt4": np.int8, "QUInt4": np.uint8, "QInt8": np.int8, "QUInt8": np.uint8,
            "QInt16": np.int16, "QUInt16": np.uint16}
_FIXED_OPTIONS = {"QDQKeepRemovableActivations": True,
                  "QDQDisableWeightAdjustForInt32Bias": True}


def _qtype(enc: TensorEncoding) -> str:
    if enc.onnx_type not in _QUANT_TYPE:
        raise ExportError(f"tensor '{enc.name}': ORT's TensorQuantOverrides have no type for "
                          f"{TensorProto.DataType.Name(enc.onnx_type)}",
                          fix="use int4/int8/int16 or uint8/uint16 formats")
    return _QUANT_TYPE[enc.onnx_type]


def _per_tensor(enc: TensorEncoding) -> dict[str, Any]:
    return {"quant_type": _qtype(enc), "scale": float(enc.scale.reshape(-1)[0]),
            "zero_point": int(enc.zero_point.reshape(-1)[0])}


def _per_channel(enc: TensorEncoding) -> list[dict[str, Any]]:
    qt = _qtype(enc)
    return [{"quant_type": qt, "axis": int(enc.axis), "scale": float(s), "zero_point": int(z)}
            for s, z in zip(enc.scale.reshape(-1), enc.zero_point.reshape(-1), strict=True)]


def _weight_only(model: onnx.ModelProto,
                 quantized: set[str]) -> tuple[list[dict[str, str]], set[str]]:
    """Nodes with an integer weight but float activations, which quantize_static cannot
    write, and the names of those weights."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    skipped: list[dict[str, str]] = []
    dropped: set[str] = set()
    for n in g.node:
        if n.name in quantized or len(n.input) < 2 or n.op_type == "DequantizeLinear":
            continue
        w = producer.get(n.input[1])
        if w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits:
            dropped.add(param_name(w.input[0]))
            skipped.append({"node": n.name,
                            "reason": "integer weight with float activations (weight-only): "
                                      "quantize_static quantizes the activations of every "
                                      "node it quantizes, so this node is left float"})
    return skipped, dropped


def ort_overrides(model: onnx.ModelProto | QdqModel) -> dict:
    """The overrides document (module docstring) that reproduces the QDQ ``model``."""
    t = read_qdq(model)
    proto = model.model if isinstance(model, QdqModel) else model
    nodes = list(t.quantized_nodes)
    skipped, dropped = _weight_only(proto, set(nodes))
    overrides: dict[str, list[dict[str, Any]]] = {}
    for name, enc in t.activations.items():
        overrides[name] = [_per_tensor(enc)]
    for conv in t.conversions:
        entry = overrides[conv.to.name][0]
        if "convert" in entry:
            raise ExportError(f"tensor '{conv.to.name}' is read in three activation formats; "
                              "ORT's overrides allow one conversion per tensor",
                              fix="give the consumers of this tensor at most two formats")
        entry["convert"] = {**_per_tensor(conv.to), "recv_nodes": list(conv.recv_nodes)}
    for name, enc in t.params.items():
        if enc.onnx_type == TensorProto.INT32 or name in dropped:
            continue  # biases: ORT derives s_x · s_w itself
        overrides[name] = _per_channel(enc) if enc.per_channel else [_per_tensor(enc)]
    types = {e["quant_type"] for v in overrides.values() for e in v}
    types |= {e["convert"]["quant_type"] for v in overrides.values() for e in v
              if "convert" in e}
    return {"format": OVERRIDES_FORMAT, "version": _VERSION,
            "opset": max(t.opset, 21 if types & _OPSET21_TYPES else 13),
            "nodes_to_quantize": nodes,
            "extra_options": dict(_FIXED_OPTIONS),
            "TensorQuantOverrides": overrides,
            "not_reproduced": skipped}


def _np_values(entry: Mapping[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType

    out = dict(entry)
    qt = entry["quant_type"]
    out["quant_type"] = QuantType[qt]
    if "scale" in entry:
        out["scale"] = np.asarray(entry["scale"], dtype=np.float32)
        out["zero_point"] = np.asarray(entry["zero_point"], dtype=_NP_TYPE[qt])
    if "convert" in entry:
        conv = _np_values({k: v for k, v in entry["convert"].items() if k != "recv_nodes"})
        if "recv_nodes" in entry["convert"]:
            conv["recv_nodes"] = set(entry["convert"]["recv_nodes"])
        out["convert"] = conv
    return out


def quantize_static_kwargs(doc: Mapping[str, Any], *,
                           model_opset: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``onnxruntime.quantization.quantize_static`` from an overrides
    document; add ``model_input``, ``model_output`` and ``calibration_data_reader``.

    ``model_opset`` is the float model's opset: below the document's ``opset`` (4- or 16-bit
    types) the Q/DQ nodes go to ``com.microsoft`` (``UseQDQContribOps``); None assumes so."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    if doc.get("format") != OVERRIDES_FORMAT:
        raise ExportError(f"not an mpsearch ORT overrides document (format "
                          f"{doc.get('format')!r})", fix="pass the JSON that ort_overrides wrote")
    try:
        overrides = {name: [_np_values(e) for e in entries]
                     for name, entries in doc["TensorQuantOverrides"].items()}
    except KeyError as e:
        raise ExportError(f"overrides document: unknown or missing key {e}",
                          fix="regenerate the file with mpsearch") from e
    extra: dict[str, Any] = {**_FIXED_OPTIONS, **doc.get("extra_options", {}),
                             "TensorQuantOverrides": overrides}
    if int(doc.get("opset", 13)) >= 21 and (model_opset is None or model_opset < 21):
        extra["UseQDQContribOps"] = True
    return {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "per_channel": False,
            "calibrate_method": CalibrationMethod.MinMax,
            "nodes_to_quantize": list(doc["nodes_to_quantize"]), "extra_options": extra}
