"""Registry of per-op facts: which input is the weight, its output-channel axis, how MACs are
counted, and how the op is treated when the graph is quantized.

MACs are per sample (batch 1): for Conv ``C_out·H_out·W_out·(C_in/groups)·∏k``; for
ConvTranspose ``C_in·H_in·W_in·(C_out/groups)·∏k``; for Gemm/MatMul ``∏(output) · K``.

Roles, after how ONNX Runtime's QDQ format treats each op:

* ``LAYER``: compute with a constant weight (Conv, ConvTranspose, Gemm, MatMul with a constant
  operand). One quantizer group each: it decides its weight format and its activation format.
* ``ACT_MATMUL``: a MatMul of two activations (attention). A group with no weight.
* ``ELEMENTWISE``: arithmetic on activations (Add, Mul, Clip, LayerNormalization, Softmax, ...):
  quantized inputs and a freshly calibrated output quantizer, in the format of its producer.
* ``PASSTHROUGH``: data movement (Reshape, Transpose, MaxPool, ...): the output reuses the
  input's quantization parameters, as ORT's QDQ quantizer does.

Some element-wise ops bound their output (``bounds``: Sigmoid, Softmax and HardSigmoid in
[0, 1], Tanh in [-1, 1]): the output range is calibrated, as ORT's QDQ quantizer does, and
never leaves the bounds. ``snaps`` (Sigmoid, Softmax): the uint8 output takes the whole
bounds when its calibrated range reaches past half of them: QNN's HTP computes a SiLU's
Sigmoid best on [0, 1] (NudeNet's YOLOv8: 28.8 dB against the CPU EP with [0, 1], 24.8 dB
calibrated), losing at most one bit. Below half, the range stays calibrated: a wake-word
detector's Sigmoid whose outputs stay below 1e-3 on a grid over [0, 1] (step 1/255) rounds
every output to 0 (SQNR 0 dB; openWakeWord's "hey mycroft"). Both are applied at export
(:mod:`mpsearch.export.qdq`); the simulation keeps the calibrated range, at most one bit
finer. ``u16_encoding`` is the (scale, zero point) QNN's HTP requires of the op's uint16
output (Sigmoid 1/65536 and 0, Tanh 1/32768 and 32768, as ORT's QNN quantization config
writes them).

Relu and Clip are *fused* into their producer's output quantizer as ONNX Runtime's QDQ
quantizer does: a tensor whose only consumer is one of them is quantized with the activation's
output range (ReLU6: [0, 6]), not its own wider one, and the activation's output reuses those
parameters. Without this an 8-bit grid over a Conv's raw [-30, 30] range loses about 10 dB on
EfficientNet-Lite0.

Channel facts, for output-channel pruning (:mod:`mpsearch.graph.flow`): ``channel_flow``
says how an op carries channels from its input to its output (``PER_CHANNEL``: output channel
``c`` reads input channel ``c`` only, constant inputs broadcast along it; ``FLATTEN``: 1:1 when
every dim after the channel axis is 1); ``zero_rule`` when its output is zero on a channel
(``UNARY``: where its first input is; ``ANY``: where some activation input is, Mul;
``ALL``: where every activation input is, Add/Sub; ``NEVER``: Sigmoid(0) = 1/2; ``CLIP``: where
the input is and the bounds hold 0). An op with no ``channel_flow`` mixes channels.

An op not in the registry is left in float, with the reason recorded (never a crash).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from onnx import NodeProto, helper

__all__ = ["OP_REGISTRY", "ChannelFlow", "OpInfo", "OpRole", "ZeroRule", "lookup", "register"]


class OpRole(enum.Enum):
    LAYER = "layer"
    ACT_MATMUL = "act_matmul"
    ELEMENTWISE = "elementwise"
    PASSTHROUGH = "passthrough"


class ChannelFlow(enum.Enum):
    PER_CHANNEL = "per_channel"
    FLATTEN = "flatten"


class ZeroRule(enum.Enum):
    UNARY = "unary"
    ANY = "any"
    ALL = "all"
    NEVER = "never"
    CLIP = "clip"


Shape = Sequence[int | None]
MacFn = Callable[[NodeProto, Mapping[str, Shape]], int | None]


@dataclass(frozen=True, kw_only=True)
class OpInfo:
    op_type: str
    role: OpRole
    # Inputs whose float values are activations to be quantized (None: all float inputs).
    act_inputs: tuple[int, ...] | None = (0,)
    weight_input: int | None = None
    bias_input: int | None = None
    macs: MacFn | None = None
    # Whether the op's activation inputs must share one format when the profile ties them.
    tieable: bool = False
    # The interval the op's output lies in, and the uint16 encoding QNN's HTP requires of it
    # (module docstring).
    bounds: tuple[float, float] | None = None
    u16_encoding: tuple[float, int] | None = None
    snaps: bool = False
    # The output is always one of the activation inputs' values (Where): its range is the
    # union of theirs, not the calibration data's (a branch the data rarely takes saturates).
    selects: bool = False
    # Constant float inputs that are quantized like weights (per tensor, 8-bit), e.g. LN gamma.
    const_inputs: tuple[int, ...] = ()
    # A clipping activation (Relu, Clip): the producer's output quantizer takes this op's
    # output range, so Q's saturation does the clipping (ORT's "removable activations").
    fuses_into_producer: bool = False
    # Output-channel pruning (module docstring): how channels pass, when zeros stay zero.
    channel_flow: ChannelFlow | None = None
    zero_rule: ZeroRule = ZeroRule.NEVER

    def weight_axis(self, node: NodeProto, weight_rank: int) -> int:
        """Axis of output channels in the weight tensor (the per-channel axis)."""
        if self.op_type == "ConvTranspose":
            return 1
        if self.op_type == "Gemm":
            return 0 if _attr(node, "transB", 0) else 1
        if self.op_type == "MatMul":
            return weight_rank - 1
        return 0


OP_REGISTRY: dict[str, OpInfo] = {}


def register(op_type: str, role: OpRole, **facts: object) -> Callable[[MacFn], MacFn]:
    """Decorator for a MAC-counting function; records the op's facts and returns the function."""

    def wrap(fn: MacFn) -> MacFn:
        OP_REGISTRY[op_type] = OpInfo(op_type=op_type, role=role, macs=fn, **facts)  # type: ignore[arg-type]
        return fn

    return wrap


