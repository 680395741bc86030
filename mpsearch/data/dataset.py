"""Calibration and evaluation data: ``.npz``/``.npy`` files checked against the model, streamed.

Axis 0 of every stored array is the sample axis and maps to the input's sample axis in the
model: an input of shape ``(N, 3, 8, 8)`` takes arrays of shape ``(S, 3, 8, 8)``. An input's
sample axis is axis 0, or the first dynamic axis where axis 0 is static (a state ``[2, N, 128]``
takes ``(S, 2, 128)``, its samples moved to axis 1 in each batch), or as declared
(``sample_axes``). An input given once (a scalar; a fully static input stored with exactly its
shape; one declared with axis None) is the same array in every batch. ``--data`` may be

* **a .npz file**: one key per model input, plus an optional ``labels`` key (1-D integers, one
  per sample). Other keys are ignored with a warning.
* **a folder of .npz files**, each like the above, samples in sorted file-name order; either
  every file has ``labels`` or none does.
* **a folder of .npy files**: if there is a ``<input name>.npy`` for every input, each holds
  that input (other .npy files are ignored with a warning); otherwise, for a single-input
  model, every .npy file is a batch of samples, concatenated in sorted file-name order. An
  optional ``labels.npy`` labels the whole. A folder mixing .npz and .npy is refused.
* **a .npy file**, for a single-input model.

Checked when opened, from the array headers alone: names; dtypes (float data of another
width is cast with a warning, integers of another integer type are cast with a range check
per batch, integer data for a float input is refused since it usually means the model's
preprocessing was not applied); shapes (static dims must match, dynamic dims take any value,
but a named dim such as ``seq`` must agree across the inputs of one file); equal sample
counts; file sizes against headers; labels. NaN/Inf are caught while streaming, batch by
batch; :meth:`Dataset.check_values` does that pass up front.

Streaming: ``.npy`` files are memory-mapped; ``.npz`` members are read forward from the zip
stream in bounded chunks, because ``np.load`` reads a whole member on access. A batch never
mixes samples whose dynamic dims differ (it is cut short where they change). When the model's
batch dim is static (say 1), every batch has that size and a short one is dropped with a warning.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from onnx import ModelProto

from mpsearch.core.errors import DataError, UsageError
from mpsearch.data.audio import AUDIO_SUFFIXES, decode_audio_folder
from mpsearch.data.images import IMAGE_SUFFIXES, Preprocess, decode_folder
from mpsearch.data.npyio import (
    READ_ERRORS,
    Reader,
    StoredArray,
    ZipRows,
    npy_array,
    npy_rows,
    npz_members,
)
from mpsearch.data.spec import DataSpec

__all__ = ["Batch", "Dataset", "Split", "batch_samples", "constant_samples", "media_folder",
           "open_dataset", "split"]

log = logging.getLogger(__name__)

LABELS = "labels"
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class _Source:
    """Samples ``offset .. offset + n`` of the data set: one array per input."""

    arrays: Mapping[str, StoredArray]
    n: int
    offset: int


class Batch(dict):
    """Input name -> array, as a session takes it, knowing how many samples it holds and on
    which axis of each input (None: given once, the same array for every sample)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], *, samples: int,
                 axes: Mapping[str, int | None]) -> None:
        super().__init__(arrays)
        self.samples, self.axes = samples, dict(axes)

    def head(self, k: int) -> Batch:
        """The first ``k`` samples (inputs given once stay whole)."""
        return Batch({n: v if self.axes.get(n) is None else
                      np.ascontiguousarray(np.take(v, np.arange(k), axis=self.axes[n]))
                      for n, v in self.items()}, samples=min(k, self.samples), axes=self.axes)


