"""A QDQ model in the form ONNX Runtime's CPU EP runs fastest, computing what it computes, for
measuring plans.

ORT fuses ``DequantizeLinear -> Conv/Gemm/MatMul -> QuantizeLinear`` into one integer kernel
only where the weights and both activations are 8-bit. Elsewhere (int4 weights, 16-bit
activations) it runs the float op on weights dequantized at every run: no pre-packed weights,
no NCHWc layout, the generic depthwise path. On EfficientNet-Lite0, one thread, batch 8: uniform
w4a8 takes 22.6 ms per image and w8a16 23.8, against 3.0 for w8a8, and a mixed plan with a
third of its layers in w4a8 6.8. :func:`folded` dequantizes the weights (and int32 biases) of
exactly those ops once, into float initializers: ``(q - z) · s`` in float32, which is what
``DequantizeLinear`` computes, bit for bit. The same models then take 12.7 and 14.0 ms.

ORT's ``WeightBiasQuantization`` pass would quantize such float weights between quantized
activations again (to int8, per tensor: 30.2 dB became 3.7 on w8a16), so it is off for the
folded form (:data:`DISABLED`). For the same reason a model that already has a float-weight op
between quantized activations is not folded: ORT's pass applies to it as shipped, and its
measurement must see that. The folded model's outputs differ from the model's by the float
summation order of those ops alone (where an 8-bit ``QuantizeLinear`` follows, a value on a
rounding boundary may land one step away): on uniform w4a8 EfficientNet-Lite0, 5.222 against
5.217 dB, and 30.2147 against 30.2143 dB on w8a16.

Plain ONNX protobuf edits: ORT's own optimizer keeps these ``DequantizeLinear`` nodes on
purpose (they are how it recognises fusable patterns), and there is no option to fold some.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from mpsearch.graph.calibrate import make_session
from mpsearch.graph.ingest import graph_index, names_used

__all__ = ["DISABLED", "folded", "measuring_session", "requantized_by_ort"]

DISABLED = ("WeightBiasQuantization",)  # ORT passes off for a folded model (docstring)

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_EIGHT_BIT = (TensorProto.INT8, TensorProto.UINT8)


def _zero_point_type(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    """The integer type a DequantizeLinear reads (its zero point's; uint8 without one)."""
    if len(dq.input) > 2 and dq.input[2] in inits:
        return inits[dq.input[2]].data_type
    if dq.input[0] in inits:
        return inits[dq.input[0]].data_type
    return TensorProto.UINT8


def _dequantized(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """``DequantizeLinear`` of initializers, in float32 as ORT computes it."""
    q = numpy_helper.to_array(inits[dq.input[0]])
    s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    z = (numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2]
         else np.zeros(s.shape, np.int32))
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if s.ndim == 1 and s.size > 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    diff = q.astype(np.int64) - z.astype(np.int64)
    return (diff.astype(np.float32) * s).astype(np.float32)


def folded(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` with the weights and biases of the ops ORT would not fuse dequantized into
    float initializers (module docstring), or None where nothing is to fold, or where the model
    has a float-weight op between quantized activations, or a weight it cannot read."""
    g = model.graph
    if any(a.name == "block_size" and a.i or a.type in (onnx.AttributeProto.GRAPH,
                                                         onnx.AttributeProto.GRAPHS)
           for n in g.node for a in n.attribute):
        return None  # blocked quantization, or subgraphs: left as they are
    index = graph_index(g)
    inits, producer, consumers = index.inits, index.producer, index.consumers

    def const_dq(name: str) -> onnx.NodeProto | None:
        n = producer.get(name)
        if n is not None and n.op_type == "DequantizeLinear" and all(
                i in inits for i in n.input if i):
            return n
        return None

    fold: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        if n.op_type not in _WEIGHTED or len(n.input) < 2:
            continue
        src = producer.get(n.input[0])
        quantized_in = src is not None and src.op_type == "DequantizeLinear"
        w = const_dq(n.input[1])
        if w is None:
            if n.input[1] in inits and quantized_in:
                return None  # ORT's WeightBiasQuantization acts on this one as shipped
            continue
        outs = consumers.get(n.output[0], [])
        fused = (_zero_point_type(w, inits) in _EIGHT_BIT and quantized_in
                 and _zero_point_type(src, inits) in _EIGHT_BIT
                 and len(outs) == 1 and outs[0].op_type == "QuantizeLinear"
                 and _zero_point_type(outs[0], inits) in _EIGHT_BIT)
        if fused:
            continue
        fold[w.output[0]] = w
        b = const_dq(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if b is not None:
            fold[b.output[0]] = b
    if not fold:
        return None
    try:
        arrays = {name: _dequantized(dq, inits) for name, dq in fold.items()}
    except (ValueError, TypeError):
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [n for n in g.node
            if not (n.op_type == "DequantizeLinear" and n.output[0] in fold)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    used = names_used(out.graph)
    left = [t for t in g.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(left)
    out.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in arrays.items())
    return out


def measuring_session(model: onnx.ModelProto, *, threads: int = 0) -> ort.InferenceSession:
    """A CPU EP session computing what ``model``'s does, in its :func:`folded` form where it
    has one."""
    fast = folded(model)
    if fast is None:
        return make_session(model, threads=threads)
    return make_session(fast, threads=threads, disabled_optimizers=DISABLED)


def requantized_by_ort(model: onnx.ModelProto) -> list[str]:
    """The ops of ``model`` with float weights that read a quantized activation: ORT's
    ``WeightBiasQuantization`` (on by default) quantizes their weights to int8 per tensor on
    the CPU EP when their output is quantized again (through a fused activation too), so a
    layer a plan keeps float does not run float there (module docstring)."""
    index = graph_index(model.graph)
    out = []
    for n in model.graph.node:
        if n.op_type not in _WEIGHTED or len(n.input) < 2 or n.input[1] not in index.inits:
            continue
        if index.inits[n.input[1]].data_type != TensorProto.FLOAT:
            continue
        src = index.producer.get(n.input[0])
        if src is not None and src.op_type == "DequantizeLinear":
            out.append(n.name)
    return out
