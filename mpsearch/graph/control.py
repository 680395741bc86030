"""Control flow in a form the target runs: an ``If`` whose condition is the same on every sample
is replaced by the branch taken (opt-in: ``--specialize-if``); on a target with no control flow
(QNN's HTP), an ``If`` the data decides both ways computes both branches and selects.

Speech and wake-word exports put their whole network inside ``If`` branches (Silero VAD: one
branch per sample rate, chosen by a scalar ``sr`` input the data gives once), so the main graph
has no layer to plan and QNN's HTP cannot run an ``If`` at all. Where the condition evaluates to
one value over all the calibration samples, the ``If`` node is replaced by that branch's nodes
(its own initializers lifted, its outputs bound to the ``If``'s by ``Identity`` nodes), then
the nodes no output depends on any more (the condition's) are removed; nested ``If`` nodes
are specialised in turn. The model then computes exactly what it computed on that data, and
nothing else: an input that would take the other branch is not served, which the run states
(``plan.json`` ``specialized``, the report, stderr). Inputs stay as declared, so the shipped
file keeps its interface. ``Loop`` and ``Scan`` bodies are left as they are.

**Both branches and a select** (:func:`select_ifs`). QNN's HTP has no ``If``: a wake-word
model whose verifier network runs only when the detector fires (openWakeWord's *hey jarvis*:
``If(Sigmoid(x) >= 0.5)``) does not compile there, whatever the plan. ONNX branches have no side
effects, so ``If(c, then, else)`` equals ``Where(c, then(), else())`` wherever both branches
compute outputs of one shape: both are inlined into the main graph (their tensors and nodes
renamed under the ``If``'s name, their outer-scope reads kept) and each output becomes a
``Where`` on the condition, reshaped to a scalar. The model computes exactly what it computed,
for every input, at the cost of always running both branches; the run states which ``If`` was
rewritten. An ``If`` whose branches hold control flow of their own, or whose outputs' shapes
differ or are unknown, is left as it is (the device check then names it).

Written here: ONNX's own tools inline functions, not branches.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from mpsearch.core.errors import DataError

__all__ = ["Specialized", "condition_values", "require_one_branch", "select_ifs",
           "specialize_ifs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Specialized:
    """One ``If`` replaced by the branch the data takes."""

    node: str
    condition: str  # the tensor it tests
    value: bool | None  # its value on every sample; None: it varies (both branches kept)
    branch: str  # "then_branch", "else_branch", or "both" (computed both, then a Where)
    nodes: int  # how many nodes the branch (both: the branches) brought in

    def describe(self) -> str:
        if self.branch == "both":
            return (f"If '{self.node}' computed as both branches and a Where on "
                    f"'{self.condition}' ({self.nodes} nodes): the target has no If; the "
                    "model computes the same outputs, always running both branches")
        return (f"If '{self.node}' replaced by its {self.branch.split('_')[0]} branch "
                f"({self.nodes} nodes): '{self.condition}' is {str(self.value).lower()} on "
                "every calibration sample, so the shipped model computes only that branch")

    def to_dict(self) -> dict:
        return {"node": self.node, "condition": self.condition, "value": self.value,
                "branch": self.branch, "nodes": self.nodes, "description": self.describe()}


def condition_values(model: ModelProto, batches: Iterable[Mapping[str, np.ndarray]]
                     ) -> dict[str, set[bool]]:
    """Per top-level ``If`` node (by name), the values its condition took over ``batches``."""
    from mpsearch.graph.calibrate import make_session

    ifs = [n for n in model.graph.node if n.op_type == "If"]
    if not ifs:
        return {}
    consts = {t.name: t for t in model.graph.initializer}
    m = copy.deepcopy(model)
    known = {o.name for o in m.graph.output}
    wanted = []
    for n in ifs:
        c = n.input[0]
        if c not in consts and c not in wanted:
            wanted.append(c)
            if c not in known:
                m.graph.output.append(helper.make_tensor_value_info(c, onnx.TensorProto.BOOL,
                                                                    None))
    seen: dict[str, set[bool]] = {c: set() for c in wanted}
    if wanted:
        sess = make_session(m)
        feeds = {i.name for i in sess.get_inputs()}
        for batch in batches:
            for c, v in zip(wanted, sess.run(wanted, {k: v for k, v in batch.items()
                                                      if k in feeds}), strict=True):
                seen[c] |= {bool(x) for x in np.asarray(v).reshape(-1)}
    out = {}
    for n in ifs:
        c = n.input[0]
        out[n.name] = ({bool(numpy_helper.to_array(consts[c]).reshape(-1)[0])} if c in consts
                       else seen[c])
    return out


def specialize_ifs(model: ModelProto, batches: Iterable[Mapping[str, np.ndarray]], *,
                   name: str = "the data") -> tuple[ModelProto, tuple[Specialized, ...]]:
    """``model`` with every ``If`` whose condition is constant over ``batches`` replaced by the
    branch taken, and what was replaced (module docstring). An ``If`` whose condition varies
    is left as it is. ``batches`` must be re-iterable (a list), it is read once per level of
    nesting."""
    batches = list(batches)
    m = copy.deepcopy(model)
    done: list[Specialized] = []
    for _ in range(8):  # nested Ifs surface one level per pass
        values = condition_values(m, batches)
        fixed = {k: next(iter(v)) for k, v in values.items() if len(v) == 1}
        for k, v in values.items():
            if len(v) > 1:
                log.info("If '%s' takes both branches on %s: left as it is", k, name)
        if not fixed:
            break
        done += _inline(m, fixed)
    _drop_dead(m.graph)
    return m, tuple(done)


def _inline(m: ModelProto, fixed: Mapping[str, bool]) -> list[Specialized]:
    g = m.graph
    nodes, done = [], []
    for n in g.node:
        if n.op_type != "If" or n.name not in fixed:
            nodes.append(n)
            continue
        key = "then_branch" if fixed[n.name] else "else_branch"
        body = next(a.g for a in n.attribute if a.name == key)
        g.initializer.extend(body.initializer)
        nodes.extend(body.node)
        for out, res in zip(n.output, body.output, strict=True):
            nodes.append(helper.make_node("Identity", [res.name], [out],
                                          name=f"{n.name}/{key}/{out}"))
        done.append(Specialized(node=n.name, condition=n.input[0], value=fixed[n.name],
                                branch=key, nodes=len(body.node)))
    del g.node[:]
    g.node.extend(nodes)
    return done


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove the nodes no graph output depends on, and the initializers no node reads."""
    from mpsearch.graph.ingest import keep_nodes, outer_references

    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed |= set(n.input) | outer_references(n)
    if len(keep) < len(g.node):
        keep_nodes(g, keep[::-1])