def constant_samples(batches: Iterable[Mapping[str, np.ndarray]]) -> list[int]:
    """Positions of the samples whose every per-sample input holds one value throughout (an
    all-zero image, a silent recording): they calibrate nothing and their output error has
    no signal to be measured against."""
    out: list[int] = []
    pos = 0
    for b in batches:
        n = batch_samples(b)
        axes = b.axes if isinstance(b, Batch) else dict.fromkeys(b, 0)
        flags, seen = np.ones(n, bool), False
        for name, a in b.items():
            if axes.get(name) is None or not np.asarray(a).size:
                continue
            rows = np.moveaxis(np.asarray(a), axes[name], 0).reshape(n, -1)
            flags &= rows.max(axis=1) == rows.min(axis=1)
            seen = True
        if seen:
            out += [pos + int(i) for i in np.flatnonzero(flags)]
        pos += n
    return out


def batch_samples(batch: Mapping[str, np.ndarray]) -> int:
    """How many samples ``batch`` holds: its own count (a :class:`Batch`), else the length of
    its first array's axis 0."""
    if isinstance(batch, Batch):
        return batch.samples
    return len(next(iter(batch.values())))


class Dataset:
    """Samples checked against a model, read in batches; see the module docstring."""

    def __init__(self, *, name: str, path: Path, spec: DataSpec, sources: Sequence[_Source],
                 labels: np.ndarray | None, batch_size: int,
                 indices: np.ndarray | None = None) -> None:
        self.name, self.path, self.spec, self.batch_size = name, path, spec, batch_size
        self._sources, self._labels = tuple(sources), labels
        self._indices = indices  # sorted sample indices into all the data; None for all

    def __len__(self) -> int:
        return sum(s.n for s in self._sources) if self._indices is None else len(self._indices)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {str(self.path)!r}, {len(self)} samples)"

    @property
    def labels(self) -> np.ndarray | None:
        """Integer labels (int64), one per sample, or None."""
        if self._labels is None or self._indices is None:
            return self._labels
        return self._labels[self._indices]

    def source_index(self, k: int) -> int:
        """The index, in all the data at :attr:`path`, of this set's ``k``-th sample."""
        return k if self._indices is None else int(self._indices[k])

    def take(self, indices: Sequence[int] | np.ndarray, *, name: str | None = None) -> Dataset:
        """The samples at ``indices`` (distinct positions in this data set), in data order."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
            raise UsageError("take() needs a non-empty 1-D sequence of integer sample indices")
        idx = np.sort(idx.astype(np.int64))
        if idx[0] < 0 or idx[-1] >= len(self) or np.any(np.diff(idx) == 0):
            raise UsageError(f"take() indices must be distinct and in 0..{len(self) - 1}")
        return Dataset(name=name or self.name, path=self.path, spec=self.spec,
                       sources=self._sources, labels=self._labels, batch_size=self.batch_size,
                       indices=idx if self._indices is None else self._indices[idx])

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield input name -> C-contiguous array of the model's dtype, samples in order."""
        bs = _batch_size(self.batch_size if batch_size is None else batch_size,
                         self.spec.static_batch)
        pending: list[dict[str, np.ndarray]] = []
        count, shapes = 0, None
        for src in self._sources:
            if self._indices is None:
                local = np.arange(src.n)
            else:
                lo, hi = np.searchsorted(self._indices, [src.offset, src.offset + src.n])
                local = self._indices[lo:hi] - src.offset
            if local.size == 0:
                continue
            src_shapes = [a.shape[1:] if self.spec[n].sample_axis is not None else a.shape
                          for n, a in src.arrays.items()]
            if count and src_shapes != shapes:
                yield from self._emit(pending, count, bs)
                pending, count = [], 0
            shapes = src_shapes
            with ExitStack() as stack:
                readers = {n: self._reader(a, stack) for n, a in src.arrays.items()
                           if self.spec[n].sample_axis is not None}
                once = {n: self._given_once(a, src) for n, a in src.arrays.items()
                        if self.spec[n].sample_axis is None}
                pos = 0
                while pos < local.size:
                    idx = local[pos:pos + bs - count]
                    pending.append({n: self._convert(n, self._read(read, src.arrays[n], idx),
                                                     src, idx) for n, read in readers.items()}
                                   | once)
                    count, pos = count + idx.size, pos + idx.size
                    if count == bs:
                        yield from self._emit(pending, count, bs)
                        pending, count = [], 0
        if count:
            yield from self._emit(pending, count, bs)

    def check_values(self) -> None:
        """Read everything once, batch by batch, so that a NaN/Inf fails now, not later."""
        for _ in self.batches():
            pass

    def _emit(self, parts: list[dict[str, np.ndarray]], count: int,
              bs: int) -> Iterator[dict[str, np.ndarray]]:
        if self.spec.static_batch is not None and count != bs:
            log.warning("%s data: dropping a batch of %d samples; the model takes batches of "
                        "exactly %d", self.name, count, bs)
            return
        out = {}
        for n in parts[0]:
            axis = self.spec[n].sample_axis
            if axis is None:  # given once: the same array in every batch
                out[n] = parts[0][n]
                continue
            a = parts[0][n] if len(parts) == 1 else np.concatenate([p[n] for p in parts])
            out[n] = a if axis == 0 else np.ascontiguousarray(np.moveaxis(a, 0, axis))
        yield Batch(out, samples=count, axes={n: self.spec[n].sample_axis for n in out})

    def _given_once(self, arr: StoredArray, src: _Source) -> np.ndarray:
        """An input given once, read whole and checked like a batch."""
        a = _read_whole(arr, f"{self.name} data {arr.path}", "it")
        name = next(n for n, x in src.arrays.items() if x is arr)
        return self._convert(name, a[None], src, np.zeros(1, np.int64))[0, ...]

    def _reader(self, arr: StoredArray, stack: ExitStack) -> Reader:
        try:
            if arr.key is None:
                return npy_rows(arr)
            zf = stack.enter_context(zipfile.ZipFile(arr.path))
            member = f"{arr.key}.npy"
            return ZipRows(stack.enter_context(zf.open(member)), zf.getinfo(member).file_size,
                            arr, f"{self.name} data {arr.path} (key '{arr.key}')")
        except READ_ERRORS as e:
            raise DataError(f"{self.name} data {arr.path} cannot be read ({e})",
                            fix="re-save the data") from e

    def _read(self, read: Reader, arr: StoredArray, idx: np.ndarray) -> np.ndarray:
        try:
            return read(idx)
        except READ_ERRORS as e:
            raise DataError(f"{self.name} data {arr.path} cannot be read ({e})",
                            fix="the file is corrupt; re-save it") from e

    def _convert(self, name: str, a: np.ndarray, src: _Source, idx: np.ndarray) -> np.ndarray:
        want, where = self.spec[name].dtype, f"{self.name} data {src.arrays[name].path}"
        if a.dtype.kind in "iu" and want.kind in "iu" and a.size and a.dtype != want:
            info = np.iinfo(want)
            if a.min() < info.min or a.max() > info.max:
                raise DataError(f"{where}: input '{name}' has values in [{a.min()}, {a.max()}], "
                                f"outside the model's {want}", fix=f"store {want} values")
        a = np.ascontiguousarray(a, dtype=want)
        if want.kind == "f":
            ok = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            if not ok.all():
                i = int(np.argmin(ok))
                what = "NaN" if np.isnan(a[i]).any() else "Inf"
                raise DataError(f"{where}: input '{name}' has {what} at sample "
                                f"{src.offset + int(idx[i])} (row {int(idx[i])} of that file)",
                                fix="remove or fix that sample")
        return a


