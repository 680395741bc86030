"""Control flow the data decides once: an ``If`` whose condition is the same on every sample is
replaced by the branch taken (opt-in: ``--specialize-if``).

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

__all__ = ["Specialized", "condition_values", "require_one_branch", "specialize_ifs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Specialized:
    """One ``If`` replaced by the branch the data takes."""

    node: str
    condition: str  # the tensor it tests
    value: bool  # its value on every sample
    branch: str  # "then_branch" or "else_branch"
    nodes: int  # how many nodes the branch brought in

    def describe(self) -> str:
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
        other = values.get(s.node, set()) - {s.value}
        if other:
            took = s.branch.split("_")[0]
            raise DataError(f"{name} takes the {'else' if took == 'then' else 'then'} branch "
                            f"of If '{s.node}' ('{s.condition}' is "
                            f"{str(next(iter(other))).lower()} there), the calibration data "
                            f"the {took} branch, the only one the specialised model computes",
                            fix="calibrate and evaluate on data of one kind (e.g. one sample "
                                "rate), or drop --specialize-if")
