"""The :class:`LayerGraph`: what the later stages reason about.

* **layers**: nodes that do the MACs (Conv incl. grouped/depthwise, ConvTranspose, Gemm,
  MatMul with a constant operand, MatMul between two activations), with MACs per sample and
  parameter counts (see :mod:`mpsearch.core.ops`);
* **quantizer groups**: one per layer. A group takes one decision, a candidate
  ``(weight format, activation format)``; the activation format holds for the layer's inputs
  and output, and flows forward through the element-wise and data-movement ops that follow it
  (Clip, Reshape, ...) until the next layer. Every quantized node therefore sees one activation
  type on all its ports, which Qualcomm's HTP compiler requires (docs/design.md §4);
* **ties**: the activation inputs of Add/Sub/Mul/Concat come from groups that must share an
  activation format when the hardware says so (union-find over those groups);
* **float ops**: ops with float activations that the registry does not know stay in float,
  each with its reason.

Models with dynamic dimensions keep them; MACs are counted on a copy whose dynamic dims are
fixed (by default from the data, else 1).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto

from mpsearch.core.errors import ModelError
from mpsearch.core.ops import OpInfo, OpRole, lookup
from mpsearch.graph.ingest import default_input_shapes, load_model, prepare_model, with_input_shapes

__all__ = [
    "Activation",
    "FloatOp",
    "Layer",
    "LayerGraph",
    "QuantGroup",
    "Tie",
    "build_layer_graph",
    "load_model",
]

log = logging.getLogger(__name__)

DEFAULT_TIE_OPS = frozenset({"Add", "Sub", "Mul", "Concat"})


# --------------------------------------------------------------------------- the layer graph


@dataclass(frozen=True, kw_only=True)
class Layer:
    """A node that does multiply-accumulates."""

    name: str
    op_type: str
    role: OpRole
    inputs: tuple[str, ...]  # activation inputs
    output: str
    weight: str | None = None
    bias: str | None = None
    weight_shape: tuple[int, ...] | None = None
    channel_axis: int | None = None
    conv_groups: int = 1
    macs: int | None = None
    params: int = 0

    @property
    def depthwise(self) -> bool:
        return (self.op_type == "Conv" and self.weight_shape is not None
                and self.conv_groups > 1 and self.weight_shape[1] == 1)

    @property
    def out_channels(self) -> int | None:
        if self.weight_shape is None or self.channel_axis is None:
            return None
        return self.weight_shape[self.channel_axis]


@dataclass(frozen=True, kw_only=True)
class QuantGroup:
    """One decision: the candidate for one layer."""

    name: str
    layer: str
    has_weight: bool


@dataclass(frozen=True, kw_only=True)
class Tie:
    """Groups whose activation formats must match because they meet at ``node``."""

    node: str
    op_type: str
    groups: tuple[str, ...]


# ops of a model that was quantized already: there is nothing left for mpsearch to plan
_ALREADY_QUANTIZED = frozenset({"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
                                "DynamicQuantizeLinear", "MatMulNBits", "DequantizeLinear"})


def has_subgraphs(node: NodeProto) -> bool:
    """Whether a node carries subgraphs (If branches, Loop/Scan bodies)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


