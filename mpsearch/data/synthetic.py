"""Inputs for a run without data: random arrays of the model's declared shapes and dtypes.

``mpsearch run model.onnx --hw PROFILE`` with no ``--data`` and no ``calib.npz`` / ``calib/``
beside the model still runs, data-free: float inputs take standard-normal values, integer
inputs 0 or 1 (a valid token id, index or mask value in every model seen here), booleans
either, each sample its own draw from a generator seeded by ``--seed``. Nothing measured on
them says anything about real inputs (a network's activations on noise are not its
activations on photos), so the run warns on stderr and the report carries a banner; what
such a run is good for is the ingestion, the device check and a first plan. Dynamic dims
other than the sample axis take their size from ``--input-shape``, else the run stops and
names them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import ModelProto

from mpsearch.core.errors import UsageError
from mpsearch.data.spec import DataSpec

__all__ = ["SAMPLES", "WARNING", "synthetic_inputs"]

SAMPLES = 32
WARNING = ("no --data, and no calib.npz or calib/ beside the model: calibrated, searched and "
           "measured on random inputs of the declared shapes (data-free); no figure of this run "
           "says how the plan does on real inputs; pass --data")


def synthetic_inputs(model: ModelProto, *, seed: int, samples: int = SAMPLES,
                     shapes: Mapping[str, tuple[int, ...]] | None = None,
                     sample_axes: Mapping[str, int | None] | None = None
                     ) -> dict[str, np.ndarray]:
    """Input name -> ``samples`` random samples stacked on axis 0 (an input given once: one
    array of its own shape), as :func:`mpsearch.data.dataset.open_dataset` reads them.
    ``shapes``: input -> its full model shape (``--input-shape``), for dynamic dims."""
    spec = DataSpec.from_model(model, sample_axes)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for s in spec.inputs:
        given = (shapes or {}).get(s.name)
        dims = list(given) if given is not None else list(s.shape)
        if len(dims) != len(s.shape):
            raise UsageError(f"--input-shape {s.name} has {len(dims)} dims, the input "
                             f"{len(s.shape)}", fix=f"give {len(s.shape)} dims")
        per = [dims[i] for i in s.per_sample] if s.sample_axis is not None else dims
        if any(d is None for d in per):
            names = [s.dim_names[i] or "?" for i in (s.per_sample if s.sample_axis is not None
                                                     else range(len(dims)))
                     if dims[i] is None]
            raise UsageError(f"without --data, input '{s.name}' needs a size for its dynamic "
                             f"dim(s) {', '.join(names)}",
                             fix=f"pass --input-shape {s.name}=" + ",".join(
                                 str(d or 1) for d in dims) + " with the sizes, or --data")
        shape = [samples, *per] if s.sample_axis is not None else per
        if s.dtype.kind == "f":
            a = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind in "iu":
            a = rng.integers(0, 2, size=shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            a = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise UsageError(f"without --data, input '{s.name}' of dtype {s.dtype} cannot be "
                             "made up", fix="pass --data")
        out[s.name] = a
    return out
