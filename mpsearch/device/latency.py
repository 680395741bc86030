"""Per-layer latency tables, measured on ONNX Runtime's CPU execution provider.

The cost model predicts a plan's latency as a sum (:mod:`mpsearch.hw.cost`)::

    T(plan) = Σ_l t[l, c_l] + Σ_l other_s[a_l] · out_l / Σ out + Σ_edges bytes_e · s_per_byte

so an entry ``t[l, c]`` must be the time layer ``l`` adds to the whole network in candidate
``c``, and nothing else. What is timed, and how:

* **a layer**: cut out of the whole model exported uniformly in ``c``
  (:func:`mpsearch.export.qdq.quantize`), exactly as the exporter writes it there (the input's
  DequantizeLinear, weight and bias DequantizeLinear, the layer, the output's QuantizeLinear),
  but with the boundary quantization removed: the one-layer model takes the already quantized
  tensor (uint8/uint16, the values it has in the network on a data sample) and returns the
  QuantizeLinear output, so ORT fuses ``DQ -> Conv -> Q`` as it does in the network
  (QLinearConv for w8a8). Float candidates (fp16 is exported in float) take and give float.
  The time is the sum of the layer's kernel times from ORT's own profiler, median over the
  runs. A lone layer has three costs the network does not have, each measured here and left
  out: the ``run()`` overhead (~5 µs, once per network, not per layer: 5-10% of the w8a8
  network if counted 50 times); the layout changes ORT inserts around a lone layer (Transpose
  to NHWC around QLinearConv, ReorderInput/ReorderOutput around an NCHWc float Conv), which the
  network does once per region of such layers (a lone fp16 depthwise conv spent more time
  reordering than computing); and the profiler's own time, ~4-6 µs inside every kernel it
  times (it starts and stops the thread pool's statistics within the span), measured as the
  profiled time of a Neg on one element and subtracted once per kernel. The inputs are copied
  into the session's bound buffers before each run, so that they are in the cache as in the
  network, where the producer has just written them (read cold, a uint16 DequantizeLinear
  took 4.6x as long).
* **the rest** ``other_s[a]``: Clip, Add, pooling, reshapes, unfused Q/DQ, per-node and
  per-run overheads. The wall-clock median of the whole model exported with every layer in
  activation format ``a`` (w8a8 for uint8, w8a16 for uint16, fp16 for float) minus the sum
  of that plan's layer entries; clamped at 0 with a warning. The cost model shares it among
  layers by output size, so a uniform plan gets exactly its measured whole.
* **a format change** ``conversion_s_per_byte``: standalone ``DQ -> Q`` models (uint8 to
  uint16 and back) on every layer-input shape of the model: total kernel time over total
  bytes read and written. (``DQ_b`` of the exporter's ``DQ_a -> Q_b -> DQ_b`` belongs to the
  consumer's one-layer model.)

How: every model is visited once per round, ``ROUNDS`` rounds, each round in a new shuffled
order; a visit opens a fresh session, does the warm-up runs and its share of the timed runs
back to back, and closes it. On a shared 2-core machine the load comes and goes (a run is then
up to 1.7x slower); visiting often makes every model see the same mix of load, and medians
then agree (two copies of one model in one measurement: mostly within 5%; timed a minute
apart, up to 40% off). One session at a time, because ORT's idle sessions keep their pool
threads spinning: a lone layer timed with ten idle sessions open took 1.8x as long. Threads:
ORT's default (one per core) unless given.

Why ORT's profiler and not the wall clock for layers: it separates a layer's kernels from the
layout changes and from the per-run overhead, which a wall clock of a lone layer cannot.

Limits found with ``benchmarks/latency_prediction.py``: ORT's ``WeightBiasQuantization``
optimizer quantizes the float weights of an fp16 layer that sits between quantized tensors
(``DQ -> Conv -> Q``), which then runs as QLinearConv (uint8 neighbours) or as a non-NCHWc
float conv on dequantized weights (uint16 neighbours, up to 16x slower for depthwise); its
table entry, timed in float context, cannot know. Layout changes at the borders of NHWC/NCHWc
regions are not in the table either. And the machine must be quiet: other processes preempt a
whole model's long runs more than a layer's short kernels, so ``other_s`` grows and plans
unlike the reference ones are mispredicted (w4a8 by 30% at load 3.5 on 2 cores); a warning
says so when the load average exceeds 1.25 per core.

``write_latency_table`` writes the table into a profile as text below a marker comment, so that
the hand-written part above it (its comments) survives; PyYAML cannot round-trip comments.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mpsearch.core.errors import DataError, InternalError, ProfileError, UsageError
from mpsearch.core.formats import Candidate, Format, FormatKind
from mpsearch.data.dataset import Dataset
from mpsearch.device.timing import (
    ROUNDS,
    Job,
    make_feed,
    median_latencies,
    run_rounds,
    session,
    split_repeats,
)
from mpsearch.export.qdq import quantize
from mpsearch.graph.ingest import graph_index
from mpsearch.graph.layer_graph import Layer, LayerGraph
from mpsearch.hw.profile import HardwareProfile, LatencyTable
from mpsearch.hw.table_io import MARKER, table_yaml, write_latency_table
from mpsearch.quant.analysis import Analysis, QuantizeOptions, analyze

__all__ = ["MARKER", "OneLayerModel", "measure_latency_table", "measure_table_alongside",
           "median_latencies", "one_layer_model", "table_yaml", "write_latency_table"]

log = logging.getLogger(__name__)

MEASURABLE_RUNTIMES = ("ort-cpu", "generic")
NULL_EVERY = 20  # models per visit to the profiler-overhead model
BUSY_LOAD = 1.25  # load average per core above which the machine was shared (ours: ~0.7-0.9)
_NP = {TensorProto.FLOAT: np.float32, TensorProto.UINT8: np.uint8,
       TensorProto.UINT16: np.uint16, TensorProto.INT8: np.int8, TensorProto.INT16: np.int16}


# --------------------------------------------------------------------------- one-layer models


@dataclass(frozen=True, kw_only=True)
class OneLayerModel:
    """A layer as the exporter wrote it, without the quantization of its boundary tensors."""

    layer: str
    model: onnx.ModelProto
    inputs: tuple[str, ...]  # tensor names, shared with the whole exported model
    outputs: tuple[str, ...]


def _zero_point_type(inits: Mapping[str, onnx.TensorProto], node: onnx.NodeProto) -> int:
    if len(node.input) > 2 and node.input[2] in inits:
        return inits[node.input[2]].data_type
    return TensorProto.UINT8  # the ONNX default when the zero point is omitted


def one_layer_model(qdq: onnx.ModelProto, layer: Layer,
                    shapes: Mapping[str, Sequence[int]] | None = None) -> OneLayerModel:
    """Cut ``layer`` out of the exported model ``qdq``: its node, the DequantizeLinear nodes
    feeding it, the QuantizeLinear after it (when its output is quantized), their initializers.
    Inputs are the quantized tensors the input DequantizeLinear nodes read (float for a float
    layer); the output is the QuantizeLinear output. ``shapes`` gives the boundary tensors'
    shapes (leave them unknown when None)."""
    g = qdq.graph
    ix = graph_index(g)
    inits, producer, consumers = ix.inits, ix.producer, ix.consumers
    node = next((n for n in g.node if n.name == layer.name), None)
    if node is None:
        raise InternalError(f"layer {layer.name} is not in the exported model: this is a bug "
                            "in mpsearch; please report it with the model")
    nodes: list[onnx.NodeProto] = []
    inputs: dict[str, int] = {}
    for i in node.input:
        if not i or i in inits:
            continue
        p = producer.get(i)
        if p is not None and p.op_type == "DequantizeLinear":
            nodes.append(p)
            if p.input[0] not in inits:
                inputs[p.input[0]] = _zero_point_type(inits, p)
        else:
            inputs[i] = TensorProto.FLOAT
    nodes.append(node)
    out = node.output[0]
    after = consumers.get(out, [])
    if len(after) == 1 and after[0].op_type == "QuantizeLinear":
        nodes.append(after[0])
        outputs = {after[0].output[0]: _zero_point_type(inits, after[0])}
    else:
        outputs = {out: TensorProto.FLOAT}
    used = {i for n in nodes for i in n.input}

    def info(name: str, et: int) -> onnx.ValueInfoProto:
        shape = list(shapes[name]) if shapes is not None and name in shapes else None
        return helper.make_tensor_value_info(name, et, shape)

    graph = helper.make_graph(nodes, layer.name, [info(n, t) for n, t in inputs.items()],
                              [info(n, t) for n, t in outputs.items()],
                              [t for t in g.initializer if t.name in used])
    model = helper.make_model(graph, opset_imports=list(qdq.opset_import))
    model.ir_version = qdq.ir_version
    return OneLayerModel(layer=layer.name, model=model, inputs=tuple(inputs),
                         outputs=tuple(outputs))


def _null_model() -> onnx.ModelProto:
    """``y = -x`` on one element: all its profiled kernel time is the profiler's."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"], name="neg")], "null",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _conversion_model(shape: Sequence[int], src: Format, dst: Format) -> onnx.ModelProto:
    """``x (src) -> DequantizeLinear -> QuantizeLinear -> y (dst)``: one format change."""
    scale = 0.02
    inits = [numpy_helper.from_array(np.float32(scale), "s_in"),
             helper.make_tensor("z_in", src.spec.onnx_type, [], [(src.spec.qmax + 1) // 2]),
             numpy_helper.from_array(np.float32(scale * src.spec.levels / dst.spec.levels),
                                     "s_out"),
             helper.make_tensor("z_out", dst.spec.onnx_type, [], [(dst.spec.qmax + 1) // 2])]
    nodes = [helper.make_node("DequantizeLinear", ["x", "s_in", "z_in"], ["f"], name="dq"),
             helper.make_node("QuantizeLinear", ["f", "s_out", "z_out"], ["y"], name="q")]
    graph = helper.make_graph(
        nodes, "conversion", [helper.make_tensor_value_info("x", src.spec.onnx_type, shape)],
        [helper.make_tensor_value_info("y", dst.spec.onnx_type, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


# --------------------------------------------------------------------------- timing


def _capture(model: onnx.ModelProto, names: Iterable[str], sample: Mapping[str, np.ndarray],
             threads: int) -> dict[str, np.ndarray]:
    """The values of tensors ``names`` when ``model`` runs on ``sample``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph_inputs = {i.name for i in m.graph.input}
    present = {o.name for o in m.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in graph_inputs]
    for n in wanted:
        if n not in present:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = session(m.SerializeToString(), threads)
    values = dict(zip(wanted, sess.run(wanted, make_feed(sess, sample)), strict=True))
    values.update({k: v for k, v in sample.items() if k in graph_inputs})
    return values


# --------------------------------------------------------------------------- the table


def _layer_candidates(lg: LayerGraph, profile: HardwareProfile,
                      only: Iterable[Candidate] | None) -> dict[str, list[Candidate]]:
    keep = None if only is None else set(only)
    out: dict[str, list[Candidate]] = {}
    skipped: set[Candidate] = set()
    for name, layer in lg.layers.items():
        allowed = ((profile.pins[name],) if name in profile.pins
                   else profile.pairs_for(layer.op_type))
        cands = []
        for c in allowed:
            if keep is not None and c not in keep:
                continue
            if c.sparsity is not None:  # export refuses pruned weights: roofline for these
                skipped.add(c)
                continue
            cands.append(c)
        out[name] = cands
    if skipped:
        log.warning("not timed (sparse candidates cannot be exported yet; the cost model uses "
                    "the roofline for them): %s", ", ".join(sorted(map(str, skipped))))
    if not any(out.values()):
        raise UsageError(f"no candidate to time: profile {profile.name} allows none of "
                         f"{sorted(map(str, keep or ()))}",
                         fix="name candidates the profile allows, or leave candidates unset")
    return out


def _reference_plans(lg: LayerGraph, cands: Mapping[str, Sequence[Candidate]]
                     ) -> dict[Format, dict[str, Candidate]]:
    """Per activation-format key of ``other_s`` (FLOAT for float/fp16), a plan with every layer
    in that format, preferring 8-bit integer weights, then any integer, then float weights."""

    def key(c: Candidate) -> Format:
        return c.activation if c.activation.is_quantized else Format.FLOAT

    def rank(c: Candidate) -> int:
        w = c.weight.spec
        return 0 if w.kind is FormatKind.INT and w.bits == 8 else 1 if w.kind is FormatKind.INT \
            else 2

    plans: dict[Format, dict[str, Candidate]] = {}
    for f in dict.fromkeys(key(c) for cs in cands.values() for c in cs):
        plan = {}
        for name in lg.layers:
            fits = sorted((c for c in cands[name] if key(c) is f), key=rank)
            if not fits:
                log.warning("other_s[%s] not measured: layer %s has no timed candidate with "
                            "%s activations", f, name, f)
                break
            plan[name] = fits[0]
        else:
            plans[f] = plan
    return plans


def _file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}"


def _check(profile: HardwareProfile, warmup: int, repeats: int, threads: int) -> None:
    if profile.runtime not in MEASURABLE_RUNTIMES:
        raise ProfileError(f"profile {profile.name} targets {profile.runtime}, but latency "
                           "tables are timed on ONNX Runtime's CPU execution provider",
                           fix="measure into a profile with target.runtime ort-cpu, e.g. "
                               "hw_profiles/ort_cpu.yaml")
    if repeats < 1 or warmup < 0 or threads < 0:
        raise UsageError("repeats must be at least 1, warmup and threads at least 0")


def measure_latency_table(model: onnx.ModelProto, data: Dataset, profile: HardwareProfile, *,
                          candidates: Iterable[Candidate] | None = None, warmup: int = 5,
                          repeats: int = 30, threads: int = 0,
                          progress: Callable[[int], None] | None = None,
                          model_path: str | os.PathLike[str] | None = None,
                          options: QuantizeOptions | None = None) -> LatencyTable:
    """Time every quantizable layer of ``model`` in every candidate ``profile`` allows for its
    op (or those of them in ``candidates``) on ONNX Runtime's CPU EP, batch 1, plus the rest
    of the network per activation format and the cost of a format change; see the module
    docstring. ``data`` calibrates the quantization parameters (``analyze``, with ``options``)
    and its first sample is what the timed models compute on. ``warmup`` untimed runs start
    every visit to a model; the ``repeats`` timed runs are split among the rounds.
    ``threads``: ORT intra-op threads (0: ORT's default). ``model_path``: the file ``model``
    was read from, whose bytes' sha256 the table records (default: of the serialized model).
    ``progress`` is called with 1 after each visit to a model: ``min(repeats, ROUNDS)``
    rounds, each visiting every one-layer, whole-model and conversion model once."""
    _check(profile, warmup, repeats, threads)
    sample = next(data.batches(1), None)
    if sample is None:
        raise DataError(f"the data set {data.name} has no samples",
                        fix="pass calibration data with at least one sample")
    sha = _file_sha256(model_path) if model_path else hashlib.sha256(
        model.SerializeToString()).hexdigest()
    analysis = analyze(model, data, options=options)
    table, _ = measure_table_alongside(
        analysis, sample, profile, (), candidates=candidates, warmup=warmup, repeats=repeats,
        threads=threads, progress=progress, model_sha256=sha,
        model_name=Path(model_path).name if model_path else None)
    return table


def measure_table_alongside(analysis: Analysis, sample: Mapping[str, np.ndarray],
                            profile: HardwareProfile, models: Sequence[onnx.ModelProto], *,
                            candidates: Iterable[Candidate] | None = None, warmup: int = 5,
                            repeats: int = 30, threads: int = 0, rounds: int = ROUNDS,
                            progress: Callable[[int], None] | None = None,
                            model_sha256: str | None = None, model_name: str | None = None
                            ) -> tuple[LatencyTable, list[float]]:
    """The latency table of ``analysis``'s model (as :func:`measure_latency_table`, computing
    on ``sample``), and the wall-clock median seconds of each of ``models`` on ``sample``,
    timed in the same rounds, among the layers: on a shared machine, a prediction from the
    table and a measurement then see the same load (timed a minute apart, they were
    off by up to 40% here, in either direction)."""
    _check(profile, warmup, repeats, threads)
    t_start = time.perf_counter()
    lg = analysis.graph
    cands = _layer_candidates(lg, profile, candidates)
    layer_jobs = _layer_jobs(analysis, cands, sample, threads)
    plans = _reference_plans(lg, cands)
    whole_jobs = {f: Job(blob=quantize(analysis, plan).model.SerializeToString(), values=sample,
                          wall=True) for f, plan in plans.items()}
    extra_jobs = [Job(blob=m.SerializeToString(), values=sample, wall=True) for m in models]
    conv_jobs, moved = _conversion_jobs(lg)
    # ORT's profiler adds a constant to every kernel it times (it starts and stops the thread
    # pool's profiling and formats its statistics inside the timed span: ~5 us here, more
    # than a small kernel). The profiled time of a Neg on one element measures it; it is
    # visited between the others, and subtracted once per kernel.
    null = Job(blob=_null_model().SerializeToString(), values={"x": np.zeros(1, np.float32)},
                wall=False)
    jobs = [*layer_jobs.values(), *conv_jobs, *whole_jobs.values(), *extra_jobs]
    jobs += [null] * max(1, len(jobs) // NULL_EVERY)  # visited several times a round
    # One round at a time, each in its own shuffled order, so that no model always meets the
    # same phase of a periodic load (in a fixed order, two copies of one whole model in one
    # measurement came out 27% apart once).
    rng = np.random.default_rng(0)
    for timed in split_repeats(repeats, rounds):
        run_rounds([jobs[k] for k in rng.permutation(len(jobs))], warmup=warmup,
                   repeats=timed, threads=threads, rounds=1, tick=progress)
    per_node = null.seconds()
    log.info("ORT profiler: %.1f us per kernel, subtracted", per_node * 1e6)

    table: dict[str, dict[Candidate, float]] = {}
    for (name, c), job in layer_jobs.items():
        table.setdefault(name, {})[c] = job.seconds(per_node)
    other: dict[Format, float] = {}
    for f, job in whole_jobs.items():
        whole = job.seconds()
        layers = sum(table[n][c] for n, c in plans[f].items())
        log.info("other_s[%s]: whole model %.3f ms, its layers %.3f ms", f, whole * 1e3,
                 layers * 1e3)
        if whole < layers:
            log.warning("other_s[%s]: the layers (%.3f ms) take longer than the whole model "
                        "(%.3f ms); recorded as 0 (a noisy machine, or layers timed alone "
                        "slower than in the network)", f, layers * 1e3, whole * 1e3)
        other[f] = max(whole - layers, 0.0)
    per_byte = sum(j.seconds(per_node) for j in conv_jobs) / moved if moved else 0.0

    load = os.getloadavg()[0]
    if load > BUSY_LOAD * (os.cpu_count() or 1):
        log.warning("the machine was busy (1-min load average %.1f on %d cores): other "
                    "processes preempt a whole model's long runs more than a layer's short "
                    "kernels, so other_s grows and plans unlike the reference ones are "
                    "mispredicted (w4a8 by 30%% under load 3.5 on 2 cores); measure on a quiet "
                    "machine", load, os.cpu_count() or 1)
    sha = model_sha256 or hashlib.sha256(analysis.original.SerializeToString()).hexdigest()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    of = f" of {model_name}" if model_name else ""
    n_rounds = len(split_repeats(repeats, rounds))
    source = (f"measured by mpsearch hw measure{of}: {_machine()}, onnxruntime "
              f"{ort.__version__} CPU EP, {threads or 'default'} intra-op threads, batch 1, "
              f"{date}; {repeats} timed runs in {n_rounds} rounds, {warmup} warm-up runs per "
              "visit, medians; layers: ORT profiler kernel time of the one-layer model (no "
              "boundary Q/DQ, no layout reorders, less the profiler's own time per kernel); "
              "other_s: whole-model wall clock minus its layers; 1-min load average at the "
              f"end {load:.1f}")
    log.info("latency table: %d layers timed in %.0f s", len(table),
             time.perf_counter() - t_start)
    return (LatencyTable(model_sha256=sha, layers=table, other_s=other,
                         conversion_s_per_byte=per_byte, source=source),
            [j.seconds() for j in extra_jobs])


def _layer_jobs(analysis: Analysis, cands: Mapping[str, Sequence[Candidate]],
                sample: Mapping[str, np.ndarray], threads: int
                ) -> dict[tuple[str, Candidate], Job]:
    """One kernel-timed job per (layer, candidate), grouped by layer; the one-layer models
    compute on the values their inputs take in the whole exported model on ``sample``."""
    lg = analysis.graph
    found: dict[tuple[str, Candidate], Job] = {}
    for c in dict.fromkeys(c for cs in cands.values() for c in cs):
        qdq = quantize(analysis, c).model
        layers = [lg.layers[n] for n, cs in cands.items() if c in cs]
        bare = [one_layer_model(qdq, layer) for layer in layers]
        values = _capture(qdq, [t for b in bare for t in (*b.inputs, *b.outputs)], sample,
                          threads)
        for layer, b in zip(layers, bare, strict=True):
            cut = one_layer_model(qdq, layer, {t: values[t].shape for t in (*b.inputs,
                                                                              *b.outputs)})
            found[(layer.name, c)] = Job(blob=cut.model.SerializeToString(),
                                          values={t: values[t] for t in cut.inputs},
                                          wall=False)
    return {(n, c): found[(n, c)] for n, cs in cands.items() for c in cs}


def _conversion_jobs(lg: LayerGraph) -> tuple[list[Job], int]:
    """uint8 -> uint16 and back on every distinct layer-input shape; the bytes they move."""
    shapes = {}
    for layer in lg.layers.values():
        for t in layer.inputs:
            shape = lg.activations[t].shape if t in lg.activations else None
            if shape and all(d is not None for d in shape[1:]):
                shapes[(1, *shape[1:])] = None
    rng = np.random.default_rng(0)
    jobs, moved = [], 0
    for shape in shapes:
        for src, dst in ((Format.UINT8, Format.UINT16), (Format.UINT16, Format.UINT8)):
            dtype = _NP[src.spec.onnx_type]
            x = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)
            jobs.append(Job(blob=_conversion_model(shape, src, dst).SerializeToString(),
                             values={"x": x}, wall=False))
            moved += x.size * (src.bits + dst.bits) // 8
    return jobs, moved


# --------------------------------------------------------------------------- writing

