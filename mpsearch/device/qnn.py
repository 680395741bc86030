"""Compile and run a model on Qualcomm's HTP through ONNX Runtime's QNN execution provider.

``onnxruntime-qnn`` ships the QNN EP as a plugin library together with Qualcomm's HTP backend.
On x86-64 Linux and Windows that backend runs Qualcomm's real op validator and graph compiler and
then executes the compiled graph in emulation: it proves that a quantized model compiles for a
Snapdragon NPU and what it computes there, not how fast (emulation is 100-250x slower than the
CPU EP). Facts this module relies on (docs/design.md §4):

- the EP is registered once per process with ``ort.register_execution_provider_library(
  "QnnExecutionProvider", onnxruntime_qnn.get_library_path())`` (a second registration
  raises); its devices are those of ``ort.get_ep_devices()`` whose ``ep_name`` is
  ``QnnExecutionProvider``, attached with ``SessionOptions.add_provider_for_devices(devices,
  {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": "57"})``. The old
  ``providers=["QNNExecutionProvider"]`` silently runs on the CPU;
- ``soc_model`` picks the chip: 57 = SM8650 (8 Gen 3, HTP v75), 60 = SC8380XP (v73),
  69 = SM8750 (v79), 30 = SM8350 (v68);
- with the session config ``session.disable_cpu_ep_fallback=1`` session creation fails when any
  node cannot be given to QNN (otherwise such nodes silently run on the CPU);
- the HTP needs static shapes (batch 1); a dynamic dimension is refused ("Cannot get shape").

How "every node runs on the HTP" is proven: the session is created with CPU fallback disabled,
and ORT's own record of the placement (session config ``session.record_ep_graph_assignment_info``,
read with ``InferenceSession.get_provider_graph_assignment_info()``) is checked to hold only
``QnnExecutionProvider`` nodes. The record lists the graph after ORT's layout transformation
(QNN asks for NHWC), so it has Transpose nodes that the ONNX file does not.

Why a compilation failed: the EP explains itself only in ORT's log (per node unit, ``Validation
FAILED ... REASON : ...``, and the backend's ``backendValidateOpConfig() failed for node ...``),
while the exception says just "nodes are assigned to the default CPU EP". A failed compilation is
therefore repeated once with verbose session logging routed to a Python callback
(``ort.set_default_logger_callback``: process-wide for those milliseconds, under a lock; the
platform logger is then restored at ORT's default severity, warning). The same messages give
the refused nodes (:class:`RefusedNode`), one per failed node unit, named as in the ONNX file:
ORT renames a node it rewrites for QNN's NHWC layout ``<name>_token_<k>``, and QNN names its ops
``<ORT name>_<k>``, so a generic unit failure ("Failed to add node.") takes the backend's message
for that op. A second session with CPU fallback allowed cannot be used to learn the placement
instead: ORT's layout transformer leaves NHWC nodes no EP can run ("inserted using the NHWC
format ... but was not selected by that EP"). Successful compilations touch no global logging
state. Sessions log fatal errors only (a failure comes back as a result or an exception), which
hides the EP's warnings about Windows-only features. The HTP library itself prints one line
(``# LIBNATIVE: ...``) to stdout when first loaded; that cannot be turned off.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from mpsearch.core.errors import ModelError, UsageError

__all__ = ["DEFAULT_SOC_MODEL", "QNN_EP", "PlacedNode", "QnnCompileResult", "RefusedNode",
           "compile_on_htp", "htp_session", "open_on_htp", "qnn_available", "run_on_htp"]

log = logging.getLogger(__name__)

QNN_EP = "QnnExecutionProvider"
DEFAULT_SOC_MODEL = 57  # SM8650, Snapdragon 8 Gen 3, HTP v75

_QUIET = 4  # session log severity: fatal only (0 verbose, 1 info, 2 warning, 3 error, 4 fatal)
_ORT_DEFAULT_SEVERITY = 2  # what ORT's Python module starts with
_GENERIC_REASONS = ("Failed to add node.", "Failed to add fused Matmul node.")
_NOISE = ("File mapped weights", "EPContext encryption", "single Quantize/Dequantize node")

_register_lock = threading.Lock()
_logger_lock = threading.Lock()
_devices: list[Any] | None = None
_unavailable: str | None = None
_log_ids = itertools.count()

ModelLike = onnx.ModelProto | str | os.PathLike[str]


@dataclass(frozen=True, kw_only=True)
class PlacedNode:
    """One node of the session's graph (after ORT's transformations) and the EP that runs it."""

    name: str
    op_type: str
    ep: str


@dataclass(frozen=True, kw_only=True)
class RefusedNode:
    """A node of the model that the EP did not take, and the EP's or compiler's reason.

    ``name`` is the ONNX file's node name where it can be traced back (ORT's layout
    transformation renames a node ``n`` it rewrites to ``n_token_<k>``), else ORT's name.
    ``op_type`` is the node unit's op (a QDQ unit ``DQ -> Conv -> Q`` is reported as its Conv).
    """

    name: str
    op_type: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class QnnCompileResult:
    """Whether a model compiles for the HTP, and if not, why (the EP's and compiler's words)."""

    ok: bool  # the session was created with CPU fallback disabled
    soc_model: int
    reason: str | None  # first relevant line of the EP's or compiler's message when not ok
    messages: tuple[str, ...]  # every relevant message, in order (empty when ok)
    nodes: tuple[PlacedNode, ...]  # ORT's placement record (empty when not ok)
    seconds: float  # session creation, i.e. validation and graph compilation
    refused: tuple[RefusedNode, ...] = ()  # the nodes the EP said no to (when not ok)

    @property
    def assigned_to_qnn(self) -> bool:
        """Every node of the session's graph is placed on the QNN EP."""
        return bool(self.nodes) and all(n.ep == QNN_EP for n in self.nodes)

    @classmethod
    def fail(cls, reason: str, *, soc_model: int, messages: tuple[str, ...] = (),
             seconds: float = 0.0, refused: tuple[RefusedNode, ...] = ()) -> QnnCompileResult:
        return cls(ok=False, soc_model=soc_model, reason=reason,
                   messages=messages or (reason,), nodes=(), seconds=seconds, refused=refused)


