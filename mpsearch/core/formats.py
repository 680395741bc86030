"""Number formats and their fake-quantizers in numpy.

Integer formats use the affine map of ONNX ``QuantizeLinear``:
``q = saturate(round_half_even(x / s) + z)``, ``x̂ = (q - z) · s``. Weights are symmetric
(``z = 0``) and per output channel; activations are per tensor, asymmetric for unsigned and
symmetric for signed formats (the white paper's recommendation, Nagel et al. 2021, §2-3).
Signed symmetric grids are restricted to ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` so that they stay
symmetric (what QNN and ORT expect of weights).

FP8 formats (E4M3FN, E5M2; van Baalen et al. 2023) are scaled: ``x̂ = s · fp8(x / s)`` with
``s = amax / max_fp8`` so the range fills the format; rounding is round-to-nearest-even with
saturation, as in ONNX ``QuantizeLinear`` with ``saturate=1``. FP16 is a plain cast.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto

from mpsearch.core.errors import UsageError

__all__ = [
    "Candidate",
    "Format",
    "FormatKind",
    "fake_quant",
    "parse_candidate",
    "quantize",
    "UNIFORM_CANDIDATES",
]


class FormatKind(enum.Enum):
    INT = "int"  # affine integer grid with a scale and zero point
    FP8 = "fp8"  # scaled 8-bit float
    FLOAT = "float"  # kept in floating point (fp32 or fp16), no Q/DQ


@dataclass(frozen=True, kw_only=True)
class FormatSpec:
    name: str
    kind: FormatKind
    bits: int
    signed: bool
    onnx_type: int | None  # element type of the quantized tensor in ONNX, None for float
    min_opset: int  # lowest default-domain opset whose Q/DQ take this type

    @property
    def qmin(self) -> int:
        if self.kind is not FormatKind.INT:
            raise ValueError(f"{self.name} has no integer grid")
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        if self.kind is not FormatKind.INT:
            raise ValueError(f"{self.name} has no integer grid")
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def weight_qmin(self) -> int:
        """The lowest value of a symmetric weight grid: ``-qmax`` for signed formats (int8
        weights in [-127, 127], as ONNX Runtime's and Qualcomm's quantizers write them: QNN's
        HTP computes a weight of -128 wrongly, tests/test_verify.py), else ``qmin``."""
        return -self.qmax if self.signed else self.qmin

    @property
    def levels(self) -> int:
        return 2**self.bits


class Format(enum.Enum):
    """Every number format mpsearch can assign to a weight or an activation."""

    INT4 = FormatSpec(name="int4", kind=FormatKind.INT, bits=4, signed=True,
                      onnx_type=TensorProto.INT4, min_opset=21)
    UINT4 = FormatSpec(name="uint4", kind=FormatKind.INT, bits=4, signed=False,
                       onnx_type=TensorProto.UINT4, min_opset=21)
    INT8 = FormatSpec(name="int8", kind=FormatKind.INT, bits=8, signed=True,
                      onnx_type=TensorProto.INT8, min_opset=13)
    UINT8 = FormatSpec(name="uint8", kind=FormatKind.INT, bits=8, signed=False,
                       onnx_type=TensorProto.UINT8, min_opset=13)
    INT16 = FormatSpec(name="int16", kind=FormatKind.INT, bits=16, signed=True,
                       onnx_type=TensorProto.INT16, min_opset=21)
    UINT16 = FormatSpec(name="uint16", kind=FormatKind.INT, bits=16, signed=False,
                        onnx_type=TensorProto.UINT16, min_opset=21)
    FP8_E4M3 = FormatSpec(name="fp8e4m3", kind=FormatKind.FP8, bits=8, signed=True,
                          onnx_type=TensorProto.FLOAT8E4M3FN, min_opset=19)
    FP8_E5M2 = FormatSpec(name="fp8e5m2", kind=FormatKind.FP8, bits=8, signed=True,
                          onnx_type=TensorProto.FLOAT8E5M2, min_opset=19)
    FP16 = FormatSpec(name="fp16", kind=FormatKind.FLOAT, bits=16, signed=True,
                      onnx_type=None, min_opset=1)
    FLOAT = FormatSpec(name="float", kind=FormatKind.FLOAT, bits=32, signed=True,
                       onnx_type=None, min_opset=1)

    @property
    def spec(self) -> FormatSpec:
        return self.value

    @property
    def bits(self) -> int:
        return self.value.bits

    @property
    def is_quantized(self) -> bool:
        """True when the format is written as Q/DQ nodes (integer or fp8)."""
        return self.value.kind is not FormatKind.FLOAT

    @classmethod
    def from_name(cls, name: str) -> Format:
        key = name.strip().lower().replace("_", "").replace("-", "")
        aliases = {"fp8": "fp8e4m3", "fp8e4m3fn": "fp8e4m3", "fp32": "float", "float32": "float",
                   "float16": "fp16"}
        key = aliases.get(key, key)
        for fmt in cls:
            if fmt.value.name == key:
                return fmt
        known = ", ".join(f.value.name for f in cls)
        raise UsageError(f"unknown number format '{name}'", fix=f"use one of: {known}")

    def __str__(self) -> str:
        return self.value.name


_FP8_DTYPES = {Format.FP8_E4M3: ml_dtypes.float8_e4m3fn, Format.FP8_E5M2: ml_dtypes.float8_e5m2}


def fp8_max(fmt: Format) -> float:
    return float(ml_dtypes.finfo(_FP8_DTYPES[fmt]).max)


def numpy_storage_dtype(fmt: Format) -> np.dtype:
    """The numpy dtype that holds quantized values of ``fmt`` (int4 is held in int8)."""
    spec = fmt.spec
    if spec.kind is FormatKind.FP8:
        return np.dtype(_FP8_DTYPES[fmt])
    if spec.kind is FormatKind.FLOAT:
        return np.dtype(np.float16 if fmt is Format.FP16 else np.float32)
    if spec.bits <= 8:
        return np.dtype(np.int8 if spec.signed else np.uint8)
    return np.dtype(np.int16 if spec.signed else np.uint16)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param, dtype=np.float32)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = param.size
    return param.reshape(shape)


def quantize(x: np.ndarray, fmt: Format, scale: np.ndarray, zero_point: np.ndarray | int = 0,
             *, axis: int | None = None, weight: bool = False) -> np.ndarray:
    """Quantize ``x`` to the storage values of ``fmt`` (integers, or fp8 values). ``weight``:
    onto the symmetric weight grid (``FormatSpec.weight_qmin`` to ``qmax``)."""
    x = np.asarray(x, dtype=np.float32)
    s = _broadcast(scale, x.ndim, axis)
    spec = fmt.spec
    if spec.kind is FormatKind.INT:
        z = _broadcast(np.asarray(zero_point), x.ndim, axis)
        q = np.rint(x / s) + z  # np.rint rounds half to even, as QuantizeLinear does
        low = spec.weight_qmin if weight else spec.qmin
        return np.clip(q, low, spec.qmax).astype(numpy_storage_dtype(fmt))
    if spec.kind is FormatKind.FP8:
        m = fp8_max(fmt)
        return np.clip(x / s, -m, m).astype(_FP8_DTYPES[fmt])
    raise ValueError(f"{fmt} is not a quantized format")


def dequantize(q: np.ndarray, fmt: Format, scale: np.ndarray, zero_point: np.ndarray | int = 0,
               *, axis: int | None = None) -> np.ndarray:
    s = _broadcast(scale, q.ndim, axis)
    if fmt.spec.kind is FormatKind.INT:
        z = _broadcast(np.asarray(zero_point), q.ndim, axis)
        return ((q.astype(np.float32) - z) * s).astype(np.float32)
    return (q.astype(np.float32) * s).astype(np.float32)


def fake_quant(x: np.ndarray, fmt: Format, scale: np.ndarray | None = None,
               zero_point: np.ndarray | int = 0, *, axis: int | None = None,
               weight: bool = False) -> np.ndarray:
    """Quantize and dequantize ``x``: what the model computes with after Q/DQ (``weight``: on
    the symmetric weight grid, as :func:`quantize`)."""
    if fmt is Format.FLOAT:
        return np.asarray(x, dtype=np.float32)
    if fmt is Format.FP16:
        with np.errstate(over="ignore"):  # beyond 65504 fp16 is inf, as the hardware's
            return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
    if scale is None:
        raise ValueError(f"{fmt} needs a scale")
    return dequantize(quantize(x, fmt, scale, zero_point, axis=axis, weight=weight), fmt,
                      scale, zero_point, axis=axis)


@dataclass(frozen=True, kw_only=True)
class Sparsity:
    """Which weights are kept: a pattern and the fraction of weights it keeps."""

    pattern: str  # "2:4" (two of every four along the input), "unstructured", "channel"
    density: float

    @property
    def name(self) -> str:
        return "2:4" if self.pattern == "2:4" else f"{self.pattern}@{self.density:g}"


SPARSITY_PATTERNS = ("2:4", "unstructured", "channel")


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One decision for a quantizer group: weight format, activation format, sparsity."""

    weight: Format
    activation: Format
    sparsity: Sparsity | None = None

    @property
    def name(self) -> str:
        base = self._base_name()
        return base if self.sparsity is None else f"{base}+{self.sparsity.name}"

    def _base_name(self) -> str:
        w, a = self.weight, self.activation
        if w is a and w.spec.kind is not FormatKind.INT:
            return str(w) if w is not Format.FP8_E4M3 else "fp8"
        if (w.spec.kind is FormatKind.INT and w.spec.signed
                and a.spec.kind is FormatKind.INT and not a.spec.signed):
            return f"w{w.bits}a{a.bits}"  # the short form parse_candidate reads back
        return f"w:{w}/a:{a}"

    @property
    def is_float(self) -> bool:
        return not self.weight.is_quantized and not self.activation.is_quantized

    def __str__(self) -> str:
        return self.name


