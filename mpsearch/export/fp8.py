"""Clip and Relu in front of an fp8 QuantizeLinear, rewritten as the same function in Min/Max.

ONNX Runtime 1.32 mishandles both patterns for fp8 (:func:`fp8_safe_clips`); the exporter
(:mod:`mpsearch.export.qdq`) calls this on the nodes it writes. ``Writer``: anything with the
exporter's ``inits`` (the initializers being written) and ``unique(base)`` (a fresh name).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["fp8_safe_clips"]


class Writer(Protocol):
    inits: list[onnx.TensorProto]

    def unique(self, base: str) -> str: ...


_FP8_TYPES = (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2)


def fp8_safe_clips(nodes: list[onnx.NodeProto], w: Writer) -> list[onnx.NodeProto]:
    """Rewrite ``Clip(x, lo, hi)`` as ``Max(Min(x, hi), lo)`` and ``Relu(x)`` as ``Max(x, 0)``
    (identical functions) where the op's only consumer is an fp8 QuantizeLinear. ONNX Runtime
    1.32 mishandles both patterns for fp8: ClipQuantFusion throws "Unexpected data type for
    QuantizeLinear input y_zero_point of 17", and ReluQuantFusion deletes the Relu because an
    fp8 zero point of 0 looks like the bottom of an unsigned range (it is not: fp8 is signed,
    so negative values passed through and MNIST's fp8 accuracy fell from 97.5% to 88.6%)."""
    fp8_zp = {t.name for t in w.inits if t.data_type in _FP8_TYPES}
    uses: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    zero: str | None = None
    out: list[onnx.NodeProto] = []
    for n in nodes:
        users = uses.get(n.output[0], []) if n.op_type in ("Clip", "Relu") else []
        if not (len(users) == 1 and users[0].op_type == "QuantizeLinear"
                and len(users[0].input) > 2 and users[0].input[2] in fp8_zp):
            out.append(n)
            continue
        x = n.input[0]
        if n.op_type == "Relu":
            if zero is None:
                zero = w.unique("fp8_safe_relu_zero")
                w.inits.append(numpy_helper.from_array(np.float32(0.0), zero))
            lo, hi = zero, None
        else:
            lo = n.input[1] if len(n.input) > 1 and n.input[1] else None
            hi = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if not (lo or hi):
            out.append(n)
            continue
        if hi:
            mid = w.unique(f"{n.output[0]}_min") if lo else n.output[0]
            out.append(helper.make_node("Min", [x, hi], [mid], name=w.unique(f"{n.name}_min")))
            x = mid
        if lo:
            out.append(helper.make_node("Max", [x, lo], [n.output[0]],
                                        name=w.unique(f"{n.name}_max")))
    return out