@dataclass(frozen=True, kw_only=True)
class FloatOp:
    """A node left in float, and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Activation:
    """A float tensor flowing between nodes: a candidate for an activation quantizer."""

    name: str
    producer: str | None  # None for a graph input
    consumers: tuple[str, ...]
    shape: tuple[int | None, ...] | None
    # Groups whose activation format this tensor carries by forward propagation.
    source_groups: frozenset[str] = frozenset()


def _declared_outputs_fixed(model: ModelProto, observed: Mapping[str, tuple[int, ...]]
                            ) -> ModelProto:
    """``model`` with the shape of every graph output that its export declared wrongly (a
    rank, or a fixed dim past the sample axis, that the calibration run did not see) replaced
    by its rank, so that a written model states nothing false (an exporter that wrote
    ``[1, seqlen]`` for a ``[T, 1, C]`` output: ONNX Runtime only warns, but onnx's checker
    refuses the quantized model once its opset lets shape inference see through the
    Reshape). The same model when every declaration holds."""
    wrong = []
    for o in model.graph.output:
        seen = observed.get(o.name)
        tt = o.type.tensor_type
        if seen is None or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if len(dims) != len(seen) or any(d is not None and d != s
                                         for d, s in list(zip(dims, seen, strict=True))[1:]):
            wrong.append((o.name, dims, seen))
    if not wrong:
        return model
    m = ModelProto()
    m.CopyFrom(model)
    for name, dims, seen in wrong:
        log.warning("the model declares output '%s' as %s but computes %s (one sample): the "
                    "written models declare its rank, not its dims", name,
                    [d if d is not None else "?" for d in dims], list(seen))
        for o in m.graph.output:
            if o.name == name:
                shape = o.type.tensor_type.shape
                del shape.dim[:]
                for _ in seen:
                    shape.dim.add()
    return m


@dataclass(frozen=True, kw_only=True)
class LayerGraph:
    model: ModelProto  # the prepared model (normalised, shapes inferred)
    graph: nx.DiGraph  # ONNX nodes; edges carry the tensor names in "tensors"
    nodes: Mapping[str, NodeProto]
    order: tuple[str, ...]  # node names in topological order
    layers: Mapping[str, Layer]
    groups: tuple[QuantGroup, ...]
    ties: tuple[Tie, ...]
    float_ops: tuple[FloatOp, ...]
    activations: Mapping[str, Activation]
    constants: frozenset[str]
    tie_ops: frozenset[str] = DEFAULT_TIE_OPS
    _tie_classes: tuple[frozenset[str], ...] = field(default=(), repr=False)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def tie_classes(self) -> tuple[frozenset[str], ...]:
        """Sets of groups that must share an activation format (only sets of two or more)."""
        return self._tie_classes

    def with_observed_shapes(self, observed: Mapping[str, tuple[int, ...]]) -> LayerGraph:
        """This graph with what shape inference left unknown taken from shapes seen at run time
        (``observed``: tensor -> one sample's shape, batch 1): the activation shapes that had
        an unknown dim, and the MACs of layers that had none (run-time padding built from
        Shape/Slice, recurrent stacks). Nothing else changes."""
        acts = dict(self.activations)
        for t, a in self.activations.items():
            seen = observed.get(t)
            if seen is not None and (a.shape is None or None in a.shape) \
                    and (a.shape is None or len(a.shape) == len(seen)):
                acts[t] = dataclasses.replace(a, shape=tuple(seen))
        model = _declared_outputs_fixed(self.model, observed)
        missing = [n for n, layer in self.layers.items() if layer.macs is None]
        if not missing and acts == dict(self.activations) and model is self.model:
            return self
        shapes, _ = _shapes_and_types(self.model)
        shapes = {**shapes, **{t: tuple(s) for t, s in observed.items()}}
        layers = dict(self.layers)
        for name in missing:
            node, info = self.nodes[name], self.op_info(name)
            macs = info.macs(node, shapes) if info is not None and info.macs else None
            if macs is not None:
                layers[name] = dataclasses.replace(layers[name], macs=macs)
        return dataclasses.replace(self, model=model, layers=layers, activations=acts)

    def require_layers(self, name: str = "the model") -> None:
        """Refuse a graph with nothing to quantize, saying why (a ModelError, exit 2)."""
        if self.layers:
            return
        ops = Counter(n.op_type for n in self.nodes.values())
        done = {op: k for op, k in ops.items() if op in _ALREADY_QUANTIZED}
        if done:
            what = ", ".join(f"{k} {op}" for op, k in sorted(done.items()))
            raise ModelError(f"{name} is already quantized ({what}): it has no float layer to "
                             "plan", fix="give mpsearch the FP32 model it was made from")
        bodies = [n.name or n.op_type for n in self.nodes.values() if has_subgraphs(n)]
        if bodies:
            raise ModelError(f"{name} has no quantizable layer in its main graph: its layers "
                             f"are inside the bodies of {', '.join(bodies[:3])} (If/Loop), "
                             "which mpsearch leaves in float",
                             fix="pass --specialize-if to plan the branch the data takes (where "
                                 "its condition is the same on every sample), or export the "
                                 "model without control flow")
        raise ModelError(f"{name} has no quantizable layer (Conv, ConvTranspose, Gemm, or a "
                         "MatMul with a constant weight)", fix="nothing to quantize here")

    def op_info(self, node_name: str) -> OpInfo | None:
        n = self.nodes[node_name]
        return lookup(n.op_type, n.domain)

    def activation_inputs(self, node_name: str) -> list[str]:
        """The float activation (non-constant) inputs the node's registry entry quantizes."""
        node = self.nodes[node_name]
        info = lookup(node.op_type, node.domain)
        idx = range(len(node.input)) if info is None or info.act_inputs is None else info.act_inputs
        return [node.input[i] for i in idx
                if i < len(node.input) and node.input[i] in self.activations]

    @property
    def total_macs(self) -> int:
        return sum(layer.macs or 0 for layer in self.layers.values())

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers.values())