def _batch_size(requested: int, static: int | None) -> int:
    if requested < 1:
        raise UsageError(f"batch size must be at least 1, got {requested}")
    if static is not None and requested != static:
        log.warning("the model's batch dim is fixed at %d; using batches of %d, not %d",
                    static, static, requested)
        return static
    return requested


class Split(NamedTuple):
    """A seeded split into calibration samples and held-out evaluation samples."""

    calibration: Dataset
    evaluation: Dataset


def split(ds: Dataset, fraction: float, *, seed: int, name: str = "evaluation") -> Split:
    """Hold out ``round(fraction * len(ds))`` random samples for evaluation (the held-out part
    is called ``name``). The same seed gives the same split; both parts keep the data order."""
    if not 0 < fraction < 1:
        raise UsageError(f"the evaluation fraction must be between 0 and 1, got {fraction}")
    n_eval = round(fraction * len(ds))
    if n_eval in (0, len(ds)):
        raise DataError(f"{ds.name} data {ds.path} has {len(ds)} samples, too few to hold out "
                        f"a fraction {fraction} of them", fix="pass more samples")
    perm = np.random.default_rng(seed).permutation(len(ds))
    return Split(ds.take(perm[n_eval:]), ds.take(perm[:n_eval], name=name))


# --------------------------------------------------------------------------- opening


