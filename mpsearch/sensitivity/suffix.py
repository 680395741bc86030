"""Running only what a change touches: the part of a model that differs from the float model
(or depends on one tensor), cut out as its own model whose other inputs are float tensors
stored from one float pass, a few groups at a time (at most :data:`FEED_BYTES`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnx
from onnx import helper

from mpsearch.calibrate import run_collectors
from mpsearch.graph import LayerGraph

__all__ = ["FEED_BYTES", "Suffix", "TensorStore", "bytes_per_sample", "cut", "elem_types",
           "in_passes", "reference_outputs", "suffix_model"]

FEED_BYTES = 512 << 20  # float tensors held for one chunk of groups


@dataclass(frozen=True, kw_only=True)
class Suffix:
    model: bytes
    feeds: tuple[str, ...]  # float tensors it reads
    outputs: tuple[str, ...]  # the graph outputs it computes (others equal the float model's)


def suffix_model(float_model: onnx.ModelProto, qdq: onnx.ModelProto) -> Suffix:
    """The part of ``qdq`` that differs from ``float_model``, with the unchanged float tensors
    it reads as inputs."""
    orig = {n.name: (n.op_type, tuple(n.input), tuple(n.output)) for n in float_model.graph.node}
    clean = {i.name for i in float_model.graph.input}
    clean |= {t.name for t in float_model.graph.initializer}
    dirty: list[onnx.NodeProto] = []
    for n in qdq.graph.node:  # topological order
        same = orig.get(n.name) == (n.op_type, tuple(n.input), tuple(n.output))
        if same and all(not i or i in clean for i in n.input):
            clean.update(n.output)
        else:
            dirty.append(n)
    return cut(qdq, dirty, elem_types(float_model))


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type
            for v in [*g.input, *g.value_info, *g.output] if v.type.tensor_type.elem_type}


def cut(model: onnx.ModelProto, dirty: list[onnx.NodeProto],
         types: Mapping[str, int]) -> Suffix:
    inits = {t.name: t for t in model.graph.initializer}
    produced = {o for n in dirty for o in n.output}
    feeds, used = [], set()
    for n in dirty:
        for i in n.input:
            if not i or i in produced or i in used:
                continue
            used.add(i)
            if i not in inits:
                feeds.append(i)
    outputs = [o for o in model.graph.output if o.name in produced]
    graph = helper.make_graph(
        dirty, "suffix",
        [helper.make_tensor_value_info(f, types.get(f, onnx.TensorProto.FLOAT), None)
         for f in feeds],
        outputs, [inits[i] for i in sorted(used) if i in inits])
    m = helper.make_model(graph, opset_imports=model.opset_import,
                          ir_version=model.ir_version)
    return Suffix(model=m.SerializeToString(), feeds=tuple(feeds),
                  outputs=tuple(o.name for o in outputs))


class TensorStore:
    """A calibration collector that keeps the values of some tensors, batch by batch."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self.batches: list[dict[str, np.ndarray]] = []

    def tensors(self) -> Iterable[str]:
        return self.names

    def update(self, values: Mapping[str, np.ndarray]) -> None:
        self.batches.append({n: np.array(values[n]) for n in self.names if n in values})


def reference_outputs(lg: LayerGraph, batches: Sequence[Mapping[str, np.ndarray]]
                      ) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in lg.model.graph.output]
    store = TensorStore(names)
    run_collectors(lg, batches, [store])
    return store.batches


def bytes_per_sample(lg: LayerGraph, t: str) -> int:
    a = lg.activations.get(t)
    shape = a.shape if a is not None else None
    if not shape:
        return 4 << 10
    return 4 * int(np.prod([d or 1 for d in shape[1:]]))


T = TypeVar("T")


def in_passes(lg: LayerGraph, batches: Sequence[Mapping[str, np.ndarray]], items: Iterable[T],
              feeds_of: Callable[[T], set[str]], *, per_pass: int | None = None
              ) -> Iterator[tuple[list[T], list[dict[str, np.ndarray]]]]:
    """``items`` (taken lazily) in groups whose float tensors ``feeds_of`` fit in
    :data:`FEED_BYTES` over ``batches`` (and at most ``per_pass`` items), each group with those
    tensors per batch, stored from one float pass."""
    n = sum(len(next(iter(b.values()))) for b in batches)
    inputs = {i.name for i in lg.model.graph.input}

    def stored(names: set[str]) -> list[dict[str, np.ndarray]]:
        store = TensorStore(names - inputs)
        if not store.names:
            return [{} for _ in batches]
        run_collectors(lg, batches, [store])
        return store.batches

    chunk: list[T] = []
    feeds: set[str] = set()
    for item in items:
        need = feeds_of(item)
        full = per_pass is not None and len(chunk) >= per_pass
        if chunk and (full or sum(bytes_per_sample(lg, f) for f in feeds | need) * n
                      > FEED_BYTES):
            yield chunk, stored(feeds)
            chunk, feeds = [], set()
        chunk.append(item)
        feeds |= need
    if chunk:
        yield chunk, stored(feeds)
