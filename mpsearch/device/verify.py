"""Does a quantized model compile for the target, and does the target compute what ORT's CPU EP
computes from the same file?

For ``qnn-htp`` (Qualcomm's Hexagon NPU through ONNX Runtime's QNN execution provider, see
:mod:`mpsearch.device.qnn`): the model is compiled by Qualcomm's real op validator and graph
compiler with CPU fallback disabled, so "compiled" means every node runs on the HTP; the compiled
graph then runs in emulation on the first ``samples`` samples of the data, one call per sample, next
to ORT's CPU EP on the same model. Per output, over those samples (as in
:mod:`mpsearch.graph.evaluate`, with the CPU EP as the reference):

    SQNR = 10 log10( sum y_cpu^2 / sum (y_cpu - y_htp)^2 )  dB,   cosine = mean_s cos(y_cpu, y_htp)

Facts relied on (docs/design.md §4): the HTP needs static shapes, so every dynamic input
dimension is fixed on a copy of the model (the batch to 1, any other to the first sample's
size, or to ``input_shapes``; ONNX Runtime's ``make_input_shape_fixed``, which also replaces
that symbol in every other tensor's shape); emulated A8 outputs match the CPU EP to about one
output quantization step, so a correct compilation shows 25 dB or more; emulation is
100-250x slower than the CPU EP, so a few samples suffice. A model that does not compile is a
result (``compiled=False`` with the compiler's reasons and the nodes it refused), not an error.

:func:`verify_in_child` runs the same in a fresh process: the QNN EP's op builders can abort
the whole process on a graph they do not expect (an assertion in its C++, seen on Silero VAD),
which no Python code can catch; the parent then returns a result that says the compiler
crashed, and exits as for any plan the device cannot run.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mpsearch.core.errors import DataError, UsageError
from mpsearch.data.dataset import Dataset, batch_samples, open_dataset
from mpsearch.data.spec import input_specs, is_symbol
from mpsearch.graph.ingest import load_model

__all__ = ["MIN_SQNR_DB", "SCHEMA", "TARGETS", "FixedDim", "NodeCounts", "OutputAgreement",
           "ChildCrashed", "VerifyResult", "fix_shapes", "in_child", "json_number", "static_model",
           "verify", "verify_in_child"]

log = logging.getLogger(__name__)

SCHEMA = "mpsearch.verify/1"
# HTP against the CPU EP, every output: an A8 plan agrees to about one output quantization step
# (EfficientNet-Lite0 26.7 dB, MiniLM w8a16 27.5 dB); a text-detection export that compiled whole
# agreed at 2.5 dB (docs/design.md §4)
MIN_SQNR_DB = 25.0
TARGETS = ("qnn-htp",)
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True, kw_only=True)
class FixedDim:
    """One dynamic input dimension given a static size for the target."""

    input: str
    axis: int
    symbol: str | None  # the dim_param, None for an unnamed dynamic dim
    value: int

    def describe(self) -> str:
        return f"{self.input}:{self.axis} {self.symbol or '?'} -> {self.value}"


@dataclass(frozen=True, kw_only=True)
class OutputAgreement:
    """Target against the CPU EP for one graph output."""

    name: str
    sqnr_db: float
    cosine: float


@dataclass(frozen=True, kw_only=True)
class NodeCounts:
    """Where the nodes went. ``counted_in``: "session" (ORT's placement record of the compiled
    graph, after its layout transformation) or "model" (the ONNX file, when nothing compiled)."""

    counted_in: str
    total: int
    on_target: int
    by_ep: Mapping[str, int]
    by_op: Mapping[str, int]
    not_on_target: tuple[Mapping[str, str], ...]  # {node, op_type, reason}


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    target: str
    soc_model: int
    model_path: str | None
    model_sha256: str
    data_path: str
    input_shapes: Mapping[str, tuple[int, ...]]
    shapes_fixed: tuple[FixedDim, ...]
    compiled: bool
    nodes: NodeCounts
    reasons: tuple[str, ...]
    samples: int
    outputs: tuple[OutputAgreement, ...]
    model_summary: Mapping[str, Any] = field(default_factory=dict)
    compile_seconds: float = 0.0
    seconds: float = 0.0
    min_sqnr_db: float = MIN_SQNR_DB  # every output must agree with the CPU EP at least this

    @property
    def sqnr_db(self) -> float | None:
        """The worst output's SQNR, None when nothing ran."""
        return min((o.sqnr_db for o in self.outputs), default=None)

    @property
    def fully_on_target(self) -> bool:
        return self.compiled and self.nodes.total > 0 and self.nodes.on_target == self.nodes.total

    @property
    def agrees(self) -> bool:
        """Every output of the target agrees with the CPU EP at ``min_sqnr_db`` or better
        (compiling is not computing: a graph can compile whole and compute something else)."""
        return bool(self.outputs) and all(o.sqnr_db >= self.min_sqnr_db for o in self.outputs)

    @property
    def disagreeing(self) -> tuple[OutputAgreement, ...]:
        return tuple(o for o in self.outputs if not o.sqnr_db >= self.min_sqnr_db)

    @property
    def verified(self) -> bool:
        """What "verified" means: every node on the target and every output in agreement."""
        return self.fully_on_target and self.agrees

    def to_dict(self) -> dict[str, Any]:
        """The ``verify.json`` document (non-finite numbers as strings "inf"/"-inf")."""
        return {
            "schema": SCHEMA, "target": self.target, "soc_model": self.soc_model,
            "model": {"path": self.model_path, "sha256": self.model_sha256},
            "data": self.data_path,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "shapes_fixed": [d.describe() for d in self.shapes_fixed],
            "compiled": self.compiled, "fully_on_target": self.fully_on_target,
            "min_sqnr_db": self.min_sqnr_db, "agrees": self.agrees, "verified": self.verified,
            "nodes": {"counted_in": self.nodes.counted_in, "total": self.nodes.total,
                      "on_target": self.nodes.on_target, "by_ep": dict(self.nodes.by_ep),
                      "by_op": dict(self.nodes.by_op),
                      "not_on_target": [dict(n) for n in self.nodes.not_on_target]},
            "reasons": list(self.reasons),
            "samples": self.samples,
            "outputs": [{"name": o.name, "sqnr_db": json_number(o.sqnr_db),
                         "cosine": json_number(o.cosine)} for o in self.outputs],
            "sqnr_db": json_number(self.sqnr_db),
            "model_summary": dict(self.model_summary),
            "compile_seconds": round(self.compile_seconds, 2),
            "seconds": round(self.seconds, 2),
        }