def _add(op_type: str, role: OpRole, **facts: object) -> None:
    OP_REGISTRY[op_type] = OpInfo(op_type=op_type, role=role, **facts)  # type: ignore[arg-type]


# ONNX Runtime's contrib ops mpsearch itself writes (ingestion's GELU fusion), as the ONNX op
# of the same name
_CONTRIB = frozenset({"Gelu"})


def lookup(op_type: str, domain: str = "") -> OpInfo | None:
    if domain not in ("", "ai.onnx") and not (domain == "com.microsoft"
                                              and op_type in _CONTRIB):
        return None
    return OP_REGISTRY.get(op_type)


def _attr(node: NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _known(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _per_sample(shape: Shape) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)


@register("Conv", OpRole.LAYER, weight_input=1, bias_input=2)
def _conv_macs(node: NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
    if not (_known(w) and _known(y)):
        return None
    # y: [N, C_out, *spatial]; w: [C_out, C_in/groups, *k]
    return _per_sample(y) * math.prod(w[1:])


@register("ConvTranspose", OpRole.LAYER, weight_input=1, bias_input=2)
def _convtranspose_macs(node: NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    w, x = shapes.get(node.input[1]), shapes.get(node.input[0])
    if not (_known(w) and _known(x)):
        return None
    # x: [N, C_in, *spatial]; w: [C_in, C_out/groups, *k]
    return _per_sample(x) * math.prod(w[1:])


@register("Gemm", OpRole.LAYER, weight_input=1, bias_input=2)
def _gemm_macs(node: NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not (_known(a) and _known(y)):
        return None
    k = a[0] if _attr(node, "transA", 0) else a[1]
    return _per_sample(y) * k


@register("MatMul", OpRole.LAYER, weight_input=1)
def _matmul_macs(node: NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not (_known(a) and _known(y)):
        return None
    per = math.prod(y[1:]) if len(y) > 2 else math.prod(y)
    return per * a[-1]


# Element-wise arithmetic on activations: fresh output range, inputs quantized.
for _op in ("Add", "Sub", "Mul", "Div"):
    _add(_op, OpRole.ELEMENTWISE, act_inputs=(0, 1), tieable=_op in ("Add", "Sub", "Mul"))
for _op in ("Max", "Min"):  # variadic
    _add(_op, OpRole.ELEMENTWISE, act_inputs=None)
_add("Concat", OpRole.ELEMENTWISE, act_inputs=None, tieable=True)
_add("Where", OpRole.ELEMENTWISE, act_inputs=(1, 2), tieable=True,  # input 0: the condition
     selects=True)
_add("Relu", OpRole.ELEMENTWISE, fuses_into_producer=True)
_add("Clip", OpRole.ELEMENTWISE, fuses_into_producer=True)
for _op in ("LeakyRelu", "HardSwish", "Elu", "Gelu",
            "Erf", "Sqrt", "Neg", "Abs", "ReduceMean", "ReduceSum", "GlobalAveragePool",
            "AveragePool", "Resize", "Pow", "PRelu"):
    _add(_op, OpRole.ELEMENTWISE)
_add("LayerNormalization", OpRole.ELEMENTWISE, const_inputs=(1,))
_add("InstanceNormalization", OpRole.ELEMENTWISE, const_inputs=(1,))
_add("Softmax", OpRole.ELEMENTWISE, bounds=(0.0, 1.0), snaps=True)
_add("HardSigmoid", OpRole.ELEMENTWISE, bounds=(0.0, 1.0))
_add("Sigmoid", OpRole.ELEMENTWISE, bounds=(0.0, 1.0), u16_encoding=(1.0 / 65536.0, 0),
     snaps=True)
_add("Tanh", OpRole.ELEMENTWISE, bounds=(-1.0, 1.0), u16_encoding=(1.0 / 32768.0, 32768))
# Data movement: output keeps the input's quantization parameters.
for _op in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Slice",
            "Gather", "Split", "Expand", "Identity", "Pad", "DepthToSpace", "SpaceToDepth",
            "GlobalMaxPool", "Tile"):
    _add(_op, OpRole.PASSTHROUGH)


def _channel_facts(ops: Sequence[str], flow: ChannelFlow, zero: ZeroRule) -> None:
    for op in ops:
        OP_REGISTRY[op] = dataclasses.replace(OP_REGISTRY[op], channel_flow=flow, zero_rule=zero)


_channel_facts(("Relu", "LeakyRelu", "PRelu", "Elu", "Gelu", "Erf", "Tanh", "Neg", "Abs",
                "Sqrt", "HardSwish", "Identity", "MaxPool", "AveragePool", "GlobalAveragePool",
                "GlobalMaxPool", "Div"), ChannelFlow.PER_CHANNEL, ZeroRule.UNARY)
_channel_facts(("Mul",), ChannelFlow.PER_CHANNEL, ZeroRule.ANY)
_channel_facts(("Add", "Sub"), ChannelFlow.PER_CHANNEL, ZeroRule.ALL)
_channel_facts(("Clip",), ChannelFlow.PER_CHANNEL, ZeroRule.CLIP)
_channel_facts(("Sigmoid", "HardSigmoid"), ChannelFlow.PER_CHANNEL, ZeroRule.NEVER)
_channel_facts(("Reshape", "Flatten"), ChannelFlow.FLATTEN, ZeroRule.UNARY)
