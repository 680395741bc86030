"""Output-channel pruning made physical: the pruned layer and everything that reads it shrink.

A layer ``l`` that keeps output channels ``K ⊂ {0..C-1}`` (:mod:`mpsearch.quant.prune`,
``+channel@d``) loses rows ``W_l[c]`` and bias entries ``b_l[c]`` for ``c ∉ K``. Its output is
followed (its *route*) in topological order through ops whose registry entry says they carry
channels one to one (:class:`mpsearch.core.ops.ChannelFlow`): element-wise ops and pools, whose
per-channel constants (a PRelu slope, a Mul or Add constant of shape ``[C,1,1]``) are sliced
alike; a depthwise conv, whose rows, bias and ``group`` shrink with it and whose output is
followed on; a Reshape/Flatten of ``[N, C, 1, 1]`` to ``[N, C]`` after global pooling. Each
branch ends at a *dense consumer* (Conv/ConvTranspose with ``group = 1``, Gemm, MatMul with a
constant weight), whose input-channel columns ``c ∉ K`` go: its MACs shrink by ``|K|/C`` too.

**The masked original** is the full-size model with the pruned channels' contribution removed:
the rows and bias entries ``c ∉ K`` of ``l`` and of every depthwise conv on the route zeroed, and
the entries ``c ∉ K`` of the Add/Sub constants on the route (biases in another form) zeroed.
The smaller model equals it exactly (up to float summation order) when the pruned channels
are zero where each dense consumer reads them; that holds when every op on the route keeps zero
at zero (:class:`mpsearch.core.ops.ZeroRule`: Relu, Clip with ``lo ≤ 0 ≤ hi``, HardSwish, pools,
Mul, ...). Where it does not (Sigmoid(0) = 1/2, Clip to ``[1, 6]``), the consumer would see a
constant the smaller model drops, so the route is refused.

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

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from mpsearch.core.errors import UsageError
from mpsearch.core.ops import ChannelFlow, OpRole, ZeroRule, lookup
from mpsearch.graph.layer_graph import LayerGraph

__all__ = ["ChannelRefusal", "ChannelRoute", "ShrunkModel", "channel_route", "check_disjoint",
           "mask_channels", "masked_constants", "shrink_channels"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, kw_only=True)
class ShrunkModel:
    model: ModelProto
    kept: Mapping[str, tuple[int, ...]]  # pruned layer -> its kept output channels
    routes: Mapping[str, ChannelRoute]


def _attr(node: NodeProto, name: str, default: object) -> object:
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


def _in_axis(lg: LayerGraph, node: str) -> int | None:
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
        return 1 if _attr(n, "transB", 0) else 0
    return rank - 2  # MatMul with a constant [.., K, N] weight


def _const_axis(shape: Sequence[int], rank: int, axis: int, c: int) -> int | None | str:
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
    if lay.op_type == "Gemm" and _attr(lg.nodes[layer], "transA", 0):
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
            in_ax = _in_axis(lg, name)
            layer_rank = rank(t)
            if (in_ax is None or n.input[0] != t or layer_rank is None
                    or ax != (1 if lg.layers[name].op_type in ("Conv", "ConvTranspose", "Gemm")
                              else layer_rank - 1)
                    or (lg.layers[name].op_type == "Gemm" and _attr(n, "transA", 0))):
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
            elif _attr(n, "axis", 1) != 1:
                return no(name, f"Flatten '{name}' with axis != 1")
        else:
            for i in n.input:
                if i in inits and n.op_type != "Clip":
                    pos = _const_axis(inits[i].dims, r, ax, c)
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
                _const_axis(inits[i].dims, r, ax, c) is not None or const_zero(i)
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


class _Editor:
    """Initializer edits on a copy of a model: each (node, input) edited gets its own tensor,
    so shared constants (Clip bounds, a tied bias) are never changed for another reader. In an
    exported QDQ model a constant sits behind a ``DequantizeLinear``: :meth:`take` slices its
    stored tensor and, where the scale and zero point run along the sliced axis, them too."""

    def __init__(self, model: ModelProto) -> None:
        self.model = ModelProto()
        self.model.CopyFrom(model)
        g = self.model.graph
        self.nodes = {n.name: n for n in g.node}
        self.arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.owned: set[str] = set()
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers = Counter(i for n in g.node for i in n.input)

    def get(self, node: str, slot: int) -> np.ndarray:
        """The stored value of input ``slot`` (behind a DequantizeLinear: its stored tensor,
        of the same shape)."""
        name, dq = self._source(node, slot)
        return self.arrays[name if dq is None else dq.input[0]]

    def has(self, node: str, slot: int) -> bool:
        try:
            self._source(node, slot)
        except KeyError:
            return False
        return True

    def _source(self, node: str, slot: int) -> tuple[str, NodeProto | None]:
        name = self.nodes[node].input[slot]
        if name in self.arrays:
            return name, None
        dq = self.producer.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in self.arrays:
            return name, dq
        raise KeyError(f"input {slot} of '{node}' is not a constant")

    def set(self, node: str, slot: int, value: np.ndarray) -> None:
        self._set(self.nodes[node], slot, value)

    def _set(self, n: NodeProto, slot: int, value: np.ndarray) -> None:
        name = n.input[slot]
        if name not in self.owned:
            name = f"{name}.ch.{n.name or n.output[0]}.{slot}"
            n.input[slot] = name
            self.owned.add(name)
        self.arrays[name] = np.ascontiguousarray(value)

    def take(self, node: str, slot: int, idx: np.ndarray, axis: int) -> None:
        """Keep only entries ``idx`` along ``axis`` of input ``slot`` of ``node``."""
        name, dq = self._source(node, slot)
        if dq is None:
            self.set(node, slot, np.take(self.arrays[name], idx, axis=axis))
            return
        if self.readers[name] > 1:  # a DequantizeLinear of its own for this reader
            g = self.model.graph
            own = NodeProto()
            own.CopyFrom(dq)
            own.name = f"{dq.name or name}.ch.{node}"
            own.output[0] = f"{name}.ch.{node}"
            g.node.insert(list(g.node).index(dq) + 1, own)
            self.readers[name] -= 1
            self.nodes[node].input[slot] = own.output[0]
            dq = own
        x = self.arrays[dq.input[0]]
        ax = axis % x.ndim
        per_axis = _attr(dq, "axis", 1) % x.ndim == ax
        self._set(dq, 0, np.take(x, idx, axis=ax))
        for s in (1, 2):
            if len(dq.input) > s and dq.input[s]:
                p = self.arrays[dq.input[s]]
                if per_axis and p.ndim == 1 and p.size == x.shape[ax] > 1:
                    self._set(dq, s, p[idx])

    def finish(self) -> ModelProto:
        g = self.model.graph
        used = {i for n in g.node for i in n.input}
        keep = [t for t in g.initializer if t.name in used and t.name not in self.owned]
        del g.initializer[:]
        g.initializer.extend(keep)
        for name in sorted(self.owned & used):
            g.initializer.append(numpy_helper.from_array(self.arrays[name], name))
        return self.model


def _routes(lg: LayerGraph, keep: Mapping[str, Sequence[int]]
            ) -> tuple[dict[str, ChannelRoute], dict[str, np.ndarray]]:
    routes: dict[str, ChannelRoute] = {}
    kept: dict[str, np.ndarray] = {}
    for layer, idx in keep.items():
        lay = lg.layers.get(layer)
        if lay is None:
            raise UsageError(f"'{layer}' is not a layer of the model",
                             fix="use layer names from 'mpsearch inspect'")
        k = np.unique(np.asarray(idx, dtype=int))
        c = lay.out_channels or 0
        if k.size == 0 or k[0] < 0 or k[-1] >= c:
            raise UsageError(f"layer '{layer}': kept channels must be a non-empty subset of "
                             f"0..{c - 1}", fix="keep at least one channel")
        route = channel_route(lg, layer)
        if isinstance(route, ChannelRefusal):
            raise UsageError(f"layer '{layer}': its output channels cannot be pruned: "
                             f"{route.reason} (at '{route.node}')",
                             fix="give this layer a dense candidate")
        routes[layer], kept[layer] = route, k
    check_disjoint(routes)
    return routes, kept


def check_disjoint(routes: Mapping[str, ChannelRoute]) -> None:
    """Two pruned layers whose routes meet at a node would each need the other's channels
    there: a joint decision this module does not make."""
    touched: dict[str, str] = {}
    for layer, route in routes.items():
        for node in (*route.followers, *route.consumers):
            if node in touched:
                raise UsageError(f"layers '{touched[node]}' and '{layer}' both prune the "
                                 f"channels that '{node}' reads",
                                 fix="give one of them a dense candidate")
            touched[node] = layer


def _route_constants(lg: LayerGraph, route: ChannelRoute, node: str,
                     arrays: Mapping[str, np.ndarray]) -> list[tuple[int, np.ndarray, int]]:
    """The per-channel constants of follower ``node``: (input slot, value, channel axis)."""
    n = lg.nodes[node]
    info = lookup(n.op_type, n.domain)
    if n.op_type == "Clip" or info is None or info.channel_flow is not ChannelFlow.PER_CHANNEL:
        return []
    t = next(i for i in n.input if i in route.axis)
    r, ax = len(lg.activations[t].shape), route.axis[t]
    out = []
    for slot, name in enumerate(n.input):
        if name in arrays:
            pos = _const_axis(arrays[name].shape, r, ax, route.channels)
            if pos is not None:
                out.append((slot, arrays[name], pos))
    return out


def _float_constants(lg: LayerGraph, node: str) -> dict[str, np.ndarray]:
    inits = {t.name: t for t in lg.model.graph.initializer}
    return {i: numpy_helper.to_array(inits[i]) for i in lg.nodes[node].input if i in inits}


def _slice_const(ed: _Editor, lg: LayerGraph, route: ChannelRoute, node: str,
                 k: np.ndarray) -> None:
    names = lg.nodes[node].input  # the float graph's names; an exported model's differ
    arrays = {names[slot]: ed.get(node, slot) for slot in range(len(names))
              if names[slot] and ed.has(node, slot)}
    for slot, _, pos in _route_constants(lg, route, node, arrays):
        ed.take(node, slot, k, pos)


def masked_constants(lg: LayerGraph, route: ChannelRoute, keep: Sequence[int]
                     ) -> dict[tuple[str, int], np.ndarray]:
    """The Add/Sub constants on ``route`` as the masked original has them (a bias in another
    form, module docstring): (node, input slot) -> the constant with the entries of the
    channels not in ``keep`` zeroed."""
    m = np.zeros(route.channels, dtype=bool)
    m[np.asarray(keep, dtype=int)] = True
    names = {i for node in route.followers for i in lg.nodes[node].input}
    arrays = {t.name: numpy_helper.to_array(t) for t in lg.model.graph.initializer
              if t.name in names}
    out: dict[tuple[str, int], np.ndarray] = {}
    for node in route.followers:
        n = lg.nodes[node]
        info = lookup(n.op_type, n.domain)
        if node in route.depthwise or info is None or info.zero_rule is not ZeroRule.ALL:
            continue
        for slot, arr, pos in _route_constants(lg, route, node, arrays):
            shape = [1] * arr.ndim
            shape[pos] = route.channels
            out[(node, slot)] = np.where(m.reshape(shape), arr, 0).astype(arr.dtype)
    return out


def mask_channels(lg: LayerGraph, keep: Mapping[str, Sequence[int]]) -> ModelProto:
    """The masked original (module docstring): full size, pruned channels' contribution zeroed."""
    routes, kept = _routes(lg, keep)
    ed = _Editor(lg.model)
    for layer, route in routes.items():
        k = kept[layer]
        for node in (layer, *route.depthwise):
            lay = lg.layers[node]
            ax = lay.channel_axis if node == layer else 0
            w = ed.get(node, 1)
            m = np.zeros(route.channels, dtype=bool)
            m[k] = True
            shape = [1] * w.ndim
            shape[ax] = route.channels
            ed.set(node, 1, np.where(m.reshape(shape), w, 0).astype(w.dtype))
            if lay.bias is not None:
                ed.set(node, 2, np.where(m, ed.get(node, 2), 0).astype(np.float32))
        for (node, slot), arr in masked_constants(lg, route, k).items():
            ed.set(node, slot, arr)
    return ed.finish()


