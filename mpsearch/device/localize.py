"""Where the device stops computing what the CPU computes: the first disagreeing tensor.

A QDQ model that compiles whole on the HTP can still disagree with ONNX Runtime's CPU EP (a
PaddleOCR text detector: 3.2 dB on its output). To say where, every quantized activation (the
output of each activation ``QuantizeLinear -> DequantizeLinear`` pair) becomes an extra graph
output; the probe model runs on one sample on both targets, and each probe is scored by its
SQNR against the CPU. In topological order, the first probe below the threshold is where the
error enters: the op that produces its ``QuantizeLinear``'s input is the culprit, the probes it
reads agree (or it reads none). Exposing a tensor as an output cannot change what the ops
before it compute, only where the compiler may fuse, so a culprit found this way is an op whose
quantized result the HTP computes differently. Where every quantized tensor agrees, the outputs
of the ops left in float are compared the same way (the HTP computes them in fp16: a Log of a
power spectrum of int16-scale audio, ~1e10, overflows there); the first that disagrees is the
culprit, in format ``float``. Written here: no library localises across two execution
providers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from mpsearch.data.dataset import open_dataset

__all__ = ["Culprit", "ProbeAgreement", "float_probes", "localize", "probe_tensors"]

log = logging.getLogger(__name__)

_ZP_FORMAT = {TensorProto.UINT8: "uint8", TensorProto.UINT16: "uint16",
              TensorProto.INT8: "int8", TensorProto.INT16: "int16"}


@dataclass(frozen=True, kw_only=True)
class ProbeAgreement:
    tensor: str
    sqnr_db: float


@dataclass(frozen=True, kw_only=True)
class Culprit:
    """The first quantized tensor the device gets wrong, and the op that makes it."""

    tensor: str  # the dequantized tensor compared (a probe)
    source: str  # the float tensor its QuantizeLinear reads
    sqnr_db: float
    node: str | None  # None: a graph input's quantizer
    op_type: str | None
    activation_format: str | None  # the format of the tensor (its QuantizeLinear's type)
    inputs: tuple[ProbeAgreement, ...]  # the probes the op reads, all in agreement
    probes: int  # how many tensors were compared

    def describe(self) -> str:
        op = f"{self.op_type} node '{self.node}'" if self.node else "a graph input"
        fmt = f" in {self.activation_format}" if self.activation_format else ""
        return (f"{op} computes '{self.tensor}'{fmt} differently on the device: "
                f"{self.sqnr_db:.1f} dB against the CPU, where its inputs agree")

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "source": self.source,
                "sqnr_db": round(self.sqnr_db, 3), "node": self.node,
                "op_type": self.op_type, "activation_format": self.activation_format,
                "inputs": [{"tensor": p.tensor, "sqnr_db": round(p.sqnr_db, 3)}
                           for p in self.inputs],
                "probes": self.probes, "description": self.describe()}


def probe_tensors(model: onnx.ModelProto) -> list[str]:
    """The quantized activations of a QDQ model, in node order: each activation DQ's output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                out.append(n.output[0])
    return out


def float_probes(model: onnx.ModelProto) -> list[str]:
    """The float outputs of the ops left in float (not Q/DQ, not read by a QuantizeLinear), in
    node order."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types |= {v.name: v.type.tensor_type.elem_type for v in model.graph.output}
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    return [o for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            for o in n.output if o and types.get(o) == TensorProto.FLOAT
            and "QuantizeLinear" not in readers.get(o, ())]


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    r, g = ref.astype(np.float64), got.astype(np.float64)
    if not np.isfinite(g).all() and np.isfinite(r).all():  # inf/nan where the CPU has none
        return -math.inf
    noise = float(np.mean((r - g) ** 2)) if r.size else 0.0
    signal = float(np.mean(r ** 2)) if r.size else 0.0
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def localize(model: onnx.ModelProto | str | os.PathLike[str], *,
             data: str | os.PathLike[str], soc_model: int, min_sqnr_db: float,
             sample_axes: Mapping[str, int | None] | None = None) -> Culprit | None:
    """The first quantized tensor of ``model`` (static shapes, as shipped) whose value on the
    HTP agrees with the CPU EP below ``min_sqnr_db`` on the first sample of ``data``; None when
    every probe agrees or the probe model does not compile. Then the first float op output that
    disagrees (module docstring)."""
    from mpsearch.device.qnn import open_on_htp
    from mpsearch.graph.calibrate import make_session

    m = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike, Path)) else model
    m = onnx.ModelProto.FromString(m.SerializeToString())
    quantized, floats = probe_tensors(m), float_probes(m)
    probes = quantized + floats
    known = {o.name for o in m.graph.output}
    for p in probes:
        if p not in known:
            m.graph.output.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, None))
    result, htp = open_on_htp(m, soc_model=soc_model)
    if htp is None:
        log.info("the probe model does not compile (%s): no culprit", result.reason)
        return None
    dataset = open_dataset(data, m, batch_size=1, name="localization", sample_axes=sample_axes)
    feed = next(dataset.batches(1))
    feeds = {i.name for i in htp.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in feeds}
    on_htp = dict(zip(probes, htp.run(probes, feed), strict=True))
    on_cpu = dict(zip(probes, make_session(m).run(probes, feed), strict=True))
    scores = {p: _sqnr(on_cpu[p], on_htp[p]) for p in probes}
    producer = {o: n for n in m.graph.node for o in n.output}
    for p in quantized:  # node order is topological
        if scores[p] >= min_sqnr_db:
            continue
        q = producer[producer[p].input[0]]
        op = producer.get(q.input[0])
        reads = []
        if op is not None:
            for i in op.input:
                src = i
                if src in scores:
                    reads.append(ProbeAgreement(tensor=src, sqnr_db=scores[src]))
        zp = next((t for t in m.graph.initializer if len(q.input) > 2 and t.name == q.input[2]),
                  None)
        return Culprit(tensor=p, source=q.input[0], sqnr_db=scores[p],
                       node=op.name if op is not None else None,
                       op_type=op.op_type if op is not None else None,
                       activation_format=_ZP_FORMAT.get(zp.data_type) if zp else None,
                       inputs=tuple(reads), probes=len(probes))
    for p in floats:  # every quantized tensor agrees: the first float op that does not
        if scores[p] >= min_sqnr_db:
            continue
        op = producer[p]
        return Culprit(tensor=p, source=p, sqnr_db=scores[p], node=op.name, op_type=op.op_type,
                       activation_format="float",
                       inputs=tuple(ProbeAgreement(tensor=i, sqnr_db=scores[i])
                                    for i in op.input if i in scores), probes=len(probes))
    return None