# --------------------------------------------------------------------------- the EP


def _qnn_devices() -> list[Any]:
    """The QNN EP's devices, registering the plugin library on first use. Raises UsageError."""
    global _devices, _unavailable
    with _register_lock:
        if _devices is None and _unavailable is None:
            try:
                _devices = _register()
            except UsageError as e:
                _unavailable = e.one_line()
        if _devices is None:
            raise UsageError(_unavailable or "the QNN execution provider is unavailable")
        return _devices


def _register() -> list[Any]:
    try:
        import onnxruntime_qnn
    except ImportError as e:
        raise UsageError("the package onnxruntime-qnn is not installed",
                         fix="pip install onnxruntime-qnn (wheels for x86-64 Linux and "
                             "Windows)") from e
    if not hasattr(ort, "register_execution_provider_library"):
        raise UsageError(f"onnxruntime {ort.__version__} cannot load plugin execution "
                         "providers", fix="install onnxruntime 1.23 or newer")

    def found() -> list[Any]:
        return [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]

    devices = found()
    if not devices:  # not registered yet by this process (by us or by the user)
        try:
            ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
        except Exception as e:  # ORT raises its own Fail/RuntimeError types
            raise UsageError(f"cannot register the QNN execution provider ({e})",
                             fix="check that onnxruntime and onnxruntime-qnn versions "
                                 "match") from e
        devices = found()
    if not devices:
        raise UsageError("the QNN execution provider was registered but offers no device",
                         fix="check that onnxruntime and onnxruntime-qnn versions match")
    return devices


def qnn_available() -> bool:
    """True when ``onnxruntime-qnn`` is installed and its EP can be registered here."""
    try:
        _qnn_devices()
    except UsageError:
        return False
    return True


def _session_options(soc_model: int, *, severity: int, log_id: str = "") -> ort.SessionOptions:
    import onnxruntime_qnn

    so = ort.SessionOptions()
    so.log_severity_level = severity
    if log_id:
        so.logid = log_id
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    so.add_provider_for_devices(_qnn_devices(), {
        "backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": str(soc_model)})
    return so


