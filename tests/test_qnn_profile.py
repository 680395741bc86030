"""The Snapdragon profile against Qualcomm's real HTP compiler (ONNX Runtime's QNN EP).

Every (op type, candidate) the profile allows is exported by mpsearch as a one-layer QDQ model
and must compile for the profile's soc_model with every node placed on QNN; a sample of what the
profile forbids must be refused, with the compiler's reason; and the emulated HTP must compute
what ORT's CPU EP computes from the same QDQ model (docs/design.md §4: to about one output
quantization step for A8 models): for every allowed candidate, SQNR >= 25 dB, and within one
output step for A8 (measured here: exactly one step at most; A16 and fp16 40-80 dB).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip(
    "onnxruntime_qnn",
    reason="onnxruntime-qnn (Qualcomm's HTP compiler and emulator behind ONNX Runtime's QNN EP) "
           "is not installed; it has wheels for x86-64 Linux and Windows only")

from mpsearch import ModelError, analyze, open_dataset, parse_candidate  # noqa: E402
from mpsearch.core.formats import Candidate, Format  # noqa: E402
from mpsearch.device.qnn import QNN_EP, compile_on_htp, run_on_htp  # noqa: E402
from mpsearch.export.qdq import quantize  # noqa: E402
from mpsearch.graph.calibrate import make_session  # noqa: E402
from mpsearch.graph.evaluate import sqnr_db  # noqa: E402
from mpsearch.hw.profile import load_profile  # noqa: E402

PROFILE = load_profile(Path(__file__).parents[1] / "hw_profiles" / "snapdragon_8gen3.yaml")
V68 = 30  # SM8350, HTP v68: no 16x16-bit multiplies
MIN_SQNR_DB = 25.0


# --------------------------------------------------------------------------- one-layer models


def _model(node: onnx.NodeProto, x_shape: list[int], y_shape: list[int],
           inits: list[np.ndarray]) -> onnx.ModelProto:
    names = node.input[1:]
    g = helper.make_graph(
        [node], "one_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(a, n) for n, a in zip(names, inits, strict=True)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _w(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def conv(rng: np.random.Generator) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    return _model(node, [1, 8, 16, 16], [1, 16, 16, 16],
                  [_w(rng, 16, 8, 3, 3), _w(rng, 16, scale=0.1)])


def gemm(rng: np.random.Generator) -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)
    return _model(node, [1, 32], [1, 16], [_w(rng, 16, 32), _w(rng, 16, scale=0.1)])


def matmul(rng: np.random.Generator) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")
    return _model(node, [1, 4, 32], [1, 4, 16], [_w(rng, 32, 16)])


MODELS: dict[str, Callable[[np.random.Generator], onnx.ModelProto]] = {
    "Conv": conv, "Gemm": gemm, "MatMul": matmul}


def _two_layers(first: onnx.NodeProto, second: onnx.NodeProto, x_shape: list[int],
                y_shape: list[int], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    g = helper.make_graph(
        [first, helper.make_node("Relu", ["h"], ["r"], name="relu"), second], "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


# Channel pruning needs a dense reader of the pruned layer's channels: the layer under test,
# then a second one of the same type (a one-layer model's channels reach the graph output).
PRUNED_MODELS: dict[str, Callable[[np.random.Generator], onnx.ModelProto]] = {
    "Conv": lambda rng: _two_layers(
        helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv_b"),
        [1, 8, 16, 16], [1, 8, 16, 16],
        {"w": _w(rng, 16, 8, 3, 3), "b": _w(rng, 16, scale=0.1), "w2": _w(rng, 8, 16, 1, 1),
         "b2": _w(rng, 8, scale=0.1)}),
    "Gemm": lambda rng: _two_layers(
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm", transB=1),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm_b", transB=1),
        [1, 32], [1, 8],
        {"w": _w(rng, 16, 32), "b": _w(rng, 16, scale=0.1), "w2": _w(rng, 8, 16),
         "b2": _w(rng, 8, scale=0.1)}),
    "MatMul": lambda rng: _two_layers(
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="matmul_b"),
        [1, 4, 32], [1, 4, 8], {"w": _w(rng, 32, 16), "w2": _w(rng, 16, 8)}),
}


def _prunes_channels(c: Candidate) -> bool:
    return c.sparsity is not None and c.sparsity.pattern == "channel"


def _input_shape(m: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim)


class Exporter:
    """One calibrated analysis per model, exported under any candidate: the one-layer model
    uniformly; for a channel-pruning candidate, the two-layer model with the candidate on its
    first layer and the same formats, dense, on the second (exported physically smaller)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[tuple[str, bool], object] = {}

    def _analysis(self, op: str, pruned: bool):
        key = (op, pruned)
        if key not in self._done:
            rng = np.random.default_rng(sorted(MODELS).index(op))
            m = (PRUNED_MODELS if pruned else MODELS)[op](rng)
            shape = _input_shape(m)
            path = self.root / f"{op}_{int(pruned)}_calib.npz"
            np.savez(path, x=rng.standard_normal((16, *shape[1:])).astype(np.float32))
            self._done[key] = analyze(m, open_dataset(path, m))
        return self._done[key]

    def export(self, op: str, candidate: Candidate) -> onnx.ModelProto:
        if not _prunes_channels(candidate):
            return quantize(self._analysis(op, False), candidate).model
        a = self._analysis(op, True)
        dense = Candidate(weight=candidate.weight, activation=candidate.activation)
        plan = {g: candidate if g == op.lower() else dense for g in a.graph.group_names}
        qm = quantize(a, plan)
        assert len(qm.kept_channels[op.lower()]) == round(16 * candidate.sparsity.density)
        return qm.model

    def sample(self, op: str, seed: int = 99) -> dict[str, np.ndarray]:
        shape = _input_shape(MODELS[op](np.random.default_rng(0)))
        return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Exporter:
    return Exporter(tmp_path_factory.mktemp("qnn"))


