"""How strongly an error at a layer's output reaches the network output: two small runs per
layer.

The Hessian terms give a layer's own output error; what that costs at the network output
depends on everything after the layer, and on the error's shape. For small errors the network
after layer ``l`` is linear in them, so the output MSE is ``gain · e`` for an error of ``e`` per
element at the layer's output, with one gain per kind of error:

* ``white``: activation rounding at the layer's output, independent per element. Measured by
  adding seeded Gaussian noise at -40 dB of the output's power.
* ``input``: the same at the layer's input (its input quantizer), per input element. Not the
  white gain: the layer maps input noise into the few directions its weights span, which the
  layers after it may pass far more weakly than white noise.
* ``weight``: a weight error ``δW x`` has the spatial structure of the input (smooth, for an
  image), and the layers after it pass such errors very differently from white noise: on
  EfficientNet-Lite0 the stem passes white noise 300× more strongly than its own weight
  error, because the depthwise kernels after it amplify high frequencies. Measured by running
  the layer with weights perturbed uniformly within half an int8 step per channel (bias
  corrected like the real candidates), the error per element taken from the Hessian.

Each layer gets one session: the layer (weight and bias as inputs, added noise inputs at its
input and its output) and everything downstream of it, fed with stored float tensors, on a few
calibration samples, against the float outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from mpsearch.data.dataset import Batch, batch_samples
from mpsearch.graph.calibrate import Calibration
from mpsearch.graph.layer_graph import Layer, LayerGraph
from mpsearch.quant.layout import input_channel_view
from mpsearch.sensitivity.hessian import layer_output_error
from mpsearch.sensitivity.suffix import Suffix, cut, elem_types, in_passes, suffix_session

__all__ = ["GAIN_SAMPLES", "Gains", "layer_gains"]

log = logging.getLogger(__name__)

GAIN_SAMPLES = 2
NOISE_DB = -40.0
_W, _B, _N, _NI = "__gain_weight", "__gain_bias", "__gain_noise", "__gain_noise_in"
_OWN = (_W, _B, _N, _NI)


@dataclass(frozen=True)
class Gains:
    """Output MSE per unit of per-element error at the layer's output."""

    white: float
    weight: float
    input: float


def _session_model(lg: LayerGraph, layer: Layer, types: Mapping[str, int],
                   weights: Mapping[str, np.ndarray]) -> Suffix:
    node = onnx.NodeProto()
    node.CopyFrom(lg.nodes[layer.name])
    if layer.weight is not None:
        node.input[list(node.input).index(layer.weight)] = _W
    if layer.bias is not None:
        node.input[list(node.input).index(layer.bias)] = _B
    pre = f"{layer.output}__gain_pre"
    node.output[0] = pre
    noisy_in = f"{layer.inputs[0]}__gain_in"
    node.input[0] = noisy_in
    add_in = helper.make_node("Add", [layer.inputs[0], _NI], [noisy_in],
                              name=f"{layer.name}__gain_add_in")
    add = helper.make_node("Add", [pre, _N], [layer.output], name=f"{layer.name}__gain_add")
    changed, down = {layer.output}, []
    for n in lg.model.graph.node:
        if any(i in changed for i in n.input):
            down.append(n)
            changed.update(n.output)
    return cut(lg.model, [add_in, node, add, *down], types, external=weights)


def _perturbation(layer: Layer, w: np.ndarray, cal: Calibration,
                  rng: _Noise) -> tuple[np.ndarray, np.ndarray | None]:
    """Uniform weight noise within half an int8 step per output channel, and the bias shift
    that corrects its mean effect (as bias correction does for real candidates)."""
    axis = layer.channel_axis or 0
    amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
    step = np.maximum(amax, 1e-12) / 127.0
    shape = [-1 if i == axis else 1 for i in range(w.ndim)]
    dw = (rng.uniform(-0.5, 0.5, w.shape) * step.reshape(shape)).astype(np.float32)
    if layer.bias is None:
        return dw, None
    mom = cal.moments.get(layer.inputs[0])
    mean = input_channel_view(layer, w.shape, mom.mean) if mom is not None else None
    if mean is None:
        return dw, np.zeros(w.shape[axis], np.float32)
    others = tuple(i for i in range(w.ndim) if i != axis)
    return dw, (-(dw.astype(np.float64) * mean).sum(axis=others)).astype(np.float32)


