"""What flows along the graph under a plan: each node's activation format, and where a layer's
output channels go.

**Activation formats** (:func:`node_formats`). Each node carries one activation format: a layer
takes its group's candidate's, other ops inherit the widest format among their producers (or,
with no quantized producer, the widest among their consumers); ops left in float stay float.
A product of activations (``Mul(x, x)``, a gate ``Mul(x, y)``, ``Pow``) spans a wider dynamic
range than its inputs: it also takes the widest format of the layers it reaches through ops
that are no layer, and the ops after it inherit that, so a 16-bit layer reads it at its own
precision, as the sensitivity stage scores it, and not as a 16-bit copy of values rounded to
8 bits. A squared spectrum (openWakeWord's mel front end: an STFT's output squared, summed, a
16-bit mel MatMul) in 8 bits made every bin 27 dB below the loudest zero (6.5 dB at
``bops=0.9`` against 10.0 so). Linear ops (a Mul by a constant, an Add) are not raised: they
add no range, and a conversion right after a layer's output is one the HTP computes
otherwise than the CPU EP (PaddleOCR v4's recogniser: 22.9 dB at such a Conv).
The exporter writes these formats (:mod:`mpsearch.export.qdq`) and the cost model counts a
format conversion wherever a consumer's format differs from its producer's
(:mod:`mpsearch.hw.cost`).

**Channel routes** (:func:`channel_route`). A layer that prunes output channels (``+channel@d``,
:mod:`mpsearch.quant.prune`) has its output followed (its *route*) in topological order
through ops whose registry entry says they carry channels one to one
(:class:`mpsearch.core.ops.ChannelFlow`): element-wise ops and pools, whose per-channel
constants (a PRelu slope, a Mul or Add constant of shape ``[C,1,1]``) would be sliced alike; a
depthwise conv, whose rows, bias and ``group`` would shrink with it and whose output is
followed on; a Reshape/Flatten of ``[N, C, 1, 1]`` to ``[N, C]`` after global pooling. Each
branch ends at a *dense consumer* (Conv/ConvTranspose with ``group = 1``, Gemm, MatMul with a
constant weight), whose input-channel columns would go. Removing the channels leaves the
network unchanged only where the pruned channels are zero where each dense consumer reads
them: every op on the route must keep zero at zero (:class:`mpsearch.core.ops.ZeroRule`: Relu,
Clip with ``lo ≤ 0 ≤ hi``, HardSwish, pools, Mul, ...); Sigmoid(0) = 1/2 or a Clip to
``[1, 6]`` would make the consumer see a constant, so such a route is refused. The cost model
shrinks the costs along the route, the legality check and the sensitivity stage read its
refusals, and :mod:`mpsearch.export.channels` makes it physical.

**Refusals** (values with a reason, STYLE rule 6): the channels reach a graph output; they meet
another tensor at an Add/Sub/Mul/Concat (a *tie*: the other branch, e.g. a residual, would have
to drop the same channels; a joint decision over the tie class, which is not made here); they
reach an op with no channel rule (Reshape of real spatial data, Transpose, Softmax, a grouped
conv whose groups would become unequal, an activation x activation MatMul); a per-channel
constant that broadcasts in another way. A depthwise conv is never pruned alone: its output
channel is its input channel, so it shrinks only as the follower of its producer; the
producer's decision is the one made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper, numpy_helper

from mpsearch.core.formats import Candidate, Format
from mpsearch.core.ops import ChannelFlow, OpRole, ZeroRule, lookup
from mpsearch.graph.layer_graph import LayerGraph

__all__ = ["ChannelRefusal", "ChannelRoute", "attr", "channel_route", "const_axis", "in_axis",
           "format_setters", "layers_reached", "node_formats", "widest"]

# Precision order of the activation formats: a node fed by several takes the widest.
RANK = {Format.FLOAT: 100, Format.FP16: 90, Format.INT16: 16, Format.UINT16: 16,
         Format.FP8_E4M3: 9, Format.FP8_E5M2: 9, Format.INT8: 8, Format.UINT8: 8,
         Format.INT4: 4, Format.UINT4: 4}


def widest(fmts: list[Format]) -> Format:
    """The format of most precision among ``fmts`` (float above fp16 above 16-bit ...)."""
    best = fmts[0]
    for f in fmts[1:]:
        if RANK[f] > RANK[best]:
            best = f
    return best


def format_setters(lg: LayerGraph, tensor: str) -> tuple[str, ...]:
    """The groups whose activation format ``tensor`` is stored in (:func:`node_formats`): its
    producer if that is a layer; else the layers whose formats reach it forward; else (a graph
    input, or an op fed by none) the layers it reaches, whose widest format it takes. Empty
    for a tensor this graph does not quantize."""
    act = lg.activations.get(tensor)
    if act is None:
        return ()
    if act.producer in lg.layers:
        return (act.producer,)
    if act.source_groups:
        return tuple(sorted(act.source_groups))
    return layers_reached(lg, tensor)


def layers_reached(lg: LayerGraph, tensor: str) -> tuple[str, ...]:
    """The layers ``tensor`` reaches through ops that are no layer (where a consumer's format
    differs from the producer's, the consumers' formats set the converted copy)."""
    act = lg.activations.get(tensor)
    if act is None:
        return ()
    found: set[str] = set()
    todo, seen = list(act.consumers), set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in lg.layers:
            found.add(node)
            continue
        todo += [c for o in lg.nodes[node].output if o in lg.activations
                 for c in lg.activations[o].consumers]
    return tuple(sorted(found))


def node_formats(lg: LayerGraph, plan: Mapping[str, Candidate]) -> dict[str, Format]:
    """Activation format of every node under ``plan`` (FLOAT for nodes left in float)."""
    fmt = _formats(lg, plan, {})
    # A product of activations is as wide as the layers it reaches (module docstring), and
    # what follows it as wide as it: the forward pass again, with those formats raised.
    raised = {}
    for name in lg.order:
        if fmt[name].is_quantized and _is_product(lg, name):
            reach = [plan[g].activation for o in lg.nodes[name].output
                     for g in layers_reached(lg, o) if plan[g].activation.is_quantized]
            wide = widest([fmt[name], *reach])
            if wide is not fmt[name]:
                raised[name] = wide
    return _formats(lg, plan, raised) if raised else fmt


def _is_product(lg: LayerGraph, name: str) -> bool:
    """A Mul of two activations (a square ``Mul(x, x)``, a gate) or a Pow of one: an op whose
    output spans a wider dynamic range than its inputs."""
    node = lg.nodes[name]
    if name in lg.layers or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Mul":
        return len(node.input) == 2 and all(i in lg.activations for i in node.input)
    return node.op_type == "Pow" and node.input[0] in lg.activations


def _formats(lg: LayerGraph, plan: Mapping[str, Candidate],
             raised: Mapping[str, Format]) -> dict[str, Format]:
    fmt: dict[str, Format] = {}
    float_nodes = {f.node for f in lg.float_ops}
    producer_of = {a.name: a.producer for a in lg.activations.values()}
    unresolved: list[str] = []
    for name in lg.order:
        node = lg.nodes[name]
        if name in lg.layers:
            fmt[name] = plan[name].activation
        elif name in float_nodes or lookup(node.op_type, node.domain) is None:
            fmt[name] = Format.FLOAT
        else:
            srcs = [fmt[p] for t in lg.activation_inputs(name)
                    if (p := producer_of.get(t)) is not None and p in fmt]
            srcs += [raised[name]] if name in raised else []
            if srcs:
                fmt[name] = widest(srcs)
            else:
                unresolved.append(name)
                fmt[name] = Format.FLOAT  # placeholder until consumers are known
    # Reverse topological order: a consumer that was itself unresolved is settled first.
    for name in reversed(unresolved):
        quant = _consumer_formats(lg, fmt, name)
        fmt[name] = widest(quant) if quant else Format.FLOAT
    return fmt


def _consumer_formats(lg: LayerGraph, fmt: Mapping[str, Format], name: str) -> list[Format]:
    return [fmt[c] for o in lg.nodes[name].output if o in lg.activations
            for c in lg.activations[o].consumers if fmt[c].is_quantized]


@dataclass(frozen=True, kw_only=True)
class ChannelRefusal:
    """Why ``layer``'s output channels cannot be pruned, and at which node."""

    layer: str
    node: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ChannelRoute:
    """What pruning ``layer``'s output channels touches (module docstring)."""

    layer: str
    channels: int  # C, the layer's output channels
    axis: Mapping[str, int]  # each tensor on the route -> its channel axis
    followers: tuple[str, ...]  # nodes on the route, topological order (depthwise convs too)
    depthwise: tuple[str, ...]
    consumers: tuple[str, ...]  # dense layers whose input channels shrink


