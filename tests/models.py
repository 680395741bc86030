"""Tiny ONNX models built in code for the tests (STYLE rule 10)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def mbconv(seed: int = 0, *, batch: int | str = "N", act: str = "Clip") -> onnx.ModelProto:
    """Stem conv + BN + ReLU6, an inverted-residual block (1x1 expand, 3x3 depthwise, 1x1
    project) with a residual Add, a grouped conv, a Concat, global pooling and a Gemm:
    every op kind the EfficientNet family uses, in miniature."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.4) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    inits = [
        _init("stem_w", w(8, 3, 3, 3)),
        _init("bn_scale", (1 + 0.2 * rng.standard_normal(8)).astype(np.float32)),
        _init("bn_bias", w(8, scale=0.1)), _init("bn_mean", w(8, scale=0.1)),
        _init("bn_var", (0.5 + rng.random(8)).astype(np.float32)),
        _init("exp_w", w(16, 8, 1, 1)), _init("exp_b", w(16, scale=0.1)),
        _init("dw_w", w(16, 1, 3, 3)), _init("dw_b", w(16, scale=0.1)),
        _init("proj_w", w(8, 16, 1, 1, scale=0.2)), _init("proj_b", w(8, scale=0.1)),
        _init("grp_w", w(8, 4, 3, 3, scale=0.2)), _init("grp_b", w(8, scale=0.1)),
        _init("fc_w", w(10, 16, scale=0.3)), _init("fc_b", w(10, scale=0.1)),
        _init("lo", np.float32(0.0)), _init("hi", np.float32(6.0)),
        _init("shape", np.array([0, -1], np.int64)),
    ]

    def activation(x: str, y: str, name: str) -> onnx.NodeProto:
        if act == "Clip":
            return helper.make_node("Clip", [x, "lo", "hi"], [y], name=name)
        return helper.make_node(act, [x], [y], name=name)

    nodes = [
        helper.make_node("Conv", ["x", "stem_w"], ["s"], name="stem", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("BatchNormalization", ["s", "bn_scale", "bn_bias", "bn_mean",
                                                "bn_var"], ["s_bn"], name="bn"),
        activation("s_bn", "s_act", "stem_act"),
        helper.make_node("Conv", ["s_act", "exp_w", "exp_b"], ["e"], name="expand"),
        activation("e", "e_act", "expand_act"),
        helper.make_node("Conv", ["e_act", "dw_w", "dw_b"], ["d"], name="depthwise",
                         group=16, pads=[1, 1, 1, 1]),
        activation("d", "d_act", "dw_act"),
        helper.make_node("Conv", ["d_act", "proj_w", "proj_b"], ["p"], name="project"),
        helper.make_node("Add", ["p", "s_act"], ["res"], name="residual"),
        helper.make_node("Conv", ["res", "grp_w", "grp_b"], ["gc"], name="grouped", group=2,
                         pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["gc", "res"], ["cat"], name="concat", axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["pool"], name="pool"),
        helper.make_node("Reshape", ["pool", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         [batch, 3, 16, 16])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
                  inits)


def attention(seed: int = 0) -> onnx.ModelProto:
    """One self-attention head: MatMuls with constant weights, an activation x activation
    MatMul, Softmax, a Constant-node weight, and an op the registry does not know (Einsum
    would be too exotic; CumSum is float in, float out)."""
    rng = np.random.default_rng(seed)
    d = 8

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    inits = [_init("wq", w(d, d)), _init("wk", w(d, d)), _init("bq", w(d)),
             _init("scale", np.float32(1 / np.sqrt(d))), _init("axis", np.array(1, np.int64))]
    wv_const = helper.make_node("Constant", [], ["wv"], name="wv_const",
                                value=numpy_helper.from_array(w(d, d), "wv"))
    nodes = [
        wv_const,
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q_proj"),
        helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores0"], name="qk"),
        helper.make_node("Mul", ["scores0", "scale"], ["scores"], name="scale_mul"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
        helper.make_node("CumSum", ["ctx", "axis"], ["y"], name="cumsum"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", d])], inits)


def conv_transpose(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [_init("w", (rng.standard_normal((4, 6, 3, 3)) * 0.3).astype(np.float32)),
             _init("b", (rng.standard_normal(6) * 0.1).astype(np.float32))]
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv",
                              strides=[2, 2])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 11, 11])], inits)


def runtime_pad(seed: int = 0) -> onnx.ModelProto:
    """Same-padding built at run time from ``Shape``/``Slice`` (as TF and Paddle exports write
    it): shape inference cannot tell the padded size, so neither the Conv's output shape nor its
    MACs, nor the Gemm's input after it. x [N,3,16,16] -> Pad(1) -> Conv 3x3 -> Relu -> pool ->
    Gemm."""
    rng = np.random.default_rng(seed)
    inits = [_init("w", (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)),
             _init("fw", (rng.standard_normal((4, 8)) * 0.3).astype(np.float32)),
             _init("fb", np.zeros(4, np.float32)), _init("z2", np.zeros(2, np.int64)),
             _init("s0", np.array([2], np.int64)), _init("s1", np.array([3], np.int64))]
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Slice", ["xs", "s0", "s1"], ["h"]),
        helper.make_node("Div", ["h", "h"], ["p"]),  # 1, known only at run time
        helper.make_node("Concat", ["z2", "p", "p", "z2", "p", "p"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["xp"]),
        helper.make_node("Conv", ["xp", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="fc"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits,
                  opset=17)


def fp16_overflow(seed: int = 0) -> onnx.ModelProto:
    """Two MatMuls; the first has one weight of 1e5, beyond fp16's 65504 (an audio front end's
    filterbank at int16 scale): fp16 overflows on its weights, and on the second's input."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 32)) * 0.2).astype(np.float32)
    w1[0, 0] = 1.0e5
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="big"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="out")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                  [_init("w1", w1), _init("w2", (rng.standard_normal((32, 8)) * 0.2)
                                                .astype(np.float32))], opset=17)


def with_if(seed: int = 0) -> onnx.ModelProto:
    """A Gemm, then an ``If`` whose branches read outer-scope tensors: a ``Constant`` node of
    the main graph (ingestion makes it an initializer) and the Gemm's output, as speech
    exports' voice-activity branches do."""
    rng = np.random.default_rng(seed)
    then = helper.make_graph([helper.make_node("Mul", ["h", "k"], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Constant", [], ["k"], value=helper.make_tensor(
            "k", TensorProto.FLOAT, [1, 8], (rng.standard_normal(8) + 2).tolist())),
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, name="fc"),
        helper.make_node("ReduceMax", ["h"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="gate"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                  [_init("w", (rng.standard_normal((8, 16)) * 0.3).astype(np.float32)),
                   _init("b", np.zeros(8, np.float32)), _init("zero", np.array(0, np.float32))],
                  opset=17)


def if_sample_rate(seed: int = 0) -> onnx.ModelProto:
    """Silero VAD's layout: every layer inside the branches of an ``If`` on a scalar ``sr``
    input (16 kHz: two Gemms with a Relu; else one Gemm), the branches reading the main graph's
    weights from the outer scope."""
    rng = np.random.default_rng(seed)

    def w(name, rows, cols):
        return _init(name, (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32))

    fast = helper.make_graph([
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y16"], transB=1, name="fc2")],
        "sr16k", [], [helper.make_tensor_value_info("y16", TensorProto.FLOAT, None)])
    slow = helper.make_graph([
        helper.make_node("Gemm", ["x", "w3", "b2"], ["y8"], transB=1, name="fc8")],
        "sr8k", [], [helper.make_tensor_value_info("y8", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Equal", ["sr", "k16000"], ["is16k"], name="is16k"),
             helper.make_node("If", ["is16k"], ["y"], then_branch=fast, else_branch=slow,
                              name="by_rate")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                          helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                  [w("w1", 32, 16), _init("b1", np.zeros(32, np.float32)), w("w2", 4, 32),
                   _init("b2", np.zeros(4, np.float32)), w("w3", 4, 16),
                   _init("k16000", np.array(16000, np.int64))], opset=17)


def if_detector(seed: int = 0, *, shapes: bool = True) -> onnx.ModelProto:
    """openWakeWord's *hey jarvis* layout: a detector (Gemm, Relu, Gemm, Sigmoid) whose score
    decides, per sample, an ``If``: at 0.5 or above a verifier network (two Gemms reading the
    main graph's weights and input from the outer scope) gives the output, else the score
    itself. Batch 1, as exported. ``shapes=False`` leaves the branches' output shapes unknown."""
    rng = np.random.default_rng(seed)

    def w(name, rows, cols, scale=1.0):
        return _init(name, (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)
                            ).astype(np.float32))

    def out(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1] if shapes else None)

    verify = helper.make_graph([
        helper.make_node("Gemm", ["x", "v1", "vb1"], ["vh"], transB=1, name="verifier1"),
        helper.make_node("Relu", ["vh"], ["vr"], name="verifier_relu"),
        helper.make_node("Gemm", ["vr", "v2", "vb2"], ["vz"], transB=1, name="verifier2"),
        helper.make_node("Sigmoid", ["vz"], ["p2"], name="verifier_sigmoid")],
        "verify", [], [out("p2")])
    keep = helper.make_graph([helper.make_node("Identity", ["p"], ["p1"], name="keep_score")],
                             "keep", [], [out("p1")])
    nodes = [helper.make_node("Gemm", ["x", "d1", "db1"], ["h"], transB=1, name="detector1"),
             helper.make_node("Relu", ["h"], ["r"], name="detector_relu"),
             helper.make_node("Gemm", ["r", "d2", "db2"], ["z"], transB=1, name="detector2"),
             helper.make_node("Sigmoid", ["z"], ["p"], name="detector_sigmoid"),
             helper.make_node("GreaterOrEqual", ["p", "half"], ["fires"], name="fires"),
             helper.make_node("If", ["fires"], ["y"], then_branch=verify, else_branch=keep,
                              name="verify_if")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 24])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
                  [w("d1", 32, 24), _init("db1", np.zeros(32, np.float32)),
                   w("d2", 1, 32, 3.0), _init("db2", np.zeros(1, np.float32)),
                   w("v1", 16, 24), _init("vb1", np.zeros(16, np.float32)),
                   w("v2", 1, 16, 3.0), _init("vb2", np.full(1, 1.0, np.float32)),
                   _init("half", np.array(0.5, np.float32))], opset=17)


def power_spectrum(seed: int = 0) -> onnx.ModelProto:
    """openWakeWord's mel front end in miniature: two Gemms (the STFT's real and imaginary
    parts), each squared by ``Mul(x, x)``, summed, a mel MatMul with non-negative weights, then
    ``Log(1 + mel)`` (the Log left in float): the squared spectrum spans twice its input's
    dynamic range, and the log makes its quiet bins count."""
    rng = np.random.default_rng(seed)
    t = np.arange(64) / 64.0
    freqs = np.arange(1, 33)[:, None]
    re = (np.cos(2 * np.pi * freqs * t) / 8).astype(np.float32)
    im = (np.sin(2 * np.pi * freqs * t) / 8).astype(np.float32)
    mel = np.abs(rng.standard_normal((32, 8))).astype(np.float32) / 4
    nodes = [helper.make_node("Gemm", ["x", "re_w"], ["re"], transB=1, name="stft_re"),
             helper.make_node("Gemm", ["x", "im_w"], ["im"], transB=1, name="stft_im"),
             helper.make_node("Mul", ["re", "re"], ["re2"], name="square_re"),
             helper.make_node("Mul", ["im", "im"], ["im2"], name="square_im"),
             helper.make_node("Add", ["re2", "im2"], ["power"], name="power"),
             helper.make_node("MatMul", ["power", "mel_w"], ["mel"], name="mel"),
             helper.make_node("Add", ["mel", "one"], ["mel1"], name="plus_one"),
             helper.make_node("Log", ["mel1"], ["y"], name="log")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                  [_init("re_w", re), _init("im_w", im), _init("mel_w", mel),
                   _init("one", np.array(1.0, np.float32))])


def softmax_opset11(seed: int = 0) -> onnx.ModelProto:
    """A Paddle-style classifier head at opset 11: Conv, then Softmax over axis 1 of a 4-D
    tensor, then Identity to the output. Raising it to opset 13 for int8 makes ONNX's converter
    wrap the Softmax in inserted Shape/Flatten/Reshape nodes, so the Softmax's output tensor
    is produced by a node the layer graph never saw."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Softmax", ["c"], ["p"], axis=1, name="softmax"),
             helper.make_node("Identity", ["p"], ["y"], name="out")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                  [_init("w", (rng.standard_normal((4, 3, 1, 1)) * 0.5).astype(np.float32))],
                  opset=11)


def hardswish(seed: int = 0) -> onnx.ModelProto:
    """PaddleOCR's hard-swish as Paddle exports it: conv, ``x * Clip(x + 3, 0, 6) * (1/6)``,
    conv. In 16-bit activations, the Clip's limit 6 lies inside the range the observed
    values would get with headroom ([0, 9]); QNN's HTP clamps such a Clip to its output
    encoding, not to 6."""
    rng = np.random.default_rng(seed)

    def conv(name, x, y, cin, cout):
        return ([helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name,
                                  pads=[1, 1, 1, 1])],
                [_init(f"{name}_w", (rng.standard_normal((cout, cin, 3, 3))
                                     * 1.5 / np.sqrt(cin * 9)).astype(np.float32)),
                 _init(f"{name}_b", (rng.standard_normal(cout) * 0.5).astype(np.float32))])

    n0, i0 = conv("conv0", "x", "c0", 3, 8)
    n1, i1 = conv("conv1", "hs", "y", 8, 4)
    nodes = [*n0, helper.make_node("Add", ["c0", "three"], ["a"], name="add3"),
             helper.make_node("Clip", ["a", "zero", "six"], ["k"], name="clip"),
             helper.make_node("Mul", ["c0", "k"], ["m"], name="mul"),
             helper.make_node("Mul", ["m", "sixth"], ["hs"], name="div6"), *n1]
    consts = [_init("three", np.float32(3)), _init("zero", np.float32(0)),
              _init("six", np.float32(6)), _init("sixth", np.float32(1 / 6))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
                  [*i0, *i1, *consts], opset=13)


def misdeclared_output(seed: int = 0) -> onnx.ModelProto:
    """An opset-12 export whose graph output is declared ``[1, seqlen]`` although it is
    ``[N, 1, 6]`` (a Reshape to a shape built at run time from Shape/Gather/Concat; ddddocr's
    recognizer). ONNX's checker accepts it at opset 12, where shape inference cannot see
    through the run-time shape; ONNX Runtime warns and computes rank 3."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=1),
             helper.make_node("Shape", ["x"], ["sx"], name="shape"),
             helper.make_node("Gather", ["sx", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n"], ["n1"], name="unsqueeze", axes=[0]),
             helper.make_node("Concat", ["n1", "one_six"], ["dims"], name="concat", axis=0),
             helper.make_node("Reshape", ["g", "dims"], ["y"], name="reshape")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seqlen"])],
                  [_init("w", rng.standard_normal((6, 4)).astype(np.float32)),
                   _init("b", np.zeros(6, np.float32)), _init("zero", np.int64(0)),
                   _init("one_six", np.array([1, 6], np.int64))], opset=12)


def dead_channels(seed: int = 0) -> onnx.ModelProto:
    """A conv, then a depthwise 5x5 conv three of whose channels batch-norm folding left
    nearly dead (weights ~1e-9 beside ~0.1, biases ~0.01), as in PaddleOCR's detector."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w1 = (rng.standard_normal((16, 1, 5, 5)) * 0.1).astype(np.float32)
    w1[:3] *= 1e-8
    b1 = (rng.standard_normal(16) * 0.3).astype(np.float32)
    b1[:3] = 0.01
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "w1", "b1"], ["y"], name="depthwise", group=16,
                              pads=[2, 2, 2, 2])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])],
                  [_init("w0", w0), _init("w1", w1), _init("b1", b1)], opset=13)


def heavy_tailed(seed: int = 0) -> onnx.ModelProto:
    """Two 3x3 convs whose weights are heavy-tailed (Student t, 2 degrees of freedom), so
    that the clipping search cuts each channel's tails: many weights sit at the grid's ends."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_t(2, (16, 3, 3, 3)) * 0.2).astype(np.float32)
    w1 = (rng.standard_t(2, (8, 16, 3, 3)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w1"], ["y"], name="conv1", pads=[1, 1, 1, 1])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
                  [_init("w0", w0), _init("w1", w1)], opset=13)


def erf_gelu(seed: int = 0, *, opset: int = 11) -> onnx.ModelProto:
    """A Gemm, the exact GELU as PaddlePaddle exports it (``x / √2 -> Erf -> + 1 -> · x ->
    · 0.5``), a Gemm: the Erf is an op QNN's HTP does not have."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], transB=1, name="fc0"),
             helper.make_node("Div", ["h", "sqrt2"], ["hs"], name="div"),
             helper.make_node("Erf", ["hs"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="add"),
             helper.make_node("Mul", ["h", "e1"], ["he"], name="mul"),
             helper.make_node("Mul", ["he", "half"], ["g"], name="half_mul"),
             helper.make_node("Gemm", ["g", "w1", "b1"], ["y"], transB=1, name="fc1")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                  [_init("w0", (rng.standard_normal((32, 16)) / 4).astype(np.float32)),
                   _init("b0", np.zeros(32, np.float32)),
                   _init("w1", (rng.standard_normal((8, 32)) / 6).astype(np.float32)),
                   _init("b1", np.zeros(8, np.float32)), _init("sqrt2", np.float32(2 ** 0.5)),
                   _init("one", np.float32(1)), _init("half", np.float32(0.5))], opset=opset)


def sigmoid_head(seed: int = 0, *, bias: float = -9.0, gain: float = 0.1) -> onnx.ModelProto:
    """A wake-word head in miniature (openWakeWord's "hey mycroft"): a Gemm whose logits sit
    near -9, then a Sigmoid, so every output is below 1e-3; and a Tanh beside it. ``bias=0``
    and ``gain=2``: logits of a few units either side of 0, outputs across (0, 1) (a SiLU's
    gate, a detector's class scores)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["z"], transB=1, name="fc"),
             helper.make_node("Sigmoid", ["z"], ["p"], name="sigmoid"),
             helper.make_node("Gemm", ["x", "w2", "b2"], ["u"], transB=1, name="fc2"),
             helper.make_node("Tanh", ["u"], ["t"], name="tanh")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                  [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2]),
                   helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])],
                  [_init("w", (rng.standard_normal((2, 16)) * gain).astype(np.float32)),
                   _init("b", np.full(2, bias, np.float32)),
                   _init("w2", (rng.standard_normal((4, 16)) * 0.3).astype(np.float32)),
                   _init("b2", np.zeros(4, np.float32))], opset=13)


def dynamic_clip(seed: int = 0) -> onnx.ModelProto:
    """A dB spectrogram's top-dB floor as openWakeWord's mel front end computes it: a Gemm,
    then ``Clip(y, ReduceMax(y) - 8)``, a Clip whose lower limit is computed at run time
    (QNN refuses it), then a Gemm."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["y"], transB=1, name="fc0"),
             helper.make_node("ReduceMax", ["y"], ["m"], keepdims=0, name="reducemax"),
             helper.make_node("Sub", ["m", "eight"], ["lo"], name="sub"),
             helper.make_node("Clip", ["y", "lo"], ["c"], name="clip"),
             helper.make_node("Gemm", ["c", "w1", "b1"], ["z"], transB=1, name="fc1")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])],
                  [_init("w0", (rng.standard_normal((32, 16)) * 2).astype(np.float32)),
                   _init("b0", np.zeros(32, np.float32)),
                   _init("w1", (rng.standard_normal((8, 32)) / 6).astype(np.float32)),
                   _init("b1", np.zeros(8, np.float32)), _init("eight", np.float32(8))],
                  opset=13)


def square(seed: int = 0) -> onnx.ModelProto:
    """A power spectrum as openWakeWord's mel front end computes it: two Gemms (real and
    imaginary parts, of both signs), each squared with ``Pow(·, 2)``, added, then a Gemm."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "wr", "b"], ["re"], transB=1, name="real"),
             helper.make_node("Gemm", ["x", "wi", "b"], ["im"], transB=1, name="imag"),
             helper.make_node("Pow", ["re", "two"], ["re2"], name="pow_re"),
             helper.make_node("Pow", ["im", "two"], ["im2"], name="pow_im"),
             helper.make_node("Add", ["re2", "im2"], ["p"], name="add"),
             helper.make_node("Gemm", ["p", "w1", "b1"], ["z"], transB=1, name="mel")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])],
                  [_init("wr", (rng.standard_normal((32, 16)) / 4).astype(np.float32)),
                   _init("wi", (rng.standard_normal((32, 16)) / 4).astype(np.float32)),
                   _init("b", np.zeros(32, np.float32)),
                   _init("w1", np.abs(rng.standard_normal((8, 32)) / 6).astype(np.float32)),
                   _init("b1", np.zeros(8, np.float32)), _init("two", np.float32(2))],
                  opset=13)