def open_dataset(path: str | os.PathLike[str], model: ModelProto | DataSpec, *,
                 batch_size: int | None = None, name: str = "calibration",
                 sample_axes: Mapping[str, int | None] | None = None,
                 preprocess: Preprocess | None = None,
                 progress: Callable[[int], None] | None = None) -> Dataset:
    """Find the files at ``path`` and check them against the model's inputs (headers only).
    ``batch_size`` defaults to the model's static batch size, else 32. ``sample_axes``: see
    :meth:`DataSpec.from_model`; an input not named there whose every dim is static and whose
    stored array has exactly the model's shape is given once (the same for every sample).
    A folder of images or recordings is decoded by ``preprocess`` (:mod:`mpsearch.data.images`,
    :mod:`mpsearch.data.audio`), one file at a time, calling ``progress(1)`` after each."""
    spec = model if isinstance(model, DataSpec) else DataSpec.from_model(model, sample_axes)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{name} data {p} does not exist",
                        fix="pass an existing .npz or .npy file, or a folder of them")
    kind = media_folder(p)
    if kind is not None:
        decode = decode_folder if kind == "images" else decode_audio_folder
        decoded = decode(p, spec, preprocess or Preprocess(), name=name, progress=progress)
        groups, label_arrays = _layout(decoded.parent, spec, name)
    else:
        groups, label_arrays = _layout(p, spec, name)
    spec = _given_once(spec, groups, set(sample_axes or {}))
    bs = _batch_size(spec.static_batch or DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
                     spec.static_batch)
    sources, casts, total = [], set(), 0
    for arrays in groups:
        sources.append(_check_source(arrays, spec, name, total, casts))
        total += sources[-1].n
    for input_name, dtype in sorted(casts):
        log.warning("%s data: input '%s' is stored as %s; casting it to the model's %s",
                    name, input_name, dtype, spec[input_name].dtype)
    if total == 0:
        raise DataError(f"{name} data {p} has 0 samples", fix="pass at least one sample")
    labels = _labels(label_arrays, total, name, p) if label_arrays else None
    log.info("%s data %s: %d samples in %d part(s)", name, p, total, len(sources))
    return Dataset(name=name, path=p, spec=spec, sources=sources, labels=labels, batch_size=bs)


def media_folder(p: Path) -> str | None:
    """"images" or "recordings" for a folder of them with no .npz/.npy files, else None."""
    if not p.is_dir():
        return None
    suffixes = {f.suffix.lower() for f in p.iterdir() if f.is_file()}
    if suffixes & {".npz", ".npy"}:
        return None
    if suffixes & IMAGE_SUFFIXES:
        return "images"
    return "recordings" if suffixes & AUDIO_SUFFIXES else None


