"""A folder of recordings as data: WAV files cut into windows of the model's input length.

``--data recordings/`` (``.wav``, PCM 8/16/32-bit, sorted by name) feeds a model with one
audio input whose per-sample shape has one dim longer than 1 (``[N, T]``, ``[N, 1, T]``): each
file is read with the standard library's ``wave``, mixed to mono, scaled to [-1, 1], resampled
to ``rate`` Hz (``--preprocess rate=16000``; default: the file's own rate) with scipy's
polyphase filter, cut into windows of ``window`` samples (default: the input's length ``T``)
every ``hop`` samples (default: ``window``, no overlap; a file shorter than a window is padded
with silence to one), and multiplied by ``scale`` (default 1; 32768 for models that take
int16-scale samples, as openWakeWord's front end does). Windows are streamed into a ``.npy``
file in a temporary folder, like images (:mod:`mpsearch.data.images`).
"""

from __future__ import annotations

import math
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpsearch.core.errors import DataError
from mpsearch.data.images import Preprocess, temp_folder
from mpsearch.data.spec import DataSpec

__all__ = ["AUDIO_SUFFIXES", "audio_files", "decode_audio_folder"]

AUDIO_SUFFIXES = frozenset({".wav"})


def audio_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                  and f.suffix.lower() in AUDIO_SUFFIXES)


def _read(path: Path, name: str) -> tuple[np.ndarray, int]:
    """Mono float64 samples in [-1, 1] and the file's rate."""
    try:
        with wave.open(str(path), "rb") as w:
            ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), \
                w.getnframes()
            raw = w.readframes(n)
    except (OSError, wave.Error, EOFError) as e:
        raise DataError(f"{name} data: cannot read recording {path} ({e})",
                        fix="re-save it as PCM WAV") from e
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width in (2, 4):
        dt = np.int16 if width == 2 else np.int32
        x = np.frombuffer(raw, dt).astype(np.float64) / float(-np.iinfo(dt).min)
    else:
        raise DataError(f"{name} data: {path} holds {8 * width}-bit samples",
                        fix="re-save it as 16-bit PCM WAV")
    return x.reshape(-1, ch).mean(axis=1), rate


def _resampled(x: np.ndarray, rate: int, want: int | None) -> np.ndarray:
    if not want or want == rate:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(want), int(rate))
    return resample_poly(x, want // g, rate // g)


def _windows(n: int, window: int, hop: int) -> int:
    return 1 if n <= window else 1 + (n - window) // hop


def decode_audio_folder(folder: Path, spec: DataSpec, pre: Preprocess, *, name: str,
                        progress: Callable[[int], None] | None = None) -> Path:
    """The recordings of ``folder`` cut into windows, as one ``<input>.npy`` file in a
    temporary folder (returned), ``(windows, *per-sample dims)`` in the input's dtype."""
    files = audio_files(folder)[:pre.limit]
    if not files:
        raise DataError(f"{name} data folder {folder} has no recordings",
                        fix="pass a folder of .wav files, or .npz files")
    sampled = [s for s in spec.inputs if s.sample_axis is not None]
    if len(spec.inputs) != 1 or len(sampled) != 1:
        raise DataError(f"{name} data folder {folder} holds recordings, but the model's inputs "
                        f"are {', '.join(s.describe() for s in spec.inputs)}: a folder of "
                        "recordings feeds a model with one audio input [N, T] or [N, 1, T]",
                        fix="save the inputs as .npz with one key per model input")
    s = sampled[0]
    dims = [s.shape[i] for i in s.per_sample]
    long = [i for i, d in enumerate(dims) if d != 1]
    if len(long) != 1:
        raise DataError(f"input '{s.name}' {s.describe()} is not one window of audio",
                        fix="save the inputs as .npz")
    window = pre.window or dims[long[0]]
    if window is None:
        raise DataError(f"input '{s.name}' {s.describe()} has a dynamic length",
                        fix="give the window in samples: --preprocess window=16000")
    if dims[long[0]] not in (None, window):
        raise DataError(f"--preprocess window={window}, but input '{s.name}' takes "
                        f"{dims[long[0]]} samples", fix=f"use window={dims[long[0]]}")
    hop = pre.hop or window
    shape = [window if d is None else d for d in dims]
    counts = []
    for f in files:  # from the headers, so the file can be allocated before decoding
        with wave.open(str(f), "rb") as w:
            n = w.getnframes()
            if pre.rate:
                n = math.ceil(n * pre.rate / w.getframerate())
        counts.append(_windows(n, window, hop))
    out = temp_folder() / f"{s.name}.npy"
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=s.dtype,
                                    shape=(sum(counts), *shape))
    k = 0
    for f, count in zip(files, counts, strict=True):
        x, rate = _read(f, name)
        x = _resampled(x, rate, pre.rate) * pre.scale
        if x.size < window:
            x = np.pad(x, (0, window - x.size))
        for j in range(count):
            seg = x[j * hop:j * hop + window]
            seg = np.pad(seg, (0, window - seg.size))  # a resampled file may be a sample short
            arr[k] = seg.reshape(shape).astype(s.dtype)
            k += 1
        if progress:
            progress(1)
    arr.flush()
    del arr
    return out
