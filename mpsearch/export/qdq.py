"""Any per-group plan -> a QDQ ONNX model that ONNX Runtime runs.

Every quantized tensor ``t`` becomes ``producer -> t_prequant -> QuantizeLinear ->
DequantizeLinear -> t``, so graph output names are kept and every consumer sees the
dequantized value. Each node carries one activation format (see :mod:`mpsearch.graph.layer_graph`):
a layer takes its group's, other ops inherit the widest format among their producers (or, with no
quantized producer, the widest among their consumers). Where a consumer's format differs from
the producer's, a conversion ``DQ_a -> Q_b -> DQ_b`` is inserted in front of it, the pattern
ORT's ``MixedPrecisionTensorQuantOverridesFixer`` writes and QNN reads as a Convert op.
Weights are stored as integers (or fp8) with a per-channel ``DequantizeLinear`` (pruned weights,
2:4 or unstructured, at the zero point, so the pattern can be read off the file). A layer that
prunes output channels (``+channel@d``) is first written *masked*: full size, the pruned rows at
the zero point and their bias 0, and along its route (:mod:`mpsearch.export.channels`) the same
channels of each depthwise conv's rows and bias and of each Add/Sub constant zeroed, so every
reader of those channels sees exactly 0 (a quantized 0 is exact in every format); then made
physically smaller (:func:`~mpsearch.export.channels.shrink_channels`: those rows, biases,
per-channel scales and the consumers' input columns removed), the same function. A bias next to
an integer weight and activation is stored as int32 with scale ``s_x · s_w`` (zero point 0),
the form Qualcomm's HTP and ORT's QDQ fusions expect.

Why the Q/DQ nodes are written here rather than by ``onnxruntime.quantization.quantize_static``
with tensor overrides: (1) the weights must be written exactly as scored — the MSE-clipped
per-channel scales and, later, Hessian-rounded integers — while ``quantize_static`` recomputes
weight scales from min/max and rounds to nearest; (2) it re-runs its own calibration pass for
every plan (seconds each, and the search exports many plans); (3) docs/design.md §6 lists traps
seen here (an int4 override without ``axis`` silently per tensor; only the first override
entry type-checked; a shared ``-inferred.onnx`` side file that collides between processes).
ORT's overrides remain a product output for users who quantize with ORT (export/overrides.py).

fp16 groups are exported in float with their weights rounded to fp16 (exact for the weights;
the activation rounding of fp16, about 2^-11 relative, is left to the runtime). The opset is
raised only as far as the formats need (int4/int16/uint16: 21; fp8: 19) with ONNX's version
converter, on the float model, before any Q/DQ node is written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mpsearch.core import formats
from mpsearch.core.errors import InternalError
from mpsearch.core.formats import Candidate, Format, FormatKind
from mpsearch.core.ops import OpRole
from mpsearch.export.channels import check_disjoint, masked_constants, shrink_channels
from mpsearch.export.fp8 import fp8_safe_clips
from mpsearch.export.legal import check_plan
from mpsearch.export.opset import model_opset, required_opset, with_opset
from mpsearch.graph.flow import channel_route, node_formats
from mpsearch.graph.ingest import names_used
from mpsearch.graph.layer_graph import Layer, LayerGraph
from mpsearch.graph.ranges import QParams, constant_qparams, qparams_from_range
from mpsearch.quant.analysis import Analysis
from mpsearch.quant.layer import INT32_BIAS_LIMIT, LayerWeights
from mpsearch.quant.parameters import RangeSetter

__all__ = ["QdqModel", "export_qdq", "quantize", "uniform_plan"]

log = logging.getLogger(__name__)

_IR_FOR_TYPE = {TensorProto.INT4: 10, TensorProto.UINT4: 10, TensorProto.FLOAT8E4M3FN: 9,
                TensorProto.FLOAT8E5M2: 9}
# A Sigmoid's or Softmax's uint8 output takes its whole bounds once its calibrated range
# reaches this fraction of them (mpsearch.core.ops: ``snaps``).
SNAP_FRACTION = 0.5


@dataclass(frozen=True, kw_only=True)
class QdqModel:
    """The exported model and what was decided for it."""

    model: onnx.ModelProto
    plan: Mapping[str, Candidate]
    node_formats: Mapping[str, Format]  # activation format of every node (FLOAT: not quantized)
    tensor_formats: Mapping[str, Format]  # format each quantized activation tensor is stored in
    conversions: tuple[tuple[str, Format, Format], ...]  # (tensor, from, to)
    opset: int
    # layer pruning output channels (+channel@d) -> the channels it keeps (the others removed)
    kept_channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def save(self, path: str) -> None:
        onnx.save(self.model, path)


def uniform_plan(lg: LayerGraph, candidate: Candidate) -> dict[str, Candidate]:
    """The same candidate for every group (weightless groups take its activation format)."""
    return {g.name: candidate for g in lg.groups}


class _Writer:
    """Accumulates new nodes and initializers with unique names."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.names = {n.name for n in graph.node} | {t.name for t in graph.initializer}
        self.names |= {o for n in graph.node for o in n.output}
        self.names |= {i.name for i in graph.input}
        # tensor -> the new nodes that read it, placed right after whatever node produces it in
        # the exported graph (the opset converter may have put another node there than in the
        # layer graph: Paddle's Softmax, raised from opset 11, ends in an inserted node)
        self.nodes_after: dict[str, list[onnx.NodeProto]] = {}
        self.front: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.types: set[int] = set()

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def params(self, base: str, qp: QParams) -> tuple[str, str]:
        s = self.unique(f"{base}_scale")
        z = self.unique(f"{base}_zero_point")
        self.inits.append(numpy_helper.from_array(np.asarray(qp.scale, np.float32), s))
        self.inits.append(_zero_point_tensor(z, qp))
        self.types.add(qp.fmt.spec.onnx_type)
        return s, z

    def qdq(self, src: str, dst: str, qp: QParams, after: str | None) -> None:
        """src -Q-> -DQ-> dst, placed after the node that produces tensor ``after`` (None: at
        the front, for a graph input)."""
        s, z = self.params(dst, qp)
        q_out = self.unique(f"{dst}_{qp.fmt}")
        axis = [] if qp.axis is None else [("axis", qp.axis)]
        q = helper.make_node("QuantizeLinear", [src, s, z], [q_out],
                             name=self.unique(f"{dst}_QuantizeLinear"), **dict(axis))
        dq = helper.make_node("DequantizeLinear", [q_out, s, z], [dst],
                              name=self.unique(f"{dst}_DequantizeLinear"), **dict(axis))
        (self.nodes_after.setdefault(after, []) if after else self.front).extend([q, dq])

    def stored(self, base: str, values: np.ndarray, qp: QParams, onnx_type: int,
               dst: str) -> onnx.NodeProto:
        """An initializer of quantized values and the DequantizeLinear that reads it."""
        qname = self.unique(f"{base}_quantized")
        self.inits.append(_quantized_tensor(qname, values, onnx_type))
        if qp.fmt.spec.onnx_type is not None:
            self.types.add(qp.fmt.spec.onnx_type)
        s = self.unique(f"{base}_scale")
        z = self.unique(f"{base}_zero_point")
        self.inits.append(numpy_helper.from_array(np.asarray(qp.scale, np.float32), s))
        if onnx_type == TensorProto.INT32:
            self.inits.append(numpy_helper.from_array(np.zeros(np.shape(qp.scale), np.int32), z))
        else:
            self.inits.append(_zero_point_tensor(z, qp))
        attrs = {} if qp.axis is None else {"axis": qp.axis}
        return helper.make_node("DequantizeLinear", [qname, s, z], [dst],
                                name=self.unique(f"{base}_DequantizeLinear"), **attrs)