def _layout(p: Path, spec: DataSpec,
            name: str) -> tuple[list[dict[str, StoredArray]], list[StoredArray]]:
    """The stored arrays, one dict input name -> array per source, and the labels arrays."""
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        npz = [f for f in files if f.suffix.lower() == ".npz"]
        npy = [f for f in files if f.suffix.lower() == ".npy"]
        if npz and npy:
            raise DataError(f"{name} data folder {p} mixes .npz and .npy files",
                            fix="keep one kind of file in the folder")
        if not npz and not npy:
            raise DataError(f"{name} data folder {p} has no .npz, .npy, image or .wav files",
                            fix="put the data in .npz files with one key per model input, or "
                                "pass a folder of .jpg/.png images or .wav recordings")
    elif p.suffix.lower() in (".npz", ".npy"):
        npz, npy = ([p], []) if p.suffix.lower() == ".npz" else ([], [p])
    else:
        raise DataError(f"{name} data {p} is not a .npz or .npy file, nor a folder",
                        fix="save the data with numpy.savez(path.npz, input_name=array, ...)")
    if npz:
        groups, labels, extra = [], [], set()
        for f in npz:
            arrays = npz_members(f, name)
            missing = [n for n in spec.names if n not in arrays]
            if missing:
                raise DataError(f"{name} data {f} has no array for input '{missing[0]}' (keys "
                                f"found: {', '.join(sorted(arrays)) or 'none'})",
                                fix=f"save one key per model input: {', '.join(spec.names)}")
            extra |= set(arrays) - set(spec.names) - {LABELS}
            groups.append({n: arrays[n] for n in spec.names})
            labels.append(arrays.get(LABELS))
        if extra:
            log.warning("%s data: ignoring keys that are not model inputs: %s",
                        name, ", ".join(sorted(extra)))
        if None in labels and any(lab is not None for lab in labels):
            raise DataError(f"{name} data folder {p}: some .npz files have '{LABELS}' and some "
                            "do not", fix=f"give every file a '{LABELS}' key, or none")
        return groups, [lab for lab in labels if lab is not None]
    stems = {f.stem: f for f in npy}
    label_file = stems.pop(LABELS, None) if p.is_dir() else None
    labels = [npy_array(label_file, name)] if label_file else []
    if all(n in stems for n in spec.names):
        if extra := sorted(set(stems) - set(spec.names)):
            log.warning("%s data: ignoring .npy files that are not model inputs: %s",
                        name, ", ".join(extra))
        return [{n: npy_array(stems[n], name) for n in spec.names}], labels
    if len(spec.names) == 1:
        return [{spec.names[0]: npy_array(f, name)} for f in stems.values()], labels
    missing = ", ".join(f"{n}.npy" for n in spec.names if n not in stems)
    raise DataError(f"{name} data {p} has .npy files but no {missing} for a model with "
                    f"{len(spec.names)} inputs",
                    fix="name one .npy file per input (<input name>.npy), or use .npz files")


def _given_once(spec: DataSpec, groups: list[dict[str, StoredArray]],
                declared: set[str]) -> DataSpec:
    """``spec`` with the inputs the data give once: a fully static input (not declared) whose
    stored array is exactly its shape in every file, beside an input that carries samples."""
    once = [s.name for s in spec.inputs if s.name not in declared and s.sample_axis is not None
            and None not in s.shape and all(g[s.name].shape == s.shape for g in groups)]
    if once and len(once) == sum(s.sample_axis is not None for s in spec.inputs):
        return spec  # every input would be: they are one sample, as before
    if once:
        log.info("inputs given once, the same for every sample: %s", ", ".join(once))
    spec = spec.given_once(once)
    sizes = {s.name: s.shape[s.sample_axis] for s in spec.inputs
             if s.sample_axis is not None and s.shape[s.sample_axis] is not None}
    if len(set(sizes.values())) > 1:
        (a, na), (b, nb) = sorted(sizes.items(), key=lambda kv: kv[1])[:1] + \
            sorted(sizes.items(), key=lambda kv: -kv[1])[:1]
        raise DataError(f"the model's inputs fix their sample axes at different sizes ('{a}' "
                        f"{na}, '{b}' {nb})", fix="declare the sample axis of each input "
                        "(--sample-axis NAME=K, or NAME=none for an input given once)")
    return spec


