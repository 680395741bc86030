"""How strongly an error at a layer's output reaches the network output: one noise-injection run
per layer.

The Hessian terms give a layer's own output error; what that costs at the network output
depends on everything after the layer (a late classifier passes its error straight through, an
early layer's error is partly absorbed by ReLU6 clipping and averaging, partly amplified). For
small errors the network after layer ``l`` is linear in them, so the output MSE is
``gain_l · σ²`` for white noise of variance ``σ²`` per element at the layer's output. This module
measures ``gain_l`` by adding seeded Gaussian noise at -40 dB of the tensor's power and running
only the part of the float model downstream of it on a few calibration samples, against the
float outputs (the two graphs' rounding differences are some 80 dB below the injected noise).
Cheaper than one quantized run per (layer, candidate), and it turns the layer-level Hessian
error into an output-level one:
``mse_out(l, c) ≈ gain_l · err_l(c) / elements_l``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from mpsearch.calibrate import make_session, run_collectors
from mpsearch.graph import LayerGraph
from mpsearch.sensitivity.measured import FEED_BYTES, _bytes_per_sample, _Store, downstream_model

__all__ = ["GAIN_SAMPLES", "noise_gains"]

log = logging.getLogger(__name__)

GAIN_SAMPLES = 8
NOISE_DB = -40.0


def noise_gains(lg: LayerGraph, batches: Sequence[Mapping[str, np.ndarray]],
                tensors: Mapping[str, str], *, samples: int = GAIN_SAMPLES,
                seed: int = 0) -> dict[str, float]:
    """Group -> output MSE per unit of white-noise variance at its tensor (``tensors``: group
    -> the tensor its error appears on), measured on the first ``samples`` samples."""
    use, n = [], 0
    for b in batches:
        if n >= samples:
            break
        use.append(b)
        n += len(next(iter(b.values())))
    outputs = [o.name for o in lg.model.graph.output]
    inputs = {i.name for i in lg.model.graph.input}
    ref = _Store(outputs)
    run_collectors(lg, use, [ref])
    total = sum(sum(int(v.size) for v in r.values()) for r in ref.batches)
    rng = np.random.default_rng(seed)
    gains: dict[str, float] = {}
    todo = list(tensors.items())
    i = 0
    while i < len(todo):
        chunk, feeds = [], set()
        while i < len(todo):
            g, t = todo[i]
            suf = downstream_model(lg.model, t)
            new = ({t} | set(suf.feeds)) - feeds
            size = sum(_bytes_per_sample(lg, f) for f in feeds | new) * n
            if chunk and size > FEED_BYTES:
                break
            chunk.append((g, t, suf))
            feeds |= new
            i += 1
        store = _Store(feeds - inputs)
        run_collectors(lg, use, [store])
        for g, t, suf in chunk:
            sess = make_session(suf.model) if suf.outputs else None
            noise_sq, injected, elems = 0.0, 0.0, 0
            for vals, batch, r in zip(store.batches, use, ref.batches, strict=True):
                feed = {f: (vals[f] if f in vals else batch[f]) for f in suf.feeds}
                x = vals.get(t, batch.get(t))
                if x is None:
                    continue
                power = float(np.mean(x.astype(np.float64) ** 2)) or 1e-12
                sigma = np.sqrt(power * 10 ** (NOISE_DB / 10))
                eps = (rng.standard_normal(x.shape) * sigma).astype(np.float32)
                injected += sigma**2 * x.size
                elems += x.size
                if t in outputs:  # the noise reaches the output as it is
                    noise_sq += float((eps.astype(np.float64) ** 2).sum())
                if sess is not None:
                    noisy = sess.run(list(suf.outputs), {**feed, t: x + eps})
                    for name, y in zip(suf.outputs, noisy, strict=True):
                        d = r[name].astype(np.float64) - y
                        noise_sq += float(np.vdot(d.ravel(), d.ravel()))
            # output MSE (mean over all output elements) per unit variance per element at t
            sigma2 = injected / max(elems, 1)
            gains[g] = (noise_sq / max(total, 1)) / sigma2 if sigma2 > 0 else 0.0
    return gains
