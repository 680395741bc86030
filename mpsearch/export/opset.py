"""The ONNX opset a QDQ export needs, and raising a model to it.

QuantizeLinear/DequantizeLinear take 8-bit types from opset 13, 4- and 16-bit types and fp8
from opset 21 (``FormatSpec.min_opset``). A model below what its plan's formats need is raised
with ONNX's version converter. A search exports the same model hundreds of times and the
converter takes 30-45 ms on EfficientNet-Lite0 (of a 70 ms export), so the last few
conversions are kept, by identity: the layer graph's model is never modified.
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from mpsearch.core.errors import ExportError
from mpsearch.core.formats import Format

__all__ = ["model_opset", "required_opset", "with_opset"]


def required_opset(fmts: set[Format]) -> int:
    return max([f.spec.min_opset for f in fmts] + [13])


def model_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


_CONVERTED: list[tuple[onnx.ModelProto, int, onnx.ModelProto]] = []  # the last few conversions


def with_opset(model: onnx.ModelProto, need: int | None) -> onnx.ModelProto:
    """A copy of ``model`` at opset ``need`` or its own, whichever is higher."""
    out = onnx.ModelProto()
    have = model_opset(model)
    if need is None or need <= have:
        out.CopyFrom(model)
        return out
    for src, at, converted in _CONVERTED:
        if src is model and at == need:
            out.CopyFrom(converted)
            return out
    out.CopyFrom(model)
    try:
        converted = version_converter.convert_version(out, need)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        raise ExportError(f"cannot raise the model's opset from {have} to {need}, which the "
                          f"formats need ({e})",
                          fix="export the model at opset 21 yourself, or avoid int4/int16/fp8 "
                              "formats") from e
    _CONVERTED.insert(0, (model, need, converted))
    del _CONVERTED[4:]
    out = onnx.ModelProto()
    out.CopyFrom(converted)
    return out