def _without_channels(lw: LayerWeights, kept: np.ndarray, axis: int) -> LayerWeights:
    """``lw`` with the output channels not ``kept`` at the zero point and their bias 0."""
    shape = [-1 if i == axis else 1 for i in range(lw.values.ndim)]
    zp = np.asarray(lw.qparams.zero_point)
    zp = zp.reshape(shape) if zp.size > 1 else zp
    values = np.where(kept.reshape(shape), lw.values, zp.astype(lw.values.dtype))
    bias = None if lw.bias is None else np.where(kept, lw.bias, 0).astype(lw.bias.dtype)
    cut = tuple(sorted({*lw.pruned_channels, *(int(i) for i in np.flatnonzero(~kept))}))
    return dataclasses.replace(lw, values=values, bias=bias, pruned_channels=cut)


def _zero_point_tensor(name: str, qp: QParams) -> onnx.TensorProto:
    t = qp.fmt.spec.onnx_type
    zp = np.asarray(qp.zero_point)
    return helper.make_tensor(name, t, list(zp.shape), _flat_values(zp, qp.fmt))


def _flat_values(values: np.ndarray, fmt: Format) -> list:
    v = np.asarray(values)
    if fmt.spec.kind is FormatKind.FP8:
        return v.astype(np.float32).ravel().tolist()
    return v.astype(np.int64).ravel().tolist()