def _source(model: ModelLike) -> tuple[bytes | str, onnx.ModelProto]:
    """What ORT opens (bytes, or the path so external data resolves) and the graph's header."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), model
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"model {path} does not exist", fix="pass an existing .onnx file")
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise ModelError(f"cannot read {path} as an ONNX model ({e})",
                         fix="pass a valid .onnx file") from e
    return str(path), header


def _dynamic_input(model: onnx.ModelProto) -> str | None:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                what = f"'{d.dim_param}'" if d.dim_param else "unknown"
                return (f"input '{vi.name}' has a dynamic dimension {i} ({what}); the HTP "
                        "needs static shapes (batch 1): fix it, e.g. with onnxruntime's "
                        "make_dynamic_shape_fixed")
    return None


# --------------------------------------------------------------------------- compile


def compile_on_htp(model: ModelLike, *, soc_model: int = DEFAULT_SOC_MODEL) -> QnnCompileResult:
    """Create a QNN HTP session for ``model`` with CPU fallback disabled.

    A model that does not compile is an expected answer, not an error: the result says why.
    Raises :class:`UsageError` only when the QNN EP itself is unavailable (see
    :func:`qnn_available`) and :class:`ModelError` when a model path cannot be read.
    """
    return _compile(model, soc_model)[0]


def open_on_htp(model: ModelLike, *, soc_model: int = DEFAULT_SOC_MODEL
                ) -> tuple[QnnCompileResult, ort.InferenceSession | None]:
    """Like :func:`compile_on_htp`, and the session when the model compiled (else None)."""
    return _compile(model, soc_model)


def _compile(model: ModelLike,
             soc_model: int) -> tuple[QnnCompileResult, ort.InferenceSession | None]:
    _qnn_devices()
    src, header = _source(model)
    if (dynamic := _dynamic_input(header)) is not None:
        return QnnCompileResult.fail(dynamic, soc_model=soc_model), None
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(src, _session_options(soc_model, severity=_QUIET))
    except Exception as e:  # ORT's Fail/InvalidArgument/RuntimeError: the EP said no
        seconds = time.perf_counter() - t0
        messages, refused = _diagnose(src, soc_model, e, {n.name for n in header.graph.node})
        log.info("QNN HTP (soc_model %d) refused the model: %s", soc_model, messages[0])
        return QnnCompileResult.fail(messages[0], soc_model=soc_model, messages=messages,
                                     seconds=seconds, refused=refused), None
    seconds = time.perf_counter() - t0
    nodes = tuple(PlacedNode(name=n.name, op_type=n.op_type, ep=sub.ep_name)
                  for sub in sess.get_provider_graph_assignment_info() for n in sub.get_nodes())
    off = [n for n in nodes if n.ep != QNN_EP]
    if off:  # cannot happen with fallback disabled; checked because it is the claim made
        reason = "nodes not placed on QNN: " + ", ".join(f"{n.name} ({n.ep})" for n in off)
        return QnnCompileResult(ok=False, soc_model=soc_model, reason=reason,
                                messages=(reason,), nodes=nodes, seconds=seconds), None
    return QnnCompileResult(ok=True, soc_model=soc_model, reason=None, messages=(),
                            nodes=nodes, seconds=seconds), sess


def _diagnose(src: bytes | str, soc_model: int, error: Exception,
              node_names: set[str]) -> tuple[tuple[str, ...], tuple[RefusedNode, ...]]:
    """Create the session again with verbose logging captured; the EP's reasons, best first,
    and the nodes it refused (``node_names``: the model's, to undo ORT's renaming)."""
    log_id = f"mpsearch-qnn-{os.getpid()}-{next(_log_ids)}"
    captured: list[tuple[int, str, str]] = []

    def sink(severity: int, category: str, logid: str, where: str, message: str) -> None:
        if logid == log_id:
            captured.append((severity, where, message))

    options = _session_options(soc_model, severity=0, log_id=log_id)
    with _logger_lock:
        ort.set_default_logger_callback(sink, _QUIET)
        try:
            ort.InferenceSession(src, options)
        except Exception:  # expected: the same failure as before
            pass
        finally:
            ort.set_default_logger_callback(None)
            ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
    return _reasons(captured, error), _refused(captured, node_names)


_NODE_UNIT = re.compile(r"OrtNodeUnit \((\w+)\)")
_NODE_NAME = re.compile(r"Node name: (\S+)")
_REASON = re.compile(r"REASON : (.+)")
_UNIT_NODE = re.compile(r"Operator type: (\S+) Node name: (\S+)")
_BACKEND_NODE = re.compile(r"failed for node `([^`]+)` of type `([^`]+)`")
_ORT_RENAMED = re.compile(r"_token_\d+$")
_QNN_SUFFIX = re.compile(r"_\d+$")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _reasons(captured: list[tuple[int, str, str]], error: Exception) -> tuple[str, ...]:
    """Rank the EP's messages: a specific validation reason, then the backend's and the EP's
    warnings and errors, then generic validation reasons, then the exception."""
    specific, backend, generic = [], [], []
    for severity, where, message in captured:
        if "Validation FAILED" in message and (m := _REASON.search(message)):
            unit = _NODE_UNIT.search(message)
            names = _NODE_NAME.findall(message)
            target = f"{unit.group(1) if unit else 'node unit'} {', '.join(names)}".strip()
            reason = f"{m.group(1).strip()} ({target})"
            (generic if m.group(1).strip() in _GENERIC_REASONS else specific).append(reason)
        elif (severity >= 2 and where.startswith(("qnn_", "ep_plugin"))
              and not any(n in message for n in _NOISE)):
            backend.append(" ".join(message.split()))
    last = " ".join(str(error).split())
    return tuple(dict.fromkeys([*specific, *backend, *generic, last]))


def _refused(captured: list[tuple[int, str, str]],
             node_names: set[str]) -> tuple[RefusedNode, ...]:
    """One entry per node unit the EP's validator failed, named after the unit's op node (its
    Q/DQ nodes are implied). A generic reason ("Failed to add node.") is replaced by the
    backend's own message for that node (QNN names its ops ``<ORT node>_<k>``)."""
    backend: dict[str, str] = {}
    for _, _, message in captured:
        if (m := _BACKEND_NODE.search(message)) and "backendValidateOpConfig" in message:
            backend.setdefault(_QNN_SUFFIX.sub("", m.group(1)), " ".join(message.split()))
    out: dict[str, RefusedNode] = {}
    for _, _, message in captured:
        if "Validation FAILED" not in message or not (r := _REASON.search(message)):
            continue
        unit = _NODE_UNIT.search(message)
        nodes = _UNIT_NODE.findall(message)
        if not nodes:
            continue
        kind = unit.group(1) if unit else nodes[0][0]
        op_type, ort_name = next(((t, n) for t, n in nodes if t == kind),
                                 next(((t, n) for t, n in nodes if t not in _QDQ), nodes[0]))
        reason = r.group(1).strip()
        if reason in _GENERIC_REASONS:
            reason = backend.get(ort_name, reason)
        name = ort_name
        if name not in node_names and _ORT_RENAMED.sub("", name) in node_names:
            name = _ORT_RENAMED.sub("", name)
        name = name.removesuffix("/duplicated")
        if name not in out or out[name].reason in _GENERIC_REASONS:
            out[name] = RefusedNode(name=name, op_type=op_type, reason=reason)
    return tuple(out.values())


# --------------------------------------------------------------------------- run


def htp_session(model: ModelLike, *, soc_model: int = DEFAULT_SOC_MODEL) -> ort.InferenceSession:
    """A QNN HTP session with CPU fallback disabled, for repeated runs.

    Raises :class:`ModelError` with the compiler's reason when the model does not compile.
    """
    result, sess = _compile(model, soc_model)
    if sess is None:
        raise ModelError(f"the model does not compile for the QNN HTP (soc_model {soc_model}): "
                         f"{result.reason}",
                         fix="check the plan's candidates against the device profile; "
                             "mpsearch.device.qnn.compile_on_htp(...).messages has every reason")
    return sess


def run_on_htp(model: ModelLike, feeds: Mapping[str, np.ndarray], *,
               soc_model: int = DEFAULT_SOC_MODEL) -> dict[str, np.ndarray]:
    """Run ``model`` once on the (emulated) HTP; outputs by name."""
    sess = htp_session(model, soc_model=soc_model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))
