"""What a model's data must look like: its graph inputs with their dtypes, shapes, named and
placeholder dims, and each input's sample axis (:class:`DataSpec`).

Real exports are not all batch-first: a recurrent state ``[2, N, 128]`` takes its samples on
axis 1, a sequence-first LSTM input ``[seq, batch, feat]`` on the axis its user declares, and a
sample rate or a fixed initial state is the same for every sample (given once). Dims written
as placeholders (PaddlePaddle's ``?``, ``-1``) are independent sizes, never one symbol.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto

from mpsearch.core.errors import DataError, UsageError

__all__ = ["DataSpec", "InputSpec", "input_specs", "is_symbol"]


def is_symbol(dim_param: str) -> bool:
    """Whether a ``dim_param`` names a size shared by every dim that carries it. Exporters also
    write placeholders for "unknown" (PaddlePaddle ``?``, others ``-1`` or ``None``): two dims
    with such a placeholder are two independent sizes, not one symbol."""
    return bool(_SYMBOL.fullmatch(dim_param)) and dim_param.lower() not in ("none", "null")


_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/+*\- ]*")


def input_specs(model: ModelProto) -> dict[str, tuple[int, tuple[int | str | None, ...]]]:
    """Graph inputs (initializers excluded): name -> (ONNX elem type, shape with symbols; None
    for a dynamic dim without one, :func:`is_symbol`)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param") and is_symbol(d.dim_param):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[vi.name] = (tt.elem_type, tuple(dims))
    return out


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """One model input; ``shape`` has None for dynamic dims. ``sample_axis``: the model axis the
    samples go to (the stored arrays keep them on their axis 0); None for an input given once,
    the same for every sample (a recurrent state, a sample rate)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    dim_names: tuple[str | None, ...] = ()  # the symbol of each named dynamic dim
    sample_axis: int | None = 0

    def describe(self) -> str:
        dims = [str(d) if d is not None else n or "?"
                for d, n in zip(self.shape, self.dim_names, strict=True)]
        return f"({', '.join(dims)})"

    @property
    def per_sample(self) -> tuple[int, ...]:
        """The model axes one stored sample fills, in order: every axis but the sample axis."""
        return tuple(i for i in range(len(self.shape)) if i != self.sample_axis)

    def stored(self) -> str:
        """How the stored arrays must look, for messages."""
        if self.sample_axis is None:
            return self.describe()
        dims = [str(self.shape[i]) if self.shape[i] is not None else self.dim_names[i] or "?"
                for i in self.per_sample]
        return f"(samples, {', '.join(dims)})"


@dataclass(frozen=True)
class DataSpec:
    """What the data must look like: the model's graph inputs, in graph order."""

    inputs: tuple[InputSpec, ...]

    @classmethod
    def from_model(cls, model: ModelProto,
                   sample_axes: Mapping[str, int | None] | None = None) -> DataSpec:
        """``sample_axes``: input -> the model axis its samples go to, or None for an input
        given once. By default: the axis whose symbol is another input's axis-0 symbol (a
        state ``[2, batch, 128]`` beside ``x [batch, 576]``: axis 1); else, where axis 0 is
        static and more than 1, the first dynamic axis (``[2, N, 128]``); else axis 0 (a batch
        fixed at 1 with a dynamic width, ``[1, 1, 64, W]``, is batch-first). A scalar is given
        once."""
        declared = dict(sample_axes or {})
        specs = input_specs(model)
        unknown = sorted(set(declared) - set(specs))
        if unknown:
            raise UsageError(f"--sample-axis names {', '.join(unknown)}, not an input of the "
                             "model", fix=f"the model's inputs are {', '.join(specs)}")
        # the symbols other inputs carry on axis 0: a batch they share with this one
        batch_symbols = {d[0] for _, d in specs.values() if d and isinstance(d[0], str)}
        out = []
        for name, (elem, dims) in specs.items():
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
            except (KeyError, TypeError) as e:
                raise DataError(f"model input '{name}' has ONNX element type {elem}, which has "
                                "no numpy dtype", fix="export it with a standard type") from e
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in dims)
            if name in declared:
                axis = declared[name]
                if axis is not None and not 0 <= axis < len(shape):
                    raise UsageError(f"--sample-axis {name}={axis}: the input has {len(shape)} "
                                     "axes", fix=f"give an axis from 0 to {len(shape) - 1}, or "
                                                 "none for an input given once")
            elif not shape:
                axis = None  # a scalar: given once
            else:
                axis = _inferred_axis(shape, dims, batch_symbols - {dims[0]})
            out.append(InputSpec(
                name=name, dtype=dtype, shape=shape, sample_axis=axis,
                dim_names=tuple(d if isinstance(d, str) and d else None for d in dims)))
        return cls(tuple(out))

    def given_once(self, names: Iterable[str]) -> DataSpec:
        """The same inputs, those of ``names`` given once (no sample axis)."""
        names = set(names)
        return DataSpec(tuple(dataclasses.replace(s, sample_axis=None) if s.name in names
                              else s for s in self.inputs))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    def __getitem__(self, name: str) -> InputSpec:
        return {s.name: s for s in self.inputs}[name]

    @property
    def static_batch(self) -> int | None:
        """The model's batch size where an input's sample axis is static, else None."""
        sizes = {s.shape[s.sample_axis] for s in self.inputs
                 if s.sample_axis is not None and s.shape[s.sample_axis] is not None}
        return min(sizes, default=None)


def _inferred_axis(shape: tuple[int | None, ...], dims: tuple[int | str | None, ...],
                   batch_symbols: set) -> int:
    """The sample axis of an input nobody declared (see :meth:`DataSpec.from_model`)."""
    shared = next((i for i, d in enumerate(dims) if i and d in batch_symbols), None)
    if shared is not None and shape[0] is not None:
        return shared
    if shape[0] is not None and shape[0] > 1:
        return next((i for i, d in enumerate(shape) if d is None), 0)
    return 0