def log_power(seed: int = 0) -> onnx.ModelProto:
    """A dB spectrum of int16-scale audio in miniature: a Gemm, its square (``Mul``; values
    ~1e8, past fp16's 65504) and a ``Log`` that mpsearch leaves in float."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc"),
             helper.make_node("Mul", ["y", "y"], ["p"], name="square"),
             helper.make_node("Add", ["p", "one"], ["p1"], name="floor"),
             helper.make_node("Log", ["p1"], ["z"], name="log")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])],
                  [_init("w", (rng.standard_normal((8, 16)) / 4).astype(np.float32)),
                   _init("b", np.zeros(8, np.float32)), _init("one", np.float32(1))],
                  opset=13)


def images(n: int, seed: int = 0, shape: tuple[int, ...] = (3, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def toy_profile(name: str, *, pairs: str, patterns: str, bytes_per_s: float = 1e15,
                per_layer_s: float = 0.0) -> str:
    """A TensorRT-like profile in miniature (YAML text) for sparsity tests: int8 and fp16,
    ``pairs`` the extra pairs of Conv and Gemm (e.g. "w8a8+2:4"), ``patterns`` the YAML lines
    of its sparsity patterns (indented by four spaces)."""
    return f"""\
schema: 1
name: {name}
target: {{runtime: tensorrt}}
formats:
  weights: [int8, fp16]
  activations: [uint8, fp16]