def require_one_branch(specialized: tuple[Specialized, ...], model: ModelProto,
                       batches: Iterable[Mapping[str, np.ndarray]], *, name: str) -> None:
    """Refuse data (``name``: e.g. the evaluation data) on which a specialised ``If`` of the
    original ``model`` would take the other branch."""
    if not specialized:
        return
    values = condition_values(model, batches)
    for s in specialized:
        if s.branch == "both":
            continue
        other = values.get(s.node, set()) - {s.value}
        if other:
            took = s.branch.split("_")[0]
            raise DataError(f"{name} takes the {'else' if took == 'then' else 'then'} branch "
                            f"of If '{s.node}' ('{s.condition}' is "
                            f"{str(next(iter(other))).lower()} there), the calibration data "
                            f"the {took} branch, the only one the specialised model computes",
                            fix="calibrate and evaluate on data of one kind (e.g. one sample "
                                "rate), or drop --specialize-if")


def select_ifs(model: ModelProto) -> tuple[ModelProto, tuple[Specialized, ...]]:
    """``model`` with each top-level ``If`` that can be computed as both branches and a
    ``Where`` so rewritten, and what was rewritten (module docstring); the rest unchanged."""
    chosen = {n.name for n in model.graph.node if n.op_type == "If" and _selectable(n)}
    if not chosen:
        return model, ()
    m = copy.deepcopy(model)
    g = m.graph
    nodes, done = [], []
    for n in g.node:
        if n.op_type != "If" or n.name not in chosen:
            nodes.append(n)
            continue
        outs = []
        for key in ("then_branch", "else_branch"):
            body = next(a.g for a in n.attribute if a.name == key)
            prefix = f"{n.name}/{key.split('_')[0]}/"
            local = {t.name for t in body.initializer} | {o for b in body.node for o in b.output}
            name = {t: prefix + t for t in local}
            for t in body.initializer:
                t2 = copy.deepcopy(t)
                t2.name = name[t.name]
                g.initializer.append(t2)
            for b in body.node:
                b2 = copy.deepcopy(b)
                b2.name = prefix + (b.name or b.op_type)
                b2.input[:] = [name.get(i, i) for i in b.input]
                b2.output[:] = [name.get(o, o) for o in b.output]
                nodes.append(b2)
            outs.append([name.get(o.name, o.name) for o in body.output])
        cond = f"{n.name}/condition"
        shape = f"{n.name}/scalar_shape"
        g.initializer.append(numpy_helper.from_array(np.zeros(0, np.int64), shape))
        nodes.append(helper.make_node("Reshape", [n.input[0], shape], [cond],
                                      name=f"{n.name}/condition"))
        for out, a, b in zip(n.output, *outs, strict=True):
            nodes.append(helper.make_node("Where", [cond, a, b], [out], name=f"{n.name}/{out}"))
        done.append(Specialized(node=n.name, condition=n.input[0], value=None, branch="both",
                                nodes=sum(len(a.g.node) for a in n.attribute)))
    del g.node[:]
    g.node.extend(nodes)
    return m, tuple(done)


def _selectable(n: onnx.NodeProto) -> bool:
    """Whether ``If`` node ``n`` can become both branches and a ``Where``: no control flow
    inside, and each output of one known shape and type in both branches."""
    bodies = [a.g for a in n.attribute if a.name in ("then_branch", "else_branch")]
    if len(bodies) != 2 or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                               for b in bodies for bn in b.node for a in bn.attribute):
        return False
    for x, y in zip(bodies[0].output, bodies[1].output, strict=True):
        tx, ty = x.type.tensor_type, y.type.tensor_type
        if tx.elem_type != ty.elem_type or not tx.HasField("shape") or not ty.HasField("shape"):
            return False
        dx = [d.dim_value if d.HasField("dim_value") else None for d in tx.shape.dim]
        dy = [d.dim_value if d.HasField("dim_value") else None for d in ty.shape.dim]
        if dx != dy or None in dx:
            return False
    return True