def attr(node: NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _out_axis(lg: LayerGraph, layer: str) -> int:
    """Channel axis of a layer's output tensor."""
    lay = lg.layers[layer]
    if lay.op_type in ("Conv", "ConvTranspose"):
        return 1
    shape = lg.activations[lay.output].shape if lay.output in lg.activations else None
    return len(shape) - 1 if shape else -1


def in_axis(lg: LayerGraph, node: str) -> int | None:
    """Input-channel axis of a dense consumer's weight (None: not a dense consumer)."""
    lay, n = lg.layers.get(node), lg.nodes[node]
    if lay is None or lay.role is not OpRole.LAYER or lay.weight_shape is None:
        return None
    rank = len(lay.weight_shape)
    if lay.op_type == "Conv":
        return 1 if lay.conv_groups == 1 else None
    if lay.op_type == "ConvTranspose":
        return 0 if lay.conv_groups == 1 else None
    if lay.op_type == "Gemm":
        return 1 if attr(n, "transB", 0) else 0
    return rank - 2  # MatMul with a constant [.., K, N] weight


def const_axis(shape: Sequence[int], rank: int, axis: int, c: int) -> int | None | str:
    """Axis of a broadcast constant along the channel ``axis`` of a rank-``rank`` tensor with
    ``c`` channels: an int (slice it), None (size 1 or absent there: leave it), or a reason."""
    pos = axis - (rank - len(shape))
    if pos < 0 or shape[pos] == 1:
        return None
    if shape[pos] == c:
        return pos
    return f"a constant of shape {list(shape)} does not broadcast along the channels"


def channel_route(lg: LayerGraph, layer: str) -> ChannelRoute | ChannelRefusal:
    """The route of ``layer``'s output channels, or why they cannot be pruned (whichever
    channels go: the answer does not depend on which)."""
    lay = lg.layers.get(layer)

    def no(node: str, reason: str) -> ChannelRefusal:
        return ChannelRefusal(layer=layer, node=node, reason=reason)

    if lay is None or lay.role is not OpRole.LAYER or lay.out_channels is None:
        return no(layer, "not a layer with a constant weight")
    if lay.depthwise:
        return no(layer, "a depthwise conv's output channel is its input channel; it shrinks "
                         "with its producer, never alone")
    if lay.conv_groups != 1:
        return no(layer, f"a grouped {lay.op_type} (group={lay.conv_groups}) would have "
                         "unequal groups")
    if lay.op_type == "Gemm" and attr(lg.nodes[layer], "transA", 0):
        return no(layer, "Gemm with transA=1")
    c = lay.out_channels
    inits = {t.name: t for t in lg.model.graph.initializer}
    outputs = {o.name for o in lg.model.graph.output}
    axis: dict[str, int] = {lay.output: _out_axis(lg, layer)}
    zero: dict[str, bool] = {lay.output: True}
    followers: list[str] = []
    depthwise: list[str] = []
    consumers: list[str] = []

    def rank(t: str) -> int | None:
        a = lg.activations.get(t)
        return None if a is None or a.shape is None else len(a.shape)

    def const_zero(name: str) -> bool:
        return bool(np.all(numpy_helper.to_array(inits[name]) == 0))

    start = lg.order.index(layer)
    for name in lg.order[start + 1:]:
        n = lg.nodes[name]
        on = [t for t in n.input if t in axis]
        if not on:
            continue
        t = on[0]
        ax = axis[t]
        if name in lg.layers and lg.layers[name].depthwise:
            if n.input[0] != t or ax != 1:
                return no(name, f"reaches depthwise conv '{name}' other than as its input")
            followers.append(name)
            depthwise.append(name)
            axis[n.output[0]] = 1
            zero[n.output[0]] = zero[t]
            continue
        if name in lg.layers:
            in_ax = in_axis(lg, name)
            layer_rank = rank(t)
            if (in_ax is None or n.input[0] != t or layer_rank is None
                    or ax != (1 if lg.layers[name].op_type in ("Conv", "ConvTranspose", "Gemm")
                              else layer_rank - 1)
                    or (lg.layers[name].op_type == "Gemm" and attr(n, "transA", 0))):
                what = (f"group={lg.layers[name].conv_groups}" if lg.layers[name].conv_groups > 1
                        else "reads them in a way that is not one weight column per channel")
                return no(name, f"{lg.layers[name].op_type} '{name}' {what}")
            if not zero[t]:
                return no(name, f"the pruned channels are not zero where '{name}' reads them "
                                "(an op on the way maps 0 to a non-zero value), so removing "
                                "them would change its input")
            consumers.append(name)
            continue
        info = lookup(n.op_type, n.domain)
        flow = info.channel_flow if info is not None else None
        if flow is None:
            return no(name, f"{n.op_type} '{name}' mixes channels (no channel rule in the op "
                            "registry)")
        r = rank(t)
        if r is None:
            return no(name, f"tensor '{t}' has no known rank")
        acts = [i for i in n.input if i and i not in inits]
        others = [i for i in acts if i not in axis]
        if others or any(axis[i] != ax for i in acts):
            return no(name, f"the channels meet tensor '{others[0] if others else t}' at "
                            f"{n.op_type} '{name}', a tie: both sides would have to drop "
                            "the same channels")
        if flow is ChannelFlow.FLATTEN:
            shape = lg.activations[t].shape
            out = lg.activations.get(n.output[0])
            if (shape is None or out is None or out.shape is None or ax != 1
                    or any(d != 1 for d in shape[2:]) or len(out.shape) != 2):
                return no(name, f"{n.op_type} '{name}' moves channels (only [N, C, 1, 1] to "
                                "[N, C] keeps them one to one)")
            if n.op_type == "Reshape":
                target = numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
                if target is None or any(v not in (0, -1, c) for v in target[1:]):
                    return no(name, f"Reshape '{name}' has a shape that is not [N, C]")
            elif attr(n, "axis", 1) != 1:
                return no(name, f"Flatten '{name}' with axis != 1")
        else:
            for i in n.input:
                if i in inits and n.op_type != "Clip":
                    pos = const_axis(inits[i].dims, r, ax, c)
                    if isinstance(pos, str):
                        return no(name, f"{n.op_type} '{name}': {pos}")
        rule = info.zero_rule
        if rule is ZeroRule.UNARY:
            z = n.input[0] in zero and zero[n.input[0]]
        elif rule is ZeroRule.ANY:
            z = any(zero.get(i, False) for i in acts)
        elif rule is ZeroRule.ALL:
            # Constants on the route are masked too (module docstring), so only the
            # activations count; a scalar constant that is not 0 cannot be masked.
            z = all(zero[i] for i in acts) and all(
                const_axis(inits[i].dims, r, ax, c) is not None or const_zero(i)
                for i in n.input if i in inits)
        elif rule is ZeroRule.CLIP:
            bounds = [float(numpy_helper.to_array(inits[i])) for i in n.input[1:3]
                      if i and i in inits]
            lo = bounds[0] if len(n.input) > 1 and n.input[1] else -np.inf
            hi = (bounds[-1] if len(n.input) > 2 and n.input[2] else np.inf)
            z = zero[t] and lo <= 0 <= hi
        else:
            z = False
        followers.append(name)
        for o in n.output:
            if o:
                axis[o], zero[o] = ax, z
    leaked = sorted(t for t in axis if t in outputs)
    if leaked:
        return no(leaked[0], f"the channels reach graph output '{leaked[0]}'")
    if not consumers:
        return no(layer, "no dense layer reads the channels")
    return ChannelRoute(layer=layer, channels=c, axis=axis, followers=tuple(followers),
                        depthwise=tuple(depthwise), consumers=tuple(consumers))