def layer_gains(lg: LayerGraph, cal: Calibration, weights: Mapping[str, np.ndarray],
                batches: Sequence[Mapping[str, np.ndarray]],
                reference: Sequence[Mapping[str, np.ndarray]], groups: Sequence[str], *,
                samples: int = GAIN_SAMPLES, seed: int = 0) -> dict[str, Gains]:
    """Group -> its :class:`Gains`, measured on the first ``samples`` samples of ``batches``
    (``reference``: the float model's outputs on ``batches``)."""
    use, ref, n = [], [], 0
    static = any(i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].HasField(
        "dim_value") for i in lg.model.graph.input)
    for b, r in zip(batches, reference, strict=True):
        if n >= samples:
            break
        k = batch_samples(b)
        # the first ``samples`` samples, not a whole batch, where the samples are on axis 0 of
        # every input and output (a state or a sample rate given once: whole batches)
        if not static and n + k > samples and isinstance(b, Batch) and all(
                a == 0 for a in b.axes.values()) and all(
                np.ndim(v) and len(v) == k for v in r.values()):
            k = samples - n
            b = b.head(k)
            r = {name: v[:k] for name, v in r.items()}
        use.append(b)
        ref.append(r)
        n += k
    outputs = [o.name for o in lg.model.graph.output]
    total = sum(sum(int(v.size) for v in r.values()) for r in ref)
    types = elem_types(lg.model)
    rng = _Noise(np.random.default_rng(seed))
    out: dict[str, Gains] = {}
    items = ((lg.layers[g], _session_model(lg, lg.layers[g], types, weights)) for g in groups)
    for chunk, stored in in_passes(lg, use, items,
                                   lambda it: ({it[0].output} | set(it[1].feeds))
                                   - set(_OWN)):
        for layer, suf in chunk:
            out[layer.name] = _measure(lg, cal, weights, layer, suf, stored, use, ref, total,
                                       rng, outputs, not static)
    return out


def _measure(lg, cal, weights, layer: Layer, suf: Suffix, stored, use, ref, total: int,
             rng: _Noise, outputs: Sequence[str], batched: bool) -> Gains:
    w = weights[layer.weight] if layer.weight is not None else None
    b = weights[layer.bias] if layer.bias is not None else None
    dw, db = _perturbation(layer, w, cal, rng) if w is not None else (None, None)
    h = cal.hessians.get(layer.name)
    sess = suffix_session(suf, weights) if suf.outputs else None
    sq = {"white": 0.0, "weight": 0.0, "input": 0.0}
    injected = injected_in = 0.0
    elems = elems_in = 0
    for vals, batch, r in zip(stored, use, ref, strict=True):
        y = vals.get(layer.output, batch.get(layer.output))
        if y is None:
            continue
        feed = {f: (vals[f] if f in vals else batch[f]) for f in suf.feeds if f not in _OWN}
        eps, s2 = _noise(y, rng)
        injected += s2 * y.size
        elems += y.size
        if layer.output in outputs:  # the noise reaches the output as it is
            sq["white"] += float((eps.astype(np.float64) ** 2).sum())
        if sess is None:
            continue
        x = feed.get(layer.inputs[0])
        base = {**feed, **({_W: w} if w is not None else {}), **({_B: b} if b is not None else {})}
        zero, zero_in = np.zeros_like(y), np.zeros_like(x) if x is not None else None
        runs = [("white", {**base, _N: eps, _NI: zero_in})]
        if x is not None:
            eps_in, s2_in = _noise(x, rng)
            injected_in += s2_in * x.size
            elems_in += x.size
            runs.append(("input", {**base, _N: zero, _NI: eps_in}))
        if dw is not None and h is not None:
            pert = {**base, _W: w + dw, _N: zero, _NI: zero_in}
            if b is not None:
                pert[_B] = b + db
            runs.append(("weight", pert))
        for kinds, got in _run_all(sess, suf, runs, batched):
            for kind, outs in zip(kinds, got, strict=True):
                for name, yy in zip(suf.outputs, outs, strict=True):
                    d = r[name].astype(np.float64) - yy
                    sq[kind] += float(np.vdot(d.ravel(), d.ravel()))
    sigma2 = injected / max(elems, 1)
    white = (sq["white"] / max(total, 1)) / sigma2 if sigma2 > 0 else 0.0
    weight = white
    if dw is not None and h is not None and sess is not None:
        per_elem = layer_output_error(layer, h, dw, db) / max(layer.out_channels or 1, 1)
        if per_elem > 0:
            weight = (sq["weight"] / max(total, 1)) / per_elem
    sigma2_in = injected_in / max(elems_in, 1)
    inp = (sq["input"] / max(total, 1)) / sigma2_in if sigma2_in > 0 else white
    return Gains(white=white, weight=weight, input=inp)