def _packed_nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit values two to a byte, the first in the low nibble, as ``helper.make_tensor``
    stores them (the same bytes; it packs a Python list, 6x slower on EfficientNet-Lite0's
    1280x320 head, and the exports of a run add up to seconds)."""
    flat = np.asarray(values).astype(np.int64).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int64)])
    nib = (flat & 0xF).astype(np.int32)
    return nib[0::2] | (nib[1::2] << 4)


def _quantized_tensor(name: str, values: np.ndarray, onnx_type: int) -> onnx.TensorProto:
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
        t = TensorProto(name=name, data_type=onnx_type, dims=list(values.shape))
        t.int32_data.extend(_packed_nibbles(values).tolist())
        return t
    if onnx_type in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
        t = TensorProto(name=name, data_type=onnx_type, dims=list(values.shape))
        t.raw_data = np.ascontiguousarray(values).view(np.uint8).tobytes()
        return t
    return numpy_helper.from_array(np.ascontiguousarray(values), name)


def quantize(analysis: Analysis, plan: Mapping[str, Candidate] | Candidate, *,
             shrink: bool = True) -> QdqModel:
    """The analysed model quantized by ``plan`` (group -> candidate; one candidate: every
    group takes it) as a QDQ model; any number of plans from one :class:`Analysis`."""
    if isinstance(plan, Candidate):
        plan = uniform_plan(analysis.graph, plan)
    return export_qdq(analysis.graph, plan, analysis.ranges, shrink=shrink)


def export_qdq(lg: LayerGraph, plan: Mapping[str, Candidate], ranges: RangeSetter, *,
               shrink: bool = True, check: bool = True) -> QdqModel:
    """Write ``plan`` (group name -> candidate) as a QDQ model. ``lg.model`` is not modified.
    ``shrink=False``: channel-pruned layers stay masked, full size (module docstring).
    ``check=False``: no ONNX checker pass, for a model only cut and run in ONNX Runtime
    (the measured sensitivities' single-layer plans: the checker serializes the whole model,
    15 ms each on EfficientNet-Lite0, and ORT validates what it loads)."""
    check_plan(lg, plan)
    return _Export(lg, plan, ranges).run(shrink=shrink, check=check)


class _Export:
    """One export: activation Q/DQ, then weights and biases, then constants, then the rewrite."""

    def __init__(self, lg: LayerGraph, plan: Mapping[str, Candidate],
                 ranges: RangeSetter) -> None:
        self.lg, self.plan, self.ranges = lg, plan, ranges
        self.fmt = node_formats(lg, plan)
        used = {f for f in self.fmt.values() if f.is_quantized}
        used |= {c.weight for c in plan.values() if c.weight.is_quantized}
        self.model = with_opset(lg.model, required_opset(used) if used else None)
        g = self.model.graph
        self.nodes = {n.name: n for n in g.node}
        self.inits = {t.name: t for t in g.initializer}
        self.graph_outputs = {o.name for o in g.output}
        self.w = _Writer(g)
        self.tensor_fmt: dict[str, Format] = {}
        self.qparams: dict[tuple[str, Format], QParams] = {}
        self.conversions: list[tuple[str, Format, Format]] = []
        self.renames: dict[str, str] = {}  # producer output renames t -> t_prequant
        self.rewires: dict[tuple[str, str], str] = {}  # (consumer node, tensor) -> new input
        self.kept: dict[str, tuple[int, ...]] = {}  # channel-pruned layer -> kept channels
        self.dw_kept: dict[str, np.ndarray] = {}  # depthwise follower -> kept channels (mask)
        self._channel_routes()

    def _channel_routes(self) -> None:
        """The masked original (module docstring): which channels each +channel@d layer keeps,
        its depthwise followers' masks, and its Add/Sub constants zeroed in the model copy."""
        lg = self.lg
        routes = {g: channel_route(lg, g) for g, c in self.plan.items()  # legal: check_plan
                  if c.sparsity is not None and c.sparsity.pattern == "channel"}
        check_disjoint(routes)
        for g, route in routes.items():
            c = self.plan[g]
            cut = self.ranges.layer(lg.layers[g], c.weight, sparsity=c.sparsity).pruned_channels
            kept = np.ones(route.channels, dtype=bool)
            kept[list(cut)] = False
            self.kept[g] = tuple(int(i) for i in np.flatnonzero(kept))
            for node in route.depthwise:
                self.dw_kept[node] = kept
            for (node, slot), arr in masked_constants(lg, route, self.kept[g]).items():
                n = self.nodes[node]
                name = self.w.unique(f"{n.input[slot]}_masked")
                t = numpy_helper.from_array(arr, name)
                self.model.graph.initializer.append(t)
                self.inits[name] = t
                n.input[slot] = name
        if self.kept:
            log.info("channel pruning, masked: %s", ", ".join(
                f"{g} {len(k)}/{lg.layers[g].out_channels}" for g, k in self.kept.items()))

    def run(self, *, shrink: bool, check: bool) -> QdqModel:
        for t in _tensor_order(self.lg):
            self._activation(t)
        for name, layer in self.lg.layers.items():
            if layer.weight is not None:
                self._weight(name, layer)
        for name in self.lg.order:
            if name not in self.lg.layers and self.fmt[name].is_quantized:
                self._constants(name)
        self._rewrite()
        model = self.model
        if self.kept and shrink:  # the masked model made smaller, the same function
            model = shrink_channels(self.lg, self.kept, model=model).model
        try:
            if check:
                onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise InternalError(f"the exported model of {self.lg.model.graph.name or 'the model'}"
                                f" fails the ONNX checker ({str(e).splitlines()[0]}): this is "
                                "a bug in mpsearch; please report it with the model") from e
        return QdqModel(model=model, plan=dict(self.plan), node_formats=self.fmt,
                        tensor_formats=self.tensor_fmt, conversions=tuple(self.conversions),
                        opset=model_opset(model), kept_channels=dict(self.kept))

    # -- activations

    def _q_inputs(self, node_name: str) -> list[str]:
        if node_name in self.lg.layers:
            return list(self.lg.layers[node_name].inputs)
        return self.lg.activation_inputs(node_name)

    def _params(self, t: str, f: Format) -> QParams:
        key = (t, f)
        if key not in self.qparams:
            lg = self.lg
            producer = lg.activations[t].producer
            info = lg.op_info(producer) if producer else None
            qp = None
            if info is not None and producer not in lg.layers:
                src = lg.activation_inputs(producer)
                if info.u16_encoding is not None and f is Format.UINT16:
                    scale, zp = info.u16_encoding
                    qp = QParams(fmt=f, scale=np.float32(scale),
                                 zero_point=np.asarray(zp, np.int64),
                                 rmin=-zp * scale, rmax=(65535 - zp) * scale)
                elif info.snaps and info.bounds and f is Format.UINT8:
                    qp = self.ranges.activation(self._range_source(t, f), f)
                    if qp.rmax >= SNAP_FRACTION * info.bounds[1]:
                        qp = qparams_from_range(*info.bounds, f)
                elif ((info.role is OpRole.PASSTHROUGH or info.fuses_into_producer)
                      and src and (src[0], f) in self.qparams):
                    qp = self.qparams[(src[0], f)]
                elif info.selects and src and all((x, f) in self.qparams for x in src):
                    qps = [self.qparams[(x, f)] for x in src]
                    qp = qparams_from_range(min(q.rmin for q in qps), max(q.rmax for q in qps), f)
            self.qparams[key] = qp or self.ranges.activation(self._range_source(t, f), f)
        return self.qparams[key]

    def _range_source(self, t: str, f: Format) -> str:
        """The tensor whose range ``t`` takes: the output of a Relu/Clip that is ``t``'s only
        consumer and runs in the same format, else ``t`` itself."""
        cons = self.lg.activations[t].consumers
        if t in self.graph_outputs or len(cons) != 1:
            return t
        info, node = self.lg.op_info(cons[0]), self.lg.nodes[cons[0]]
        if (info is not None and info.fuses_into_producer and self.fmt[cons[0]] is f
                and node.input[0] == t and node.output[0] in self.ranges.stats):
            return node.output[0]
        return t

    def _activation(self, t: str) -> None:
        producer = self.lg.activations[t].producer
        pf = self.fmt.get(producer) if producer else None
        needs: dict[Format, list[str]] = {}
        for c in self.lg.activations[t].consumers:
            if t in self._q_inputs(c) and self.fmt[c].is_quantized:
                needs.setdefault(self.fmt[c], []).append(c)
        w = self.w
        if pf is not None and pf.is_quantized:
            pre = w.unique(f"{t}_prequant")
            self.renames[t] = pre
            w.qdq(pre, t, self._params(t, pf), after=pre)
            self.tensor_fmt[t] = pf
        for f, consumers in needs.items():
            if f is pf:
                continue
            dst = w.unique(f"{t}_{f}")
            w.qdq(t, dst, self._params(t, f), after=t if producer else None)
            if pf is not None and pf.is_quantized:
                self.conversions.append((t, pf, f))
            else:
                self.tensor_fmt.setdefault(t, f)
            for c in consumers:
                self.rewires[(c, t)] = dst

    # -- weights and biases

    def _weight(self, name: str, layer: Layer) -> None:
        w, wf = self.w, self.plan[name].weight
        shared = sum(1 for x in self.lg.layers.values() if x.weight == layer.weight) > 1
        base = f"{layer.weight}_{name}" if shared else layer.weight
        kept = self.dw_kept.get(name)  # a depthwise conv on a pruned layer's route
        if not wf.is_quantized and (wf is Format.FP16 or kept is not None):
            arr = numpy_helper.to_array(self.inits[layer.weight])
            if wf is Format.FP16:
                arr = arr.astype(np.float16).astype(np.float32)
            if kept is not None:
                arr = np.where(kept.reshape(-1, *[1] * (arr.ndim - 1)), arr, 0).astype(arr.dtype)
            dst = w.unique(f"{base}_fp16rounded" if wf is Format.FP16 else f"{base}_masked")
            w.inits.append(numpy_helper.from_array(arr, dst))
            self.rewires[(name, layer.weight)] = dst
        if not wf.is_quantized:
            if kept is not None and layer.bias:
                b = numpy_helper.to_array(self.inits[layer.bias])
                bdst = w.unique(f"{layer.bias}_masked")
                w.inits.append(numpy_helper.from_array(np.where(kept, b, 0).astype(b.dtype),
                                                       bdst))
                self.rewires[(name, layer.bias)] = bdst
            return
        af = self.fmt[name]
        int_bias = (layer.bias is not None and af.spec.kind is FormatKind.INT
                    and wf.spec.kind is FormatKind.INT)
        s_x = float(self._params(layer.inputs[0], af).scale) if int_bias else None
        lw = self.ranges.layer(layer, wf, sparsity=self.plan[name].sparsity, input_scale=s_x)
        if kept is not None:
            lw = _without_channels(lw, kept, layer.channel_axis)
        dst = w.unique(f"{base}_dequantized")
        w.front.append(w.stored(base, lw.values, lw.qparams, wf.spec.onnx_type, dst))
        self.rewires[(name, layer.weight)] = dst
        if int_bias:
            s_b = np.float64(s_x) * lw.qparams.scale.astype(np.float64)
            qb = np.clip(np.rint(lw.bias.astype(np.float64) / s_b), -INT32_BIAS_LIMIT,
                         INT32_BIAS_LIMIT)
            # Stored as TensorProto.INT32 with zero point 0 (w.stored); ``fmt`` is read only
            # for the set of quantized types the graph declares, and there is no int32 Format.
            bqp = QParams(fmt=Format.INT8, scale=s_b.astype(np.float32),
                          zero_point=np.zeros(s_b.shape, np.int64), axis=0)
            bdst = w.unique(f"{layer.bias}_dequantized")
            w.front.append(w.stored(layer.bias, qb.astype(np.int32), bqp, TensorProto.INT32,
                                    bdst))
            self.rewires[(name, layer.bias)] = bdst
        elif layer.bias and (lw.bias_shift > 0 or lw.pruned_channels):  # float, changed
            bdst = w.unique(f"{layer.bias}_corrected")
            w.inits.append(numpy_helper.from_array(lw.bias.astype(np.float32), bdst))
            self.rewires[(name, layer.bias)] = bdst

    # -- constant inputs of quantized element-wise ops (Add bias, Mul scale, LN gamma)

    def _constants(self, name: str) -> None:
        node, info = self.nodes[name], self.lg.op_info(name)
        idx = range(len(node.input)) if info.act_inputs is None else info.act_inputs
        positions = [(i, self.fmt[name]) for i in idx if i < len(node.input)]
        positions += [(i, Format.UINT8) for i in info.const_inputs if i < len(node.input)]
        for i, cf in positions:
            c = node.input[i]
            if c not in self.inits or self.inits[c].data_type != TensorProto.FLOAT:
                continue
            arr = numpy_helper.to_array(self.inits[c])
            qp = constant_qparams(arr, cf)
            dst = self.w.unique(f"{c}_dequantized")
            self.w.front.append(self.w.stored(c, formats.quantize(arr, cf, qp.scale, qp.zero_point),
                                              qp, cf.spec.onnx_type, dst))
            self.rewires[(name, c)] = dst

    # -- the rewrite

    def _rewrite(self) -> None:
        g, w = self.model.graph, self.w
        new_nodes: list[onnx.NodeProto] = []

        def emit(node: onnx.NodeProto) -> None:  # the node, then what reads its outputs
            new_nodes.append(node)
            for out in node.output:
                for n in w.nodes_after.pop(out, []):
                    emit(n)

        for node in w.front:
            emit(node)
        for node in g.node:
            for k, out in enumerate(node.output):
                if out in self.renames:
                    node.output[k] = self.renames[out]
            for k, inp in enumerate(node.input):
                if (node.name, inp) in self.rewires:
                    node.input[k] = self.rewires[(node.name, inp)]
            emit(node)
        if w.nodes_after:
            raise InternalError(f"no node of the exported model produces {sorted(w.nodes_after)[0]}"
                                ", which a quantizer reads: this is a bug in mpsearch; please "
                                "report it with the model")
        new_nodes = fp8_safe_clips(new_nodes, w)
        del g.node[:]
        g.node.extend(new_nodes)
        g.initializer.extend(w.inits)
        still_used = names_used(g)  # subgraphs' reads of outer initializers count
        keep = [t for t in g.initializer if t.name in still_used]
        del g.initializer[:]
        g.initializer.extend(keep)
        self.model.ir_version = max([_IR_FOR_TYPE.get(t, 0) for t in w.types]
                                    + [self.model.ir_version])


def _tensor_order(lg: LayerGraph) -> list[str]:
    """Activation tensors: graph inputs first, then node outputs in topological order."""
    inputs = [t for t, a in lg.activations.items() if a.producer is None]
    produced = [o for n in lg.order for o in lg.nodes[n].output if o in lg.activations]
    return inputs + produced
