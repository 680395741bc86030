"""ONNX ingestion: load, check, normalise, infer shapes, and build the :class:`LayerGraph`.

The LayerGraph is what the later stages reason about:

* **layers**: nodes that do the MACs (Conv incl. grouped/depthwise, ConvTranspose, Gemm,
  MatMul with a constant operand, MatMul between two activations), with MACs per sample and
  parameter counts (see :mod:`mpsearch.ops`);
* **quantizer groups**: one per layer. A group takes one decision, a candidate
  ``(weight format, activation format)``; the activation format holds for the layer's inputs
  and output, and flows forward through the element-wise and data-movement ops that follow it
  (Clip, Reshape, ...) until the next layer. Every quantized node therefore sees one activation
  type on all its ports, which Qualcomm's HTP compiler requires (DESIGN.md §4);
* **ties**: the activation inputs of Add/Sub/Mul/Concat come from groups that must share an
  activation format when the hardware says so (union-find over those groups);
* **float ops**: ops with float activations that the registry does not know stay in float,
  each with its reason.

Normalisation: node names made unique, ``Constant`` nodes turned into initializers,
``BatchNormalization`` after a ``Conv`` folded into it:
``W' = W·γ/√(σ²+ε)`` per output channel, ``b' = (b - μ)·γ/√(σ²+ε) + β``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, NodeProto, TensorProto, numpy_helper

from mpsearch.errors import ModelError
from mpsearch.ops import OpInfo, OpRole, lookup

__all__ = [
    "Activation",
    "FloatOp",
    "Layer",
    "LayerGraph",
    "QuantGroup",
    "Tie",
    "build_layer_graph",
    "load_model",
    "prepare_model",
]

log = logging.getLogger(__name__)

DEFAULT_TIE_OPS = frozenset({"Add", "Sub", "Mul", "Concat"})


# --------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike[str]) -> ModelProto:
    """Read an ONNX file (with its external data) and run the ONNX checker on it."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file {p} does not exist", fix="check the path")
    if not p.is_file():
        raise ModelError(f"model path {p} is not a file", fix="pass the .onnx file itself")
    if p.stat().st_size == 0:
        raise ModelError(f"model file {p} is empty", fix="re-export the model")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except DecodeError as e:
        raise ModelError(
            f"{p} is not a readable ONNX model (protobuf decode failed: {e})",
            fix="the file is truncated or not ONNX; re-export it",
        ) from e
    except FileNotFoundError as e:
        raise ModelError(f"{p} refers to external data that is missing ({e.filename})",
                         fix="keep the .data file next to the model") from e
    except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise ModelError(f"{p} cannot be loaded ({e})", fix="re-export the model") from e
    if not model.graph.node:
        raise ModelError(f"{p} has no graph nodes (not an ONNX model, or an empty one)",
                         fix="pass an exported ONNX model file")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{p} fails the ONNX checker: {first}",
                         fix="fix or re-export the model") from e
    return model


# --------------------------------------------------------------------------- normalising


def _name_nodes(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = {a.name: a for a in node.attribute}
            if "value" in attr:
                t = copy.deepcopy(attr["value"].t)
                t.name = node.output[0]
                graph.initializer.append(t)
                continue
            if "value_float" in attr or "value_floats" in attr:
                v = onnx.helper.get_attribute_value(next(iter(attr.values())))
                graph.initializer.append(
                    numpy_helper.from_array(np.asarray(v, np.float32), node.output[0]))
                continue
            if "value_int" in attr or "value_ints" in attr:
                v = onnx.helper.get_attribute_value(next(iter(attr.values())))
                graph.initializer.append(
                    numpy_helper.from_array(np.asarray(v, np.int64), node.output[0]))
                continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _fold_batchnorm(graph: onnx.GraphProto) -> int:
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    removed: set[int] = set()
    folded = 0
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in inits:
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in outputs:
            continue
        if not all(i in inits for i in bn.input[1:5]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64)
                                  for i in bn.input[1:5])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
        k = gamma / np.sqrt(var + eps)
        w_new = (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        b_new = ((b - mean) * k + beta).astype(np.float32)
        wname, bname = f"{conv.name}.weight_bnfolded", f"{conv.name}.bias_bnfolded"
        graph.initializer.extend([numpy_helper.from_array(w_new, wname),
                                  numpy_helper.from_array(b_new, bname)])
        del conv.input[1:]
        conv.input.extend([wname, bname])
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    if removed:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
        used = {i for n in graph.node for i in n.input}
        keep_init = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep_init)
    return folded


def prepare_model(model: ModelProto) -> ModelProto:
    """Return a normalised copy: unique node names, Constant nodes as initializers, BN folded,
    initializers removed from the graph inputs, shapes inferred. The argument is not modified."""
    m = copy.deepcopy(model)
    g = m.graph
    _name_nodes(g)
    _constants_to_initializers(g)
    init_names = {t.name for t in g.initializer}
    if any(i.name in init_names for i in g.input):
        real = [i for i in g.input if i.name not in init_names]
        del g.input[:]
        g.input.extend(real)
    folded = _fold_batchnorm(g)
    if folded:
        log.info("folded %d BatchNormalization nodes into their Conv", folded)
    return _infer_shapes(m)


def _infer_shapes(model: ModelProto) -> ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001 - inference is best effort, shapes come from data too
        log.warning("ONNX shape inference failed (%s); shapes will come from the data", e)
        return model


def with_input_shapes(model: ModelProto, shapes: Mapping[str, Iterable[int]]) -> ModelProto:
    """A copy whose graph inputs have fixed shapes (dynamic dims set), shapes re-inferred."""
    m = copy.deepcopy(model)
    for vi in m.graph.input:
        if vi.name not in shapes:
            continue
        dims = list(shapes[vi.name])
        tt = vi.type.tensor_type
        del tt.shape.dim[:]
        for d in dims:
            tt.shape.dim.add().dim_value = int(d)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    return _infer_shapes(m)


def input_specs(model: ModelProto) -> dict[str, tuple[int, tuple[int | str | None, ...]]]:
    """Graph inputs (initializers excluded): name -> (ONNX elem type, shape with symbols)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[vi.name] = (tt.elem_type, tuple(dims))
    return out


def default_input_shapes(model: ModelProto) -> dict[str, tuple[int, ...]]:
    """Input shapes with every dynamic dimension set to 1 (batch 1, shortest sequence)."""
    return {name: tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)
            for name, (_, shape) in input_specs(model).items()}


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