def _run_all(sess, suf: Suffix, runs: list[tuple[str, dict]], batched: bool):
    """(kinds, outputs per kind) for every run. Runs with the same weights (the white and the
    input noise) go through ONNX Runtime as one call, stacked along the batch axis, when the
    batch may grow: one call of 4 samples instead of two of 2 (fewer per-call overheads)."""
    feeds = [(kind, {k: v for k, v in f.items() if k in suf.feeds}) for kind, f in runs]
    names = list(suf.outputs)
    same = [(k, f) for k, f in feeds if k in ("white", "input")]
    rest = [(k, f) for k, f in feeds if k not in ("white", "input")]
    if batched and len(same) == 2:
        (ka, fa), (kb, fb) = same
        acts = [k for k in fa if k not in (_W, _B)]
        n = {fa[k].shape[0] if fa[k].ndim >= 2 else -1 for k in acts}
        # stacked only when every other feed is a float activation with the batch first
        # (a stored shape or index tensor would be doubled too)
        if (len(n) == 1 and -1 not in n
                and all(fa[k].dtype.kind == "f" and fb[k].shape == fa[k].shape for k in acts)):
            k0 = n.pop()
            joint = {k: (v if k in (_W, _B) else np.concatenate([v, fb[k]]))
                     for k, v in fa.items()}
            quiet = ort.RunOptions()
            quiet.log_severity_level = 4  # a refusal is expected here, not worth a log line
            try:
                got = sess.run(names, joint, quiet)
            except Exception:  # noqa: BLE001 - a graph that pins the batch size (a stored
                got = []  # shape read by Expand or Reshape): the runs go one by one below
            if got and all(g.shape[0] == 2 * k0 for g in got):
                yield (ka, kb), ([g[:k0] for g in got], [g[k0:] for g in got])
                same = []
    for kind, f in [*same, *rest]:
        yield (kind,), (sess.run(names, f),)


class _Noise:
    """Standard normal noise from one seeded buffer, a random window of it per request: the
    layers' runs are independent experiments, so reusing draws across them costs nothing and
    saves generating millions of normals per layer."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.buf = np.empty(0, np.float32)

    def uniform(self, *args, **kwargs):
        return self.rng.uniform(*args, **kwargs)

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        if self.buf.size < 2 * size:
            self.buf = self.rng.standard_normal(2 * size, dtype=np.float32)
        start = int(self.rng.integers(0, self.buf.size - size + 1))
        return self.buf[start:start + size].reshape(shape)


def _noise(t: np.ndarray, rng: _Noise) -> tuple[np.ndarray, float]:
    """Gaussian noise at NOISE_DB of ``t``'s power, and its variance."""
    flat = t.ravel()
    power = float(np.dot(flat.astype(np.float64), flat)) / max(flat.size, 1) or 1e-12
    sigma = float(np.sqrt(power * 10 ** (NOISE_DB / 10)))
    return rng.normal(t.shape) * np.float32(sigma), sigma**2
