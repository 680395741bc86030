"""Output-channel pruning made physical: the pruned layer and everything that reads it shrink.

A layer ``l`` that keeps output channels ``K ⊂ {0..C-1}`` (:mod:`mpsearch.quant.prune`,
``+channel@d``) loses rows ``W_l[c]`` and bias entries ``b_l[c]`` for ``c ∉ K``. Along its
route (:func:`mpsearch.graph.flow.channel_route`, which also says where a route is refused)
the per-channel constants are sliced alike, each depthwise conv's rows, bias and ``group``
shrink with it, and each dense consumer loses its input-channel columns ``c ∉ K``: its MACs
shrink by ``|K|/C`` too.

**The masked original** is the full-size model with the pruned channels' contribution removed:
the rows and bias entries ``c ∉ K`` of ``l`` and of every depthwise conv on the route zeroed, and
the entries ``c ∉ K`` of the Add/Sub constants on the route (biases in another form) zeroed.
The smaller model equals it exactly (up to float summation order) when the pruned channels
are zero where each dense consumer reads them, which the route guarantees.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, numpy_helper

from mpsearch.core.errors import InternalError, UsageError
from mpsearch.core.ops import ChannelFlow, ZeroRule, lookup
from mpsearch.graph.flow import (
    ChannelRefusal,
    ChannelRoute,
    attr,
    channel_route,
    const_axis,
    in_axis,
)
from mpsearch.graph.ingest import names_used
from mpsearch.graph.layer_graph import LayerGraph

__all__ = ["ShrunkModel", "check_disjoint", "mask_channels", "masked_constants",
           "shrink_channels"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ShrunkModel:
    model: ModelProto
    kept: Mapping[str, tuple[int, ...]]  # pruned layer -> its kept output channels
    routes: Mapping[str, ChannelRoute]


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
        per_axis = attr(dq, "axis", 1) % x.ndim == ax
        self._set(dq, 0, np.take(x, idx, axis=ax))
        for s in (1, 2):
            if len(dq.input) > s and dq.input[s]:
                p = self.arrays[dq.input[s]]
                if per_axis and p.ndim == 1 and p.size == x.shape[ax] > 1:
                    self._set(dq, s, p[idx])

    def finish(self) -> ModelProto:
        g = self.model.graph
        used = names_used(g)
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
            pos = const_axis(arrays[name].shape, r, ax, route.channels)
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
                    raise InternalError(f"node '{node}' on the route of '{layer}' is not in the "
                                        "model to shrink: this is a bug in mpsearch; please "
                                        "report it with the model")
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
            ed.take(node, 1, k, in_axis(lg, node))
    out = ed.finish()
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out)
    onnx.checker.check_model(out)
    log.info("channel pruning: %s", ", ".join(f"{layer} {len(k)}/{routes[layer].channels}"
                                              for layer, k in kept.items()))
    return ShrunkModel(model=out, kept={layer: tuple(int(i) for i in k)
                                        for layer, k in kept.items()},
                       routes=routes)