def _weight_is_stored_as(q: onnx.ModelProto, op: str, c: Candidate) -> bool:
    """The layer's weight is stored in the candidate's format, so a compile check is not passed
    by a model the exporter silently left in float. fp16 layers are exported in float with
    fp16-rounded weights (export/qdq.py); the HTP has no fp32 MACs and runs them in fp16."""
    layer = next(n for n in q.graph.node if n.op_type == op)
    producers = {o: n for n in q.graph.node for o in n.output}
    name = layer.input[1]
    if name in producers and producers[name].op_type == "DequantizeLinear":
        name = producers[name].input[0]
    t = next(t for t in q.graph.initializer if t.name == name)
    if c.weight is Format.FP16:
        w = numpy_helper.to_array(t)
        return t.data_type == TensorProto.FLOAT and np.array_equal(
            w, w.astype(np.float16).astype(np.float32))
    return t.data_type == c.weight.spec.onnx_type


def _output_step(q: onnx.ModelProto) -> float | None:
    """The scale of the graph output's DequantizeLinear, None when the output is float."""
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "y"]
    if not dq:
        return None
    return float(next(numpy_helper.to_array(t) for t in q.graph.initializer
                      if t.name == dq[0].input[1]))


# --------------------------------------------------------------------------- allowed


ALLOWED = [pytest.param(op, c, id=f"{op}-{c.name}")
           for op in MODELS for c in PROFILE.pairs_for(op)]


def test_profile_targets_the_htp_and_every_profiled_op_has_a_model():
    assert PROFILE.runtime == "qnn-htp" and PROFILE.soc_model == 57
    assert set(PROFILE.op_pairs) <= set(MODELS), "add a one-layer model for the new op type"
    assert ALLOWED


