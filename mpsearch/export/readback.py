"""Read the formats back out of a QDQ model file: for every MAC layer, the type of its weight's
DequantizeLinear input and the type of the QuantizeLinear that quantizes its output (the
layer's activation format; a float layer's output has none, even when its input was a
dequantized tensor). Independent of how the file was written, so tests can check an export
against its plan."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from mpsearch.core.formats import Candidate, Format
from mpsearch.core.ops import OpRole, lookup
from mpsearch.graph.ingest import graph_index

__all__ = ["read_formats"]

_BY_TYPE = {f.spec.onnx_type: f for f in Format if f.spec.onnx_type is not None}


def read_formats(model: onnx.ModelProto) -> dict[str, Candidate]:
    """Layer node name -> Candidate as stored in ``model``.

    A weight without a DequantizeLinear is FP16 when every value is exactly an fp16 number,
    else FLOAT; an unquantized output reads as FLOAT (fp16 activations are left to the
    runtime, so the file cannot tell them from fp32)."""
    g = model.graph
    ix = graph_index(g)
    inits, producer, consumers = ix.inits, ix.producer, ix.consumers
    out: dict[str, Candidate] = {}
    for node in g.node:
        info = lookup(node.op_type, node.domain)
        if info is None or info.role is not OpRole.LAYER or len(node.input) < 2:
            continue
        w_src, x_src = producer.get(node.input[1]), producer.get(node.input[0])
        if node.input[1] in inits:
            arr = numpy_helper.to_array(inits[node.input[1]])
            if arr.dtype != np.float32:
                continue
            exact16 = np.array_equal(arr.astype(np.float16).astype(np.float32), arr)
            wf = Format.FP16 if exact16 else Format.FLOAT
        elif w_src is not None and w_src.op_type == "DequantizeLinear" \
                and w_src.input[0] in inits:
            wf = _BY_TYPE[inits[w_src.input[0]].data_type]
        elif x_src is not None and w_src is not None and w_src.op_type == "DequantizeLinear":
            wf = Format.FLOAT  # activation x activation MatMul: no weight
        else:
            continue
        af = Format.FLOAT
        qs = [c for c in consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"]
        if qs and len(qs[0].input) > 2 and qs[0].input[2] in inits:
            af = _BY_TYPE[inits[qs[0].input[2]].data_type]
        out[node.name] = Candidate(weight=wf, activation=af)
    return out