def _shapes_and_types(model: ModelProto) -> tuple[dict[str, tuple], dict[str, int]]:
    shapes: dict[str, tuple] = {}
    types: dict[str, int] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in tt.shape.dim)
    for t in g.initializer:
        types[t.name] = t.data_type
        shapes[t.name] = tuple(t.dims)
    # ONNX shape inference stops at ops it does not know (contrib and custom domains); their
    # outputs take the type of their first typed input, the common case for activations.
    for n in g.node:
        known = next((types[i] for i in n.input if i in types), None)
        for o in n.output:
            if o and o not in types and known is not None:
                types[o] = known
    return shapes, types


def build_layer_graph(model: ModelProto, *,
                      input_shapes: Mapping[str, Iterable[int]] | None = None,
                      tie_ops: Iterable[str] = DEFAULT_TIE_OPS,
                      prepared: bool = False) -> LayerGraph:
    """Build the LayerGraph. ``input_shapes`` fixes dynamic input dims for MAC counting
    (default: every dynamic dim 1); the graph itself keeps its dynamic dims."""
    pm = model if prepared else prepare_model(model)
    fixed = input_shapes if input_shapes is not None else default_input_shapes(pm)
    shaped = with_input_shapes(pm, fixed) if fixed else pm
    shapes, types = _shapes_and_types(shaped)
    g = pm.graph
    constants = frozenset(t.name for t in g.initializer)
    nodes = {n.name: n for n in g.node}
    producer = {o: n.name for n in g.node for o in n.output if o}
    graph_inputs = [i.name for i in g.input if i.name not in constants]

    dg = nx.DiGraph()
    dg.add_nodes_from(nodes)
    consumers: dict[str, list[str]] = {}
    for n in g.node:
        for t in n.input:
            if not t:
                continue
            consumers.setdefault(t, []).append(n.name)
            if t in producer:
                u = producer[t]
                if dg.has_edge(u, n.name):
                    dg.edges[u, n.name]["tensors"].append(t)
                else:
                    dg.add_edge(u, n.name, tensors=[t])
    try:
        order = tuple(nx.topological_sort(dg))
    except nx.NetworkXUnfeasible as e:
        raise ModelError("the graph has a cycle", fix="export a graph without loops") from e

    def is_float_act(t: str) -> bool:
        return bool(t) and t not in constants and types.get(t) == TensorProto.FLOAT

    # Layers and float ops.
    layers: dict[str, Layer] = {}
    float_ops: list[FloatOp] = []
    for name in order:
        n = nodes[name]
        info = lookup(n.op_type, n.domain)
        float_inputs = [t for t in n.input if is_float_act(t)]
        if info is None:
            if float_inputs:
                where = f" (domain {n.domain})" if n.domain not in ("", "ai.onnx") else ""
                float_ops.append(FloatOp(node=name, op_type=n.op_type,
                                         reason=f"{n.op_type}{where} is not in mpsearch's op "
                                                "registry; kept in float"))
            continue
        if info.role is OpRole.LAYER:
            layer = _make_layer(n, info, shapes, types, constants, is_float_act)
            if isinstance(layer, FloatOp):
                float_ops.append(layer)
            elif layer is not None:
                layers[name] = layer

    groups = tuple(QuantGroup(name=name, layer=name, has_weight=layers[name].weight is not None)
                   for name in order if name in layers)

    # Forward propagation of source groups, and ties.
    tie_ops = frozenset(tie_ops)
    float_names = {f.node for f in float_ops}
    source: dict[str, frozenset[str]] = {}
    parent: dict[str, str] = {gr.name: gr.name for gr in groups}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    ties: list[Tie] = []
    for name in order:
        n = nodes[name]
        if name in layers:
            out = frozenset({name})
        elif name in float_names or lookup(n.op_type, n.domain) is None:
            out = frozenset()
        else:
            info = lookup(n.op_type, n.domain)
            idx = range(len(n.input)) if info.act_inputs is None else info.act_inputs
            ins = [n.input[i] for i in idx if i < len(n.input) and is_float_act(n.input[i])]
            srcs = [source.get(t, frozenset()) for t in ins]
            nonempty = [s for s in srcs if s]
            if n.op_type in tie_ops and info.tieable and len(nonempty) >= 2:
                tied = sorted(frozenset().union(*nonempty))
                ties.append(Tie(node=name, op_type=n.op_type, groups=tuple(tied)))
                for other in tied[1:]:
                    ra, rb = find(tied[0]), find(other)
                    if ra != rb:
                        parent[rb] = ra
            out = frozenset().union(*nonempty) if nonempty else frozenset()
        for o in n.output:
            if is_float_act(o):
                source[o] = out

    classes: dict[str, set[str]] = {}
    for gr in groups:
        classes.setdefault(find(gr.name), set()).add(gr.name)
    tie_classes = tuple(frozenset(c) for c in classes.values() if len(c) > 1)

    activations: dict[str, Activation] = {}
    for t in graph_inputs + [o for name in order for o in nodes[name].output]:
        if not is_float_act(t):
            continue
        shp = shapes.get(t)
        activations[t] = Activation(name=t, producer=producer.get(t),
                                    consumers=tuple(consumers.get(t, ())),
                                    shape=shp, source_groups=source.get(t, frozenset()))
    return LayerGraph(model=pm, graph=dg, nodes=nodes, order=order, layers=layers,
                      groups=groups, ties=tuple(ties), float_ops=tuple(float_ops),
                      activations=activations, constants=constants, tie_ops=tie_ops,
                      _tie_classes=tie_classes)