@pytest.mark.parametrize(("op", "candidate"), ALLOWED)
def test_allowed_candidate_compiles_with_every_node_on_qnn(exporter, op, candidate):
    q = exporter.export(op, candidate)
    assert _weight_is_stored_as(q, op, candidate)
    result = compile_on_htp(q, soc_model=PROFILE.soc_model)
    assert result.ok, f"{op} {candidate.name} on soc_model {PROFILE.soc_model}: {result.reason}"
    assert result.assigned_to_qnn and result.reason is None
    assert {n.ep for n in result.nodes} == {QNN_EP}
    assert any(n.op_type == op for n in result.nodes)


# --------------------------------------------------------------------------- forbidden


FORBIDDEN = [
    # FP8 Q/DQ: the EP validates zero points and has no float8 type (ONNX type 17 = E4M3FN).
    *(pytest.param(op, "fp8", PROFILE.soc_model, "Zero-point ONNX data type `17`",
                   id=f"{op}-fp8-v75") for op in MODELS),
    # int16 activations with (asymmetric, per-channel) uint8 weights on FullyConnected.
    pytest.param("Gemm", "w:uint8/a:int16", PROFILE.soc_model,
                 "of type `FullyConnected`", id="Gemm-w:uint8/a:int16-v75"),
    # No 16x16-bit multiplies before v73: W16A16 on the v68 (SM8350) refused by the validator.
    pytest.param("Conv", "w16a16", V68, "of type `Conv2d`", id="Conv-w16a16-v68"),
    pytest.param("Gemm", "w16a16", V68, "of type `FullyConnected`", id="Gemm-w16a16-v68"),
    pytest.param("MatMul", "w16a16", V68, "of type `FullyConnected`", id="MatMul-w16a16-v68"),
]


@pytest.mark.parametrize(("op", "text", "soc_model", "message"), FORBIDDEN)
def test_forbidden_candidate_is_refused_with_the_compilers_reason(exporter, op, text, soc_model,
                                                                  message):
    candidate = parse_candidate(text)
    if soc_model == PROFILE.soc_model:
        assert candidate not in PROFILE.pairs_for(op)
    result = compile_on_htp(exporter.export(op, candidate), soc_model=soc_model)
    assert not result.ok and not result.assigned_to_qnn and result.nodes == ()
    assert message in result.reason, result.messages
    assert result.messages[0] == result.reason


def test_run_on_htp_raises_with_the_reason_when_the_model_does_not_compile(exporter):
    q = exporter.export("Gemm", parse_candidate("fp8"))
    with pytest.raises(ModelError, match="Zero-point ONNX data type `17`"):
        run_on_htp(q, exporter.sample("Gemm"), soc_model=PROFILE.soc_model)


def test_dynamic_batch_is_refused_before_compiling():
    m = gemm(np.random.default_rng(0))
    for vi in (m.graph.input[0], m.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    result = compile_on_htp(m, soc_model=PROFILE.soc_model)
    assert not result.ok and "dynamic dimension 0 ('N')" in result.reason


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize(("op", "candidate"), ALLOWED)
def test_htp_output_matches_the_cpu_ep_on_the_same_qdq_model(exporter, op, candidate):
    q = exporter.export(op, candidate)
    feeds = exporter.sample(op)
    cpu = make_session(q).run(None, feeds)[0].astype(np.float64)
    htp = run_on_htp(q, feeds, soc_model=PROFILE.soc_model)["y"].astype(np.float64)
    assert htp.shape == cpu.shape
    db = sqnr_db(float((cpu**2).sum()), float(((cpu - htp) ** 2).sum()))
    assert db >= MIN_SQNR_DB, f"{op} {candidate.name}: HTP vs CPU EP {db:.1f} dB"
    step = _output_step(q)
    if candidate.activation.bits == 8 and step is not None:  # A8: within one output step
        assert np.abs(cpu - htp).max() <= step * (1 + 1e-3)