def shrink_channels(lg: LayerGraph, keep: Mapping[str, Sequence[int]], *,
                    model: ModelProto | None = None) -> ShrunkModel:
    """``lg.model`` with each layer in ``keep`` holding only those output channels, and its
    route adjusted (module docstring). ``model``: instead, a model exported from ``lg.model``
    (same node names, constants stored or behind a DequantizeLinear), such as the masked QDQ
    export. Raises UsageError where a route is refused."""
    routes, kept = _routes(lg, keep)
    ed = _Editor(lg.model if model is None else model)
    for layer, route in routes.items():
        k = kept[layer]
        lay = lg.layers[layer]
        ed.take(layer, 1, k, lay.channel_axis)
        if lay.bias is not None:
            ed.take(layer, 2, k, 0)
        for node in route.followers:
            n = ed.nodes.get(node)
            if n is None:  # rewritten by an exporter (a Clip made fp8-safe): nothing to cut
                if node in route.depthwise or lg.nodes[node].op_type == "Reshape" or \
                        _route_constants(lg, route, node, _float_constants(lg, node)):
                    raise UsageError(f"node '{node}' on the route of '{layer}' is not in the "
                                     "model to shrink", fix="report this as a bug")
                continue
            if node in route.depthwise:
                ed.take(node, 1, k, 0)
                if lg.layers[node].bias is not None:
                    ed.take(node, 2, k, 0)
                for a in n.attribute:
                    if a.name == "group":
                        a.i = int(k.size)
            elif n.op_type == "Reshape":
                target = ed.get(node, 1).copy()
                target[1:][target[1:] == route.channels] = k.size
                ed.set(node, 1, target)
            else:
                _slice_const(ed, lg, route, node, k)
        for node in route.consumers:
            ed.take(node, 1, k, _in_axis(lg, node))
    out = ed.finish()
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out)
    onnx.checker.check_model(out)
    log.info("channel pruning: %s", ", ".join(f"{layer} {len(k)}/{routes[layer].channels}"
                                              for layer, k in kept.items()))
    return ShrunkModel(model=out, kept={layer: tuple(int(i) for i in k)
                                        for layer, k in kept.items()},
                       routes=routes)