def _make_layer(n: NodeProto, info: OpInfo, shapes: Mapping[str, tuple],
                types: Mapping[str, int], constants: frozenset[str],
                is_float_act) -> Layer | FloatOp | None:
    def attr(name: str, default: int) -> int:
        return next((a.i for a in n.attribute if a.name == name), default)

    ins = list(n.input)
    macs = info.macs(n, shapes) if info.macs else None
    out = n.output[0]
    if n.op_type == "MatMul":
        a_const, b_const = ins[0] in constants, ins[1] in constants
        if a_const and b_const:
            return None  # constant folding territory; nothing to quantize at run time
        if a_const:
            return FloatOp(node=n.name, op_type=n.op_type,
                           reason="MatMul with a constant first operand is not supported; "
                                  "kept in float")
        if not b_const:
            if not (is_float_act(ins[0]) and is_float_act(ins[1])):
                return None
            return Layer(name=n.name, op_type=n.op_type, role=OpRole.ACT_MATMUL,
                         inputs=(ins[0], ins[1]), output=out, macs=macs)
    w = ins[info.weight_input] if info.weight_input is not None else None
    if w is None or w not in constants or types.get(w) != TensorProto.FLOAT:
        return FloatOp(node=n.name, op_type=n.op_type,
                       reason=f"{n.op_type} whose weight is not a float32 initializer; "
                              "kept in float")
    if n.op_type == "Gemm" and attr("transA", 0):
        return FloatOp(node=n.name, op_type=n.op_type,
                       reason="Gemm with transA=1 is not supported; kept in float")
    wshape = tuple(int(d) for d in shapes[w])
    bias = None
    if info.bias_input is not None and len(ins) > info.bias_input and ins[info.bias_input]:
        bias = ins[info.bias_input] if ins[info.bias_input] in constants else None
    params = int(np.prod(wshape)) + (int(np.prod(shapes[bias])) if bias else 0)
    if not is_float_act(ins[0]):
        return FloatOp(node=n.name, op_type=n.op_type,
                       reason=f"{n.op_type} whose input is not a float32 activation; "
                              "kept in float")
    return Layer(name=n.name, op_type=n.op_type, role=OpRole.LAYER, inputs=(ins[0],), output=out,
                 weight=w, bias=bias, weight_shape=wshape,
                 channel_axis=info.weight_axis(n, len(wshape)),
                 conv_groups=attr("group", 1), macs=macs, params=params)