ops:
  default: [w8a8, fp16]
  Conv: [w8a8, fp16, {pairs}]
  Gemm: [w8a8, fp16, {pairs}]
cost:
  compute:
    macs_per_s: {{w8a8: 1.0e+9, fp16: 5.0e+8}}
    source: placeholder
  memory: {{bytes_per_s: {bytes_per_s:.1e}, source: placeholder}}
  energy:
    pj_per_mac: {{w8a8: 1, fp16: 4}}
    pj_per_byte: 10
    source: placeholder
  overhead: {{per_layer_s: {per_layer_s:g}, source: placeholder}}
  conversion: {{per_edge_s: 0, per_byte_s: 0, source: placeholder}}
sparsity:
  patterns:
{patterns}
  source: placeholder
rules:
  tie: [Add, Concat]
"""


def mbconv_files(d) -> dict:
    """The search tests' inputs in folder ``d``: :func:`mbconv` (seed 5) as ``model.onnx``, 24
    calibration images and 16 evaluation images of other seeds."""
    from pathlib import Path

    d = Path(d)
    onnx.save(mbconv(seed=5), str(d / "model.onnx"))
    np.savez(d / "calib.npz", x=images(24, seed=1))
    np.savez(d / "eval.npz", x=images(16, seed=2))
    return {"model": d / "model.onnx", "calib": d / "calib.npz", "eval": d / "eval.npz",
            "dir": d}