def json_number(v: float | None) -> float | str | None:
    """``v`` as verify.json writes it: 6 decimals, non-finite as the string "inf"/"-inf"."""
    if v is None or math.isfinite(v):
        return None if v is None else round(float(v), 6)
    return "inf" if v > 0 else "-inf"


# --------------------------------------------------------------------------- shapes


def fix_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]
               ) -> tuple[onnx.ModelProto, tuple[FixedDim, ...]]:
    """A copy of ``model`` whose inputs have exactly ``shapes`` (every input must be given;
    static dims must agree) and the dimensions that were dynamic."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    specs = input_specs(model)
    fixed: list[FixedDim] = []
    for name, (_, dims) in specs.items():
        want = shapes[name]
        for axis, (have, value) in enumerate(zip(dims, want, strict=True)):
            if not (isinstance(have, int) and have > 0):
                fixed.append(FixedDim(input=name, axis=axis, value=value,
                                      symbol=have if isinstance(have, str) and have else None))
    out = copy.deepcopy(model)
    if not fixed:
        return out, ()
    # A placeholder such as PaddlePaddle's "?" is no symbol: ORT's fixer would give every dim
    # that carries it, in every tensor, the first size it meets.
    for vi in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and not is_symbol(d.dim_param):
                d.ClearField("dim_param")
    for name in specs:
        make_input_shape_fixed(out.graph, name, list(shapes[name]))
    try:
        fix_output_shapes(out)
    except Exception as e:  # onnx's checker or shape inference on an exotic graph: ORT infers
        log.debug("output shapes left dynamic (%s)", e)
    return out, tuple(fixed)


def static_model(model: onnx.ModelProto, *, data: str | os.PathLike[str],
                 input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 sample_axes: Mapping[str, int | None] | None = None
                 ) -> tuple[onnx.ModelProto, tuple[FixedDim, ...]]:
    """``model`` with every dynamic input dim fixed, as a device that needs static shapes takes
    it: ``input_shapes``, else batch 1 and the sizes of ``data``'s first sample; and the dims
    that were fixed (none: the model was static, and the copy is equal to it)."""
    dataset = open_dataset(data, model, batch_size=1, name="verification",
                           sample_axes=sample_axes)
    shapes = _target_shapes(model, dataset, input_shapes)
    try:
        return fix_shapes(model, shapes)
    except ValueError as e:  # make_input_shape_fixed: symbols that cannot all take the values
        raise UsageError(f"cannot fix the input shapes {shapes} ({e})",
                         fix="give every input that shares a symbolic dim the same size") from e


def _target_shapes(model: onnx.ModelProto, data: Dataset,
                   overrides: Mapping[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
    """Every input's static shape: ``overrides``, else batch 1 and the first sample's size."""
    specs = input_specs(model)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(unknown)}, not an input of the model",
                         fix=f"the model's inputs are {', '.join(specs)}")
    first = next(data.batches(1), None)
    out = {}
    for name, (_, dims) in specs.items():
        if name in overrides:
            want = tuple(overrides[name])
            if len(want) != len(dims):
                raise UsageError(f"--input-shape {name}={','.join(map(str, want))} has "
                                 f"{len(want)} dims, the input has {len(dims)}",
                                 fix=f"give {len(dims)} dims")
            for axis, (have, w) in enumerate(zip(dims, want, strict=True)):
                if isinstance(have, int) and have > 0 and have != w:
                    raise UsageError(f"--input-shape {name}={','.join(map(str, want))}: dim "
                                     f"{axis} of '{name}' is fixed at {have} in the model",
                                     fix=f"use {have} there")
            out[name] = want
            continue
        sample = first[name].shape if first is not None else (1,) * len(dims)
        # a batch of one sample: 1 on the sample axis, the data's sizes elsewhere
        out[name] = tuple(d if isinstance(d, int) and d > 0 else int(sample[axis])
                          for axis, d in enumerate(dims))
    return out


# --------------------------------------------------------------------------- summary


def _model_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Op counts and how the Q/DQ nodes store tensors (weights: initializer inputs)."""
    inits = {t.name: t for t in model.graph.initializer}
    types: dict[str, Counter[str]] = {"weights": Counter(), "activations": Counter()}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        stored = inits.get(n.input[0])
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        src = stored if stored is not None else zp
        name = onnx.helper.tensor_dtype_to_string(src.data_type).removeprefix("TensorProto.") \
            .lower() if src is not None else "uint8"
        types["weights" if stored is not None else "activations"][name] += 1
    ops = Counter(n.op_type for n in model.graph.node)
    return {"nodes": len(model.graph.node), "ops": dict(sorted(ops.items())),
            "quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "dequantized_weights": dict(types["weights"]),
            "dequantized_activations": dict(types["activations"]),
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          None)}


