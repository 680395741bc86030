"""ONNX ingestion: load a model file (with external data), run the checker, and normalise it.

Normalisation: node names made unique, ``Constant`` nodes turned into initializers,
initializers removed from the graph inputs, ``BatchNormalization`` after a ``Conv`` folded into
it: ``W' = W·γ/√(σ²+ε)`` per output channel, ``b' = (b - μ)·γ/√(σ²+ε) + β``; the exact GELU
written out as ``x·(1 + erf(x/√2))·0.5`` (PaddlePaddle's and older PyTorch exports, in any order
of the products) replaced by one ``Gelu`` node (ONNX's from opset 20, else ONNX Runtime's
``com.microsoft.Gelu``), the same function: QNN's HTP has no ``Erf`` but runs ``Gelu`` (the
zoo's PaddleOCR v5/v6 networks were refused whole for their 13 ``Erf`` nodes); a ``Clip`` whose
limit is computed at run time (a dB spectrogram's top-dB floor, ``max(S) - 80``) written as
``Max(x, lo)`` and ``Min(·, hi)``, the same function: QNN supports no dynamic Clip limits
(openWakeWord's mel front end was refused for its one such Clip); ``Pow(x, 2)`` written as
``Mul(x, x)``, the same function: the HTP's quantized Pow of large values (a power spectrum of
int16-scale audio, squares ~1e10) agrees with the CPU EP at 0 dB, its Mul exactly
(tests/test_verify.py); then ONNX shape inference.
Every function returns a new model; the argument is never modified.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, NodeProto, numpy_helper

from mpsearch.core.errors import ModelError
from mpsearch.data.spec import input_specs

__all__ = ["GraphIndex", "default_input_shapes", "graph_index", "keep_nodes", "load_model",
           "names_used", "outer_references", "prepare_model", "scalar_value",
           "strip_debug_metadata", "with_input_shapes"]

log = logging.getLogger(__name__)


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


MS_DOMAIN = "com.microsoft"


def scalar_value(inits: Mapping[str, onnx.TensorProto], name: str) -> float | None:
    """The value of a one-element initializer, None for anything else."""
    t = inits.get(name)
    if t is None:
        return None
    v = numpy_helper.to_array(t)
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def _fuse_gelu(model: ModelProto) -> int:
    """Replace each ``Mul(Mul(x, Add(Erf(x / √2), 1)), 0.5)`` (the products in any order, the
    division also as a product by 1/√2) whose inner tensors feed nothing else by one ``Gelu``
    node; how many were fused (module docstring)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}

    def const_is(name: str, value: float) -> bool:
        v = scalar_value(inits, name)
        return v is not None and abs(v - value) <= 1e-4 * abs(value)

    def other(node: NodeProto, name: str) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(node.input) == 2 and len(rest) == 1 else None

    def only_use(t: str, node: NodeProto) -> bool:
        return t not in outputs and [c.name for c in consumers.get(t, [])] == [node.name]

    fused, removed, replace = 0, set(), {}
    for erf in g.node:
        if erf.op_type != "Erf" or erf.domain not in ("", "ai.onnx"):
            continue
        scale = producer.get(erf.input[0])
        if scale is None or not only_use(scale.output[0], erf):
            continue
        if scale.op_type == "Div" and const_is(scale.input[1], 2 ** 0.5):
            x = scale.input[0]
        elif scale.op_type == "Mul" and (c := next((i for i in scale.input
                                                    if const_is(i, 2 ** -0.5)), None)):
            x = other(scale, c)
        else:
            continue
        chain = [scale, erf]
        add = (consumers.get(erf.output[0]) or [None])[0]
        if add is None or add.op_type != "Add" or not only_use(erf.output[0], add) or \
                not const_is(other(add, erf.output[0]) or "", 1.0):
            continue
        chain.append(add)
        # the two products, x·(…) and ·0.5, in either order
        t, have_x, have_half = add.output[0], False, False
        while not (have_x and have_half):
            cons = consumers.get(t, [])
            if len(cons) != 1 or cons[0].op_type != "Mul" or t in outputs:
                break
            mul = cons[0]
            o = other(mul, t)
            if o == x and not have_x:
                have_x = True
            elif o is not None and const_is(o, 0.5) and not have_half:
                have_half = True
            else:
                break
            chain.append(mul)
            t = mul.output[0]
        if not (have_x and have_half) or x is None:
            continue
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        gelu = onnx.helper.make_node("Gelu", [x], [t], name=f"{erf.name}/Gelu",
                                     domain="" if opset >= 20 else MS_DOMAIN)
        replace[id(chain[0])] = gelu
        removed |= {id(n) for n in chain[1:]}
        fused += 1
    if fused:
        keep_nodes(g, [replace.get(id(n), n) for n in g.node if id(n) not in removed])
        if any(n.domain == MS_DOMAIN for n in g.node) and \
                not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return fused