def _check_source(arrays: dict[str, StoredArray], spec: DataSpec, name: str, offset: int,
                  casts: set[tuple[str, np.dtype]]) -> _Source:
    bound: dict[str, tuple[int, str]] = {}  # named dim -> (size, the input that set it)
    for input_name, arr in arrays.items():
        s, where = spec[input_name], f"{name} data {arr.path}"
        # stored axis -> model axis: axis 0 holds the samples, the rest fill per_sample
        axes = list(range(len(s.shape))) if s.sample_axis is None else [None, *s.per_sample]
        if len(arr.shape) != len(axes) or any(
                m is not None and s.shape[m] not in (None, a)
                for m, a in zip(axes, arr.shape, strict=True)):
            how = ("given once, exactly the model's shape" if s.sample_axis is None
                   else f"samples on axis 0, the model's axis {s.sample_axis}")
            raise DataError(f"{where}: input '{input_name}' has shape {arr.shape} but the model "
                            f"wants {s.describe()} ({how})",
                            fix=f"store arrays of shape {s.stored()}")
        for stored_axis, m in enumerate(axes):
            sym = s.dim_names[m] if m is not None else None
            size = arr.shape[stored_axis]
            if sym and bound.setdefault(sym, (size, input_name))[0] != size:
                raise DataError(f"{where}: dim '{sym}' is {size} in input "
                                f"'{input_name}' but {bound[sym][0]} in input '{bound[sym][1]}'",
                                fix=f"give every input the same '{sym}' within a file")
        _check_dtype(input_name, arr.dtype, s.dtype, where, casts)
    counts = {n: a.shape[0] for n, a in arrays.items() if spec[n].sample_axis is not None}
    if len(set(counts.values())) > 1:
        paths = ", ".join(sorted({str(a.path) for a in arrays.values()}))
        desc = ", ".join(f"'{k}' {v}" for k, v in counts.items())
        raise DataError(f"{name} data {paths}: the inputs have different numbers of samples "
                        f"({desc})", fix="store the same number of samples for every input")
    return _Source(arrays=arrays, n=next(iter(counts.values()), 1), offset=offset)


def _check_dtype(input_name: str, have: np.dtype, want: np.dtype, where: str,
                 casts: set[tuple[str, np.dtype]]) -> None:
    if have.newbyteorder("=") == want or (have.kind in "iu" and want.kind in "iu"):
        return  # integers: cast per batch, with a range check
    if have.kind == "f" and want.kind == "f":
        casts.add((input_name, have))
        return
    fix = (f"integer data is not rescaled: apply the model's preprocessing and store {want}"
           if want.kind == "f" and have.kind in "iub" else f"store {want} arrays")
    raise DataError(f"{where}: input '{input_name}' is {have} but the model wants {want}", fix=fix)


def _read_whole(arr: StoredArray, where: str, what: str) -> np.ndarray:
    """A small stored array read at once (labels, an input given once)."""
    try:
        if arr.key is None:
            return np.load(arr.path, allow_pickle=False)
        with zipfile.ZipFile(arr.path) as zf, zf.open(f"{arr.key}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except READ_ERRORS as e:
        raise DataError(f"{where}: {what} cannot be read ({e})", fix="re-save it") from e


def _labels(arrays: list[StoredArray], total: int, name: str, p: Path) -> np.ndarray:
    parts = []
    for arr in arrays:
        where = f"{name} data {arr.path}"
        a = _read_whole(arr, where, f"'{LABELS}'")
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise DataError(f"{where}: '{LABELS}' is {a.dtype} of shape {a.shape}, not a 1-D "
                            "integer array", fix="store one integer class index per sample")
        parts.append(a.astype(np.int64))
    labels = np.concatenate(parts)
    if len(labels) != total:
        raise DataError(f"{name} data {p} has {len(labels)} labels for {total} samples",
                        fix="store exactly one label per sample")
    return labels