# --------------------------------------------------------------------------- verify


def _sha256(model: onnx.ModelProto, path: Path | None) -> str:
    h = hashlib.sha256()
    if path is None:
        h.update(model.SerializeToString())
        return h.hexdigest()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(model: onnx.ModelProto | str | os.PathLike[str], *, data: str | os.PathLike[str],
           target: str = "qnn-htp", soc_model: int = 57,
           input_shapes: Mapping[str, tuple[int, ...]] | None = None, samples: int = 8,
           min_sqnr_db: float = MIN_SQNR_DB,
           sample_axes: Mapping[str, int | None] | None = None,
           progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Compile ``model`` for ``target`` with CPU fallback disabled and compare its outputs on the
    first ``samples`` samples of ``data`` with ORT's CPU EP; ``verified`` only where every node
    is on the target and every output agrees at ``min_sqnr_db`` or better. The input file is
    not modified.

    Raises :class:`~mpsearch.core.errors.UsageError` for an unknown target, a bad ``samples`` or
    ``input_shapes`` or when the QNN EP is unavailable, :class:`ModelError` for a missing or
    malformed model and :class:`DataError` for data that do not fit it.
    """
    from mpsearch.device.qnn import QNN_EP, open_on_htp
    from mpsearch.graph.calibrate import make_session
    from mpsearch.graph.evaluate import OutputAccumulator

    t0 = time.perf_counter()
    if target not in TARGETS:
        raise UsageError(f"target '{target}' is not supported", fix=f"use {', '.join(TARGETS)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UsageError(f"samples must be a positive integer, got {samples!r}")
    if not math.isfinite(min_sqnr_db):
        raise UsageError(f"min_sqnr_db {min_sqnr_db} is not a finite number",
                         fix="pass a threshold in dB, e.g. 25")
    path = None if isinstance(model, onnx.ModelProto) else Path(model)
    original = load_model(path) if path is not None else model
    sha = _sha256(original, path)
    fixed_model, fixed = static_model(original, data=data, input_shapes=input_shapes,
                                      sample_axes=sample_axes)
    shapes = {name: dims for name, (_, dims) in input_specs(fixed_model).items()}
    for f in fixed:
        log.info("fixed dynamic dim %s", f.describe())
    # Checked again against the static shapes (headers only): data of another size fail here.
    dataset = open_dataset(data, fixed_model, batch_size=None, name="verification",
                           sample_axes=sample_axes)

    result, htp = open_on_htp(fixed_model, soc_model=soc_model)
    summary = _model_summary(fixed_model)
    if htp is None:
        refused = tuple({"node": r.name, "op_type": r.op_type, "reason": r.reason}
                        for r in result.refused)
        counts = NodeCounts(counted_in="model", total=summary["nodes"], on_target=0, by_ep={},
                            by_op={}, not_on_target=refused)
        return VerifyResult(
            target=target, soc_model=soc_model, model_path=str(path) if path else None,
            model_sha256=sha, data_path=str(data), input_shapes=shapes, shapes_fixed=fixed,
            min_sqnr_db=float(min_sqnr_db),
            compiled=False, nodes=counts, reasons=result.messages, samples=0, outputs=(),
            model_summary=summary, compile_seconds=result.seconds,
            seconds=time.perf_counter() - t0)

    counts = NodeCounts(
        counted_in="session", total=len(result.nodes),
        on_target=sum(n.ep == QNN_EP for n in result.nodes),
        by_ep=dict(Counter(n.ep for n in result.nodes)),
        by_op=dict(sorted(Counter(n.op_type for n in result.nodes).items())),
        not_on_target=tuple({"node": n.name, "op_type": n.op_type,
                             "reason": f"placed on {n.ep}"}
                            for n in result.nodes if n.ep != QNN_EP))
    cpu = make_session(fixed_model)
    names = [o.name for o in cpu.get_outputs()]
    acc = {n: OutputAccumulator(False) for n in names}
    seen = 0
    for batch in dataset.batches():
        if seen >= samples:
            break
        feeds = dict(batch)
        try:
            ref = cpu.run(names, feeds)
            got = htp.run(names, feeds)
        except Exception as e:  # ORT's InvalidArgument etc.: data that do not fit the graph
            raise DataError(f"verification data {data} cannot be run through the model ({e})",
                            fix="check the data against the model's inputs") from e
        for name, r, g in zip(names, ref, got, strict=True):
            acc[name].update(np.asarray(r), np.asarray(g), None)
        count = batch_samples(batch)
        seen += count
        if progress:
            progress(count)
    outputs = tuple(OutputAgreement(name=n, sqnr_db=m.sqnr_db, cosine=m.cosine)
                    for n in names for m in [acc[n].result(n, False)])
    return VerifyResult(
        target=target, soc_model=soc_model, model_path=str(path) if path else None,
        model_sha256=sha, data_path=str(data), input_shapes=shapes, shapes_fixed=fixed,
        min_sqnr_db=float(min_sqnr_db),
        compiled=True, nodes=counts, reasons=result.messages, samples=seen, outputs=outputs,
        model_summary=summary, compile_seconds=result.seconds, seconds=time.perf_counter() - t0)


class ChildCrashed(Exception):
    """The child process died without a result (a native abort or a signal)."""


def in_child(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh process, its result or its exception returned as if
    called here; :class:`ChildCrashed` when the process dies instead. The process is forked
    from a clean server process that has this module imported (``forkserver``): no copy of
    this process's ONNX Runtime threads, and no second import of onnxruntime per call."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "mpsearch.device.localize"])
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool as e:
            raise ChildCrashed(str(e)) from None


def verify_in_child(model: str | os.PathLike[str], *, data: str | os.PathLike[str],
                    target: str = "qnn-htp", soc_model: int = 57,
                    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                    samples: int = 8, min_sqnr_db: float = MIN_SQNR_DB,
                    sample_axes: Mapping[str, int | None] | None = None) -> VerifyResult:
    """:func:`verify` in a fresh process (module docstring): a compiler that crashes gives a
    result with ``compiled=False`` and that reason."""
    kwargs = dict(data=data, target=target, soc_model=soc_model, input_shapes=input_shapes,
                  samples=samples, min_sqnr_db=min_sqnr_db, sample_axes=sample_axes)
    try:
        return in_child(verify, os.fspath(model), **kwargs)
    except ChildCrashed:
        log.warning("the QNN EP crashed compiling %s", model)
    original = load_model(model)
    fixed_model, fixed = static_model(original, data=data, input_shapes=input_shapes,
                                      sample_axes=sample_axes)
    summary = _model_summary(fixed_model)
    reason = ("ONNX Runtime's QNN EP crashed while compiling the model for the HTP (its process "
              "aborted, which is a bug in onnxruntime-qnn): nothing of it was placed on the HTP")
    counts = NodeCounts(counted_in="model", total=summary["nodes"], on_target=0, by_ep={},
                        by_op={}, not_on_target=())
    return VerifyResult(
        target=target, soc_model=soc_model, model_path=os.fspath(model),
        model_sha256=_sha256(original, Path(model)), data_path=str(data),
        input_shapes={n: d for n, (_, d) in input_specs(fixed_model).items()},
        shapes_fixed=fixed, min_sqnr_db=float(min_sqnr_db), compiled=False, nodes=counts,
        reasons=(reason,), samples=0, outputs=(), model_summary=summary)