def _split_dynamic_clips(graph: onnx.GraphProto) -> int:
    """Replace each ``Clip`` with a limit that is not a constant by ``Max(x, lo)`` then
    ``Min(·, hi)`` (module docstring); how many were replaced."""
    inits = {t.name for t in graph.initializer}
    used = names_used(graph)

    def limit(node: NodeProto, i: int) -> str:
        return node.input[i] if len(node.input) > i else ""

    nodes, split = [], 0
    for n in graph.node:
        lo, hi = (limit(n, 1), limit(n, 2)) if n.op_type == "Clip" else ("", "")
        if n.domain not in ("", "ai.onnx") or not any(t and t not in inits for t in (lo, hi)):
            nodes.append(n)
            continue
        steps = [(op, t) for op, t in (("Max", lo), ("Min", hi)) if t]
        x = n.input[0]
        for k, (op, t) in enumerate(steps):
            y = n.output[0]
            if k < len(steps) - 1:
                y = f"{n.output[0]}/{op}"
                while y in used:
                    y += "_"
                used.add(y)
            nodes.append(onnx.helper.make_node(op, [x, t], [y], name=f"{n.name}/{op}"))
            x = y
        split += 1
    if split:
        keep_nodes(graph, nodes)
    return split


def _square_pows(graph: onnx.GraphProto) -> int:
    """Replace each ``Pow(x, 2)`` (a constant exponent of exactly 2) by ``Mul(x, x)`` (module
    docstring); how many were replaced."""
    inits = {t.name: t for t in graph.initializer}
    nodes, done = [], 0
    for n in graph.node:
        if (n.op_type == "Pow" and n.domain in ("", "ai.onnx") and len(n.input) == 2
                and scalar_value(inits, n.input[1]) == 2.0):
            nodes.append(onnx.helper.make_node("Mul", [n.input[0], n.input[0]], list(n.output),
                                               name=n.name))
            done += 1
        else:
            nodes.append(n)
    if done:
        keep_nodes(graph, nodes)
    return done


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
        keep_nodes(graph, [n for n in graph.node if id(n) not in removed])
    return folded


def keep_nodes(graph: onnx.GraphProto, nodes: list[NodeProto]) -> None:
    """Make ``nodes`` the graph's nodes, and drop the initializers none of them reads."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = names_used(graph)
    keep_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)


def prepare_model(model: ModelProto) -> ModelProto:
    """Return a normalised copy: unique node names, Constant nodes as initializers, BN folded,
    initializers removed from the graph inputs, the rewrites of the module docstring, shapes
    inferred. The argument is not modified."""
    m = copy.deepcopy(model)
    g = m.graph
    _name_nodes(g)
    _constants_to_initializers(g)
    init_names = {t.name for t in g.initializer}
    if any(i.name in init_names for i in g.input):
        real = [i for i in g.input if i.name not in init_names]
        del g.input[:]
        g.input.extend(real)
    rewrites = ((lambda: _fold_batchnorm(g), "folded %d BatchNormalization nodes into their Conv"),
                (lambda: _fuse_gelu(m), "fused %d GELUs written with Erf into Gelu nodes"),
                (lambda: _split_dynamic_clips(g), "wrote %d Clips with run-time limits as Max/Min"),
                (lambda: _square_pows(g), "wrote %d Pow(x, 2) as Mul(x, x)"))
    for rewrite, message in rewrites:  # in order: each sees the graph the one before left
        if count := rewrite():
            log.info(message, count)
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


def default_input_shapes(model: ModelProto) -> dict[str, tuple[int, ...]]:
    """Input shapes with every dynamic dimension set to 1 (batch 1, shortest sequence)."""
    return {name: tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)
            for name, (_, shape) in input_specs(model).items()}


def strip_debug_metadata(model: ModelProto) -> ModelProto:
    """A copy without the exporter's per-node debug records (doc strings and metadata such as
    ``pkg.torch.onnx.stack_trace``, which holds absolute source paths): the same model then
    has the same bytes wherever it was exported."""
    m = copy.deepcopy(model)
    for node in m.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        del vi.metadata_props[:]
    for t in m.graph.initializer:
        del t.metadata_props[:]
    return m


def outer_references(node: NodeProto) -> set[str]:
    """The names a node's subgraphs (``If`` branches, ``Loop``/``Scan`` bodies, nested) read
    from the enclosing scopes: inputs they use but do not define themselves."""
    out: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            defined = {t.name for t in g.initializer} | {i.name for i in g.input} | \
                {o for n in g.node for o in n.output}
            for n in g.node:
                out |= {i for i in n.input if i and i not in defined}
                out |= outer_references(n) - defined
    return out


def names_used(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's nodes read, their subgraphs' outer-scope reads included:
    what must stay when unused initializers are dropped."""
    used = {i for n in graph.node for i in n.input}
    for n in graph.node:
        used |= outer_references(n)
    return used | {o.name for o in graph.output}


@dataclass(frozen=True)
class GraphIndex:
    """Look-ups over one graph: initializers by name, the node producing each tensor, and the
    nodes consuming it."""

    inits: dict[str, onnx.TensorProto]
    producer: dict[str, NodeProto]
    consumers: dict[str, list[NodeProto]]


def graph_index(graph: onnx.GraphProto) -> GraphIndex:
    consumers: dict[str, list[NodeProto]] = {}
    for n in graph.node:
        for i in (*n.input, *sorted(outer_references(n) - set(n.input))):
            consumers.setdefault(i, []).append(n)
    return GraphIndex(inits={t.name: t for t in graph.initializer},
                      producer={o: n for n in graph.node for o in n.output},
                      consumers=consumers)
