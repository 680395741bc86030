"""A QDQ model -> AIMET's quantization-encodings document, version 1.0.0.

The document is what Qualcomm's ``qnn-onnx-converter --quantization_overrides`` (and
``qairt-converter``) take beside the *float* model: one entry per tensor, keyed by the tensor's
name in the float graph, giving the integer grid the runtime must use. Facts it relies on, from
AIMET's own exporters (``aimet_onnx``/``aimet_torch`` ``AffineEncoding._to_1_0_0``,
``FloatEncoding.to_qnn_encoding_dict``):

- top level: ``version`` "1.0.0", ``activation_encodings`` and ``param_encodings`` (lists of
  entries, each with its ``name``), ``excluded_layers`` (list);
- an integer entry: ``dtype`` "INT", ``bw``, ``enc_type`` PER_TENSOR or PER_CHANNEL,
  ``is_sym``, ``scale`` and ``offset`` (lists, one value per channel);
- offsets are on the *unsigned* grid ``[0, 2^bw - 1]``: ``x = scale · (q_u + offset)``. With
  ONNX's ``x = scale · (q - zero_point)`` that is ``offset = -zero_point`` for unsigned types and
  ``offset = -zero_point - 2^(bw-1)`` for signed ones (a symmetric int8 weight: -128);
- ``is_sym`` is true exactly for signed grids with zero point 0; AIMET's reader takes
  ``is_sym`` as "signed", so an asymmetric signed tensor is written as its unsigned twin (the
  same real values);
- a float entry: ``dtype`` "FLOAT", ``bw`` 16 (or 32), ``enc_type`` PER_TENSOR, nothing else.

Everything is read from the QDQ model itself (see :func:`read_qdq`), so the document describes
exactly the file that was scored: activation ``Q -> DQ`` pairs, weight and constant
``DequantizeLinear`` nodes over integer initializers, int32 biases (bw 32, symmetric).
Names: :mod:`mpsearch.export.qdq` renames a producer's output ``t`` to ``t_prequant`` and gives
the dequantized value back the name ``t``; a tensor quantized at its consumers (a graph input,
the output of a float op) keeps its name on the ``QuantizeLinear`` input; a quantized
initializer ``w`` is stored as ``w_quantized``. ONNX Runtime's QDQ quantizer names things the
same way, so its models read back with the same keys. fp8 has no 1.0.0 encoding (and Qualcomm's
HTP rejects it), so an fp8 plan raises :class:`ExportError`.

Where one tensor is read in two formats (a u8 -> u16 conversion in a mixed A8/A16 graph) the
document can only give the tensor once: it gives the producer's format, and the converter adds
its own Convert op where a consumer needs another bitwidth.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from mpsearch.core.errors import ExportError
from mpsearch.core.formats import Format
from mpsearch.export.qdq import QdqModel

__all__ = ["ENCODING_VERSION", "Conversion", "QdqTensors", "TensorEncoding", "TensorRole",
           "encodings_document", "encodings_schema", "param_name", "read_qdq"]

log = logging.getLogger(__name__)

ENCODING_VERSION = "1.0.0"

# Integer element types a Q/DQ zero point may have: (bits, signed).
_INT_TYPES = {TensorProto.INT4: (4, True), TensorProto.UINT4: (4, False),
              TensorProto.INT8: (8, True), TensorProto.UINT8: (8, False),
              TensorProto.INT16: (16, True), TensorProto.UINT16: (16, False),
              TensorProto.INT32: (32, True)}
_FP8_TYPES = (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
              TensorProto.FLOAT8E5M2FNUZ)
_QUANT_SUFFIX = re.compile(r"_quantized(_\d+)?$")
_FP16_SUFFIX = re.compile(r"_fp16rounded(_\d+)?$")
# What a producer's output is renamed to when its Q/DQ gives the old name to the dequantized
# value: mpsearch's ``t_prequant``, ONNX Runtime's ``t_QuantizeLinear_Input``.
_RENAMED = re.compile(r"_(prequant|QuantizeLinear_Input)(_\d+)?")


class TensorRole(enum.Enum):
    ACTIVATION = "activation"
    PARAM = "param"


@dataclass(frozen=True, kw_only=True)
class TensorEncoding:
    """One quantized tensor as the file stores it: ``x = scale · (q - zero_point)``."""

    name: str  # the tensor's name in the float model
    role: TensorRole
    onnx_type: int  # element type of the integers (TensorProto.UINT8 ...)
    scale: np.ndarray  # float32, 0-D (per tensor) or 1-D (per channel)
    zero_point: np.ndarray  # int64, the shape of scale
    axis: int | None  # channel axis of a per-channel tensor

    @property
    def bits(self) -> int:
        return _INT_TYPES[self.onnx_type][0]

    @property
    def signed(self) -> bool:
        return _INT_TYPES[self.onnx_type][1]

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def same_grid(self, other: TensorEncoding) -> bool:
        return (self.onnx_type == other.onnx_type and self.axis == other.axis
                and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))


@dataclass(frozen=True, kw_only=True)
class Conversion:
    """A quantized tensor re-quantized for some consumers (``DQ_a -> Q_b -> DQ_b``)."""

    to: TensorEncoding  # name: the float tensor converted
    recv_nodes: tuple[str, ...]  # the nodes that read the converted value


@dataclass(frozen=True, kw_only=True)
class QdqTensors:
    """Every quantized tensor of a QDQ model, keyed by float tensor name."""

    activations: dict[str, TensorEncoding]
    params: dict[str, TensorEncoding]  # weights, constants, int32 biases
    conversions: tuple[Conversion, ...]
    fp16_params: tuple[str, ...]  # weights stored as fp16-rounded floats
    fp16_activations: tuple[str, ...]  # outputs of fp16 nodes (known from a QdqModel only)
    quantized_nodes: tuple[str, ...]  # nodes whose outputs are quantized where produced
    opset: int


def read_qdq(model: onnx.ModelProto | QdqModel) -> QdqTensors:
    """Read every Q/DQ of ``model`` back into float-name-keyed encodings (see module doc)."""
    qm = model if isinstance(model, QdqModel) else None
    proto = qm.model if qm is not None else model
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    acts: dict[str, TensorEncoding] = {}
    params: dict[str, TensorEncoding] = {}
    conversions: list[Conversion] = []
    dq_name: dict[str, str] = {}  # DQ output -> float name, for conversions
    graph_outputs = {o.name for o in g.output}
    quantized_nodes: set[str] = set()  # nodes whose own output is quantized

    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    # Pass 1: parameters and first-level activation pairs; pass 2: conversions (their source
    # is a DQ output whose float name pass 1 resolved).
    pending: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for dq in dqs:
        x = dq.input[0]
        if x in inits:
            enc = _encoding(param_name(x), TensorRole.PARAM, dq, inits,
                            inits[x].data_type)
            params[enc.name] = enc
            continue
        q = producer.get(x)
        if q is None or q.op_type != "QuantizeLinear":
            raise ExportError(f"DequantizeLinear '{dq.name}' reads '{x}', which is neither an "
                              "initializer nor a QuantizeLinear output",
                              fix="export the model with mpsearch or ONNX Runtime's QDQ format")
        src, dst = q.input[0], dq.output[0]
        src_node = producer.get(src)
        if src_node is not None and src_node.op_type == "DequantizeLinear":
            pending.append((q, dq))
            continue
        at_producer = dst in graph_outputs or bool(_RENAMED.fullmatch(src.removeprefix(dst)))
        name = dst if at_producer and src.startswith(dst) else src
        if at_producer and src_node is not None:
            quantized_nodes.add(src_node.name)
        enc = _encoding(name, TensorRole.ACTIVATION, dq, inits, _zp_type(q, inits))
        dq_name[dst] = name
        if name not in acts:
            acts[name] = enc
        elif not acts[name].same_grid(enc):  # a graph input read in two formats
            conversions.append(Conversion(to=enc, recv_nodes=_names(consumers.get(dst, []))))
    while pending:
        rest = []
        for q, dq in pending:
            src_dq = producer[q.input[0]]
            base = dq_name.get(src_dq.output[0])
            if base is None:
                rest.append((q, dq))
                continue
            dq_name[dq.output[0]] = base
            enc = _encoding(base, TensorRole.ACTIVATION, dq, inits, _zp_type(q, inits))
            conversions.append(Conversion(to=enc,
                                          recv_nodes=_names(consumers.get(dq.output[0], []))))
        if len(rest) == len(pending):
            raise ExportError(f"cannot trace the conversion '{rest[0][0].name}' back to a "
                              "quantized tensor", fix="report this as a bug with the model")
        pending = rest

    fp16_params = sorted({_FP16_SUFFIX.sub("", t) for t in inits
                          if _FP16_SUFFIX.search(t) and t in consumers})
    fp16_acts: list[str] = []
    if qm is not None:
        nodes = {n.name: n for n in g.node}
        for node_name, fmt in qm.node_formats.items():
            if fmt is Format.FP16 and node_name in nodes:
                fp16_acts.extend(o for o in nodes[node_name].output if o and o not in acts)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return QdqTensors(activations=acts, params=params, conversions=tuple(conversions),
                      fp16_params=tuple(fp16_params), fp16_activations=tuple(fp16_acts),
                      quantized_nodes=tuple(n.name for n in g.node if n.name in quantized_nodes),
                      opset=opset)


def param_name(initializer: str) -> str:
    """The float name of a quantized initializer (``w_quantized`` -> ``w``)."""
    return _QUANT_SUFFIX.sub("", initializer)


def _names(nodes: Iterable[onnx.NodeProto]) -> tuple[str, ...]:
    return tuple(sorted({n.name for n in nodes}))


def _zp_type(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    if len(q.input) > 2 and q.input[2] in inits:
        return inits[q.input[2]].data_type
    for a in q.attribute:
        if a.name == "output_dtype" and a.i:
            return a.i
    return TensorProto.UINT8  # ONNX's default when no zero point is given


def _encoding(name: str, role: TensorRole, dq: onnx.NodeProto,
              inits: dict[str, onnx.TensorProto], onnx_type: int) -> TensorEncoding:
    if onnx_type in _FP8_TYPES:
        raise ExportError(f"tensor '{name}' is quantized to fp8, which AIMET's encodings "
                          f"{ENCODING_VERSION} and ORT's tensor overrides cannot express",
                          fix="choose integer or fp16 formats for plans exported to QNN or ORT")
    if onnx_type not in _INT_TYPES:
        raise ExportError(f"tensor '{name}': unsupported quantized type "
                          f"{TensorProto.DataType.Name(onnx_type)}",
                          fix="use int4/int8/int16 or uint8/uint16 formats")
    if dq.input[1] not in inits:
        raise ExportError(f"DequantizeLinear '{dq.name}': the scale '{dq.input[1]}' is not an "
                          "initializer", fix="export scales as constants")
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    if len(dq.input) > 2 and dq.input[2] in inits:
        zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64)
    else:
        zp = np.zeros(scale.shape, np.int64)
    axis = None
    if scale.ndim == 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)  # ONNX default: 1
    elif scale.ndim > 1:
        raise ExportError(f"tensor '{name}' is block-quantized, which this export does not "
                          "write", fix="use per-channel or per-tensor quantization")
    return TensorEncoding(name=name, role=role, onnx_type=onnx_type, scale=scale,
                          zero_point=np.broadcast_to(zp, scale.shape).copy(), axis=axis)


def _entry(enc: TensorEncoding) -> dict:
    bits, signed = enc.bits, enc.signed
    shift = 2 ** (bits - 1) if signed else 0
    zp = enc.zero_point.reshape(-1)
    return {"name": enc.name, "dtype": "INT", "bw": bits,
            "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
            "is_sym": bool(signed and not zp.any()),
            "scale": [float(s) for s in enc.scale.reshape(-1)],
            "offset": [int(-z - shift) for z in zp]}


def _float_entry(name: str, bits: int = 16) -> dict:
    return {"name": name, "dtype": "FLOAT", "bw": bits, "enc_type": "PER_TENSOR"}


def encodings_document(model: onnx.ModelProto | QdqModel) -> dict:
    """AIMET encodings 1.0.0 of every quantized tensor of ``model`` (a QDQ model), keyed by
    float tensor name; JSON-able. Given a :class:`QdqModel`, fp16 node outputs are included
    as FLOAT 16 (a bare ModelProto cannot tell fp16 activations from fp32)."""
    t = read_qdq(model)
    acts = [_entry(e) for e in t.activations.values()]
    acts += [_float_entry(n) for n in t.fp16_activations]
    params = [_entry(e) for e in t.params.values()]
    params += [_float_entry(n) for n in t.fp16_params if n not in t.params]
    if t.conversions:
        log.info("%d conversion(s) between activation formats are left to the converter: %s",
                 len(t.conversions), ", ".join(sorted({c.to.name for c in t.conversions})))
    return {"version": ENCODING_VERSION,
            "activation_encodings": sorted(acts, key=lambda e: e["name"]),
            "param_encodings": sorted(params, key=lambda e: e["name"]),
            "excluded_layers": []}


def encodings_schema() -> dict:
    """The JSON Schema (draft 2020-12) of :func:`encodings_document`'s output."""
    from importlib.resources import files

    return json.loads(files("mpsearch.export").joinpath("encodings.schema.json").read_text())
