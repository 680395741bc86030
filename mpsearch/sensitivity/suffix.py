"""Running only what a change touches: the part of a model that differs from the float model
(or depends on one tensor), cut out as its own model whose other inputs are float tensors
stored from one float pass, a few groups at a time (at most :data:`FEED_BYTES`).

A cut model's float weights can stay out of its bytes (``external``): ONNX Runtime then reads
them from the numpy arrays already in memory (``add_external_initializers``), instead of
copying them into the protobuf, serializing it and parsing it back, once per session. On
EfficientNet-Lite0 the gain runs' 50 suffix models each carried most of the 18 MB of weights:
about 45 ms per session, 16 ms without (the gain runs 3.8 -> 2.4 s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnx
from onnx import helper

from mpsearch.data.dataset import batch_samples
from mpsearch.graph.calibrate import make_session, run_collectors
from mpsearch.graph.ingest import outer_references
from mpsearch.graph.layer_graph import LayerGraph

__all__ = ["EXTERNAL_MIN_BYTES", "FEED_BYTES", "Suffix", "TensorStore", "bytes_per_sample",
           "cut", "elem_types", "in_passes", "reference_outputs", "suffix_model",
           "suffix_session"]

FEED_BYTES = 512 << 20  # float tensors held for one chunk of groups
# Initializers at least this large are left out of a cut model when their arrays are given;
# small ones (Resize scales, shapes) stay in, where graph construction may read them.
EXTERNAL_MIN_BYTES = 1 << 10


@dataclass(frozen=True, kw_only=True)
class Suffix:
    model: bytes
    feeds: tuple[str, ...]  # float tensors it reads
    outputs: tuple[str, ...]  # the graph outputs it computes (others equal the float model's)
    external: tuple[str, ...] = ()  # initializers left out of ``model`` (see suffix_session)
    disabled: tuple[str, ...] = ()  # ORT passes off (a folded model, mpsearch.graph.folding)


def suffix_session(suf: Suffix, external: Mapping[str, np.ndarray], *, threads: int = 0):
    """An ONNX Runtime session of ``suf``, its left-out initializers read from ``external``
    (the mapping :func:`cut` was given)."""
    return make_session(suf.model, threads=threads,
                        initializers={n: external[n] for n in suf.external},
                        disabled_optimizers=suf.disabled)


def suffix_model(float_model: onnx.ModelProto, qdq: onnx.ModelProto, *,
                 external: Mapping[str, np.ndarray] | None = None) -> Suffix:
    """The part of ``qdq`` that differs from ``float_model``, with the unchanged float tensors
    it reads as inputs. ``external``: as for :func:`cut`; ``qdq`` keeps the float model's
    initializers under their names (new ones get new names), so the float weights fit."""
    orig = {n.name: (n.op_type, tuple(n.input), tuple(n.output)) for n in float_model.graph.node}
    clean = {i.name for i in float_model.graph.input}
    clean |= {t.name for t in float_model.graph.initializer}
    dirty: list[onnx.NodeProto] = []
    for n in qdq.graph.node:  # topological order
        same = orig.get(n.name) == (n.op_type, tuple(n.input), tuple(n.output))
        reads = (*n.input, *outer_references(n))  # an If/Loop body reads the outer scope too
        if same and all(not i or i in clean for i in reads):
            clean.update(n.output)
        else:
            dirty.append(n)
    return cut(qdq, dirty, elem_types(float_model), external=external)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type
            for v in [*g.input, *g.value_info, *g.output] if v.type.tensor_type.elem_type}


def _stub(t: onnx.TensorProto, values: np.ndarray | None) -> onnx.TensorProto | None:
    """``t`` without its data, marked external, when ``values`` is its array in memory."""
    if (values is None or values.nbytes < EXTERNAL_MIN_BYTES or t.HasField("segment")
            or tuple(t.dims) != values.shape
            or helper.tensor_dtype_to_np_dtype(t.data_type) != values.dtype):
        return None
    stub = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type,
                            data_location=onnx.TensorProto.EXTERNAL)
    stub.external_data.add(key="location", value="memory")
    return stub


def cut(model: onnx.ModelProto, dirty: list[onnx.NodeProto], types: Mapping[str, int], *,
        external: Mapping[str, np.ndarray] | None = None) -> Suffix:
    """The model of the ``dirty`` nodes, the tensors they read and nobody among them makes as
    inputs. ``external``: name -> the array of that initializer of ``model``; those of at least
    :data:`EXTERNAL_MIN_BYTES` are left out of the model bytes (:func:`suffix_session`)."""
    inits = {t.name: t for t in model.graph.initializer}
    produced = {o for n in dirty for o in n.output}
    feeds, used = [], set()
    for n in dirty:
        for i in (*n.input, *sorted(outer_references(n))):
            if not i or i in produced or i in used:
                continue
            used.add(i)
            if i not in inits:
                feeds.append(i)
    outputs = [o for o in model.graph.output if o.name in produced]
    tensors, left_out = [], []
    for i in sorted(used):
        if i not in inits:
            continue
        stub = _stub(inits[i], external.get(i)) if external else None
        tensors.append(inits[i] if stub is None else stub)
        if stub is not None:
            left_out.append(i)
    graph = helper.make_graph(
        dirty, "suffix",
        [helper.make_tensor_value_info(f, types.get(f, onnx.TensorProto.FLOAT), None)
         for f in feeds],
        outputs, tensors)
    m = helper.make_model(graph, opset_imports=model.opset_import,
                          ir_version=model.ir_version)
    return Suffix(model=m.SerializeToString(), feeds=tuple(feeds),
                  outputs=tuple(o.name for o in outputs), external=tuple(left_out))


class TensorStore:
    """A calibration collector that keeps the values of some tensors, batch by batch."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self.batches: list[dict[str, np.ndarray]] = []

    def tensors(self) -> Iterable[str]:
        return self.names

    def update(self, values: Mapping[str, np.ndarray]) -> None:
        # kept as they come: ONNX Runtime's outputs are fresh arrays, and the fed inputs are
        # never written to; a copy of EfficientNet-Lite0's early activations over 48 samples
        # is hundreds of MB per pass
        self.batches.append({n: values[n] for n in self.names if n in values})


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
    n = sum(batch_samples(b) for b in batches)
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