def _int_act(bits: int) -> Format:
    return {8: Format.UINT8, 16: Format.UINT16}[bits]


def _int_weight(bits: int) -> Format:
    return {4: Format.INT4, 8: Format.INT8, 16: Format.INT16}[bits]


def _parse_sparsity(text: str, whole: str) -> Sparsity:
    if text == "2:4":
        return Sparsity(pattern="2:4", density=0.5)
    m = re.fullmatch(r"(unstructured|channel)@(0?\.\d+|1(?:\.0*)?)", text)
    if not m or not 0 < float(m.group(2)) <= 1:
        raise UsageError(f"cannot read the sparsity of candidate '{whole}'",
                         fix="write +2:4, +unstructured@0.5 or +channel@0.75 (density kept)")
    return Sparsity(pattern=m.group(1), density=float(m.group(2)))


def parse_candidate(text: str) -> Candidate:
    """Parse ``w8a8``, ``w4a16``, ``w16a16``, ``fp16``, ``fp8`` (e4m3), ``fp8e5m2``, ``float``
    or the explicit ``w:int8/a:int8`` form into a :class:`Candidate`, optionally followed by a
    sparsity: ``w8a8+2:4``, ``w4a8+unstructured@0.5``, ``w8a8+channel@0.75`` (the density
    kept).

    In the short ``wXaY`` form weights are signed symmetric and activations unsigned (uint8,
    uint16), the formats Qualcomm's HTP and ORT's CPU kernels are built around.
    """
    base, plus, sp = text.strip().lower().partition("+")
    if plus:
        c = parse_candidate(base)
        return Candidate(weight=c.weight, activation=c.activation,
                         sparsity=_parse_sparsity(sp, text))
    t = base
    m = re.fullmatch(r"w(4|8|16)a(8|16)", t)
    if m:
        return Candidate(weight=_int_weight(int(m.group(1))), activation=_int_act(int(m.group(2))))
    m = re.fullmatch(r"w:([a-z0-9_]+)/a:([a-z0-9_]+)", t)
    if m:
        return Candidate(weight=Format.from_name(m.group(1)),
                         activation=Format.from_name(m.group(2)))
    try:
        fmt = Format.from_name(t)
    except UsageError:
        fmt = None
    if fmt is not None and fmt.spec.kind is not FormatKind.INT:
        return Candidate(weight=fmt, activation=fmt)
    raise UsageError(
        f"cannot read candidate '{text}'",
        fix="write wXaY with X in 4/8/16 and Y in 8/16 (e.g. w8a8), fp16, fp8, fp8e5m2, float, "
            "or w:<format>/a:<format>",
    )


UNIFORM_CANDIDATES = ("w8a8", "w8a16", "w4a8", "w4a16", "w16a16", "fp16", "fp8", "float")
