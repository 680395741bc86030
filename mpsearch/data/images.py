"""A folder of images as data: decoded one at a time into the model's input layout.

``--data photos/`` (JPEG, PNG, BMP, WebP; sorted by name) feeds a model with one image input
(rank 4, three channels or one): each image is read with Pillow, converted to RGB (BGR, or
grey, as ``channels`` says), resized so its shorter side is ``resize`` pixels (default: the
input's larger side), centre-cropped to the input's height and width, and scaled as ``(pixel
- mean) / std`` per channel (default ``mean=0, std=255``: pixels in [0, 1]; EfficientNet-Lite
wants ``mean=127,std=128``, ImageNet-trained torchvision models ``mean=123.7,116.3,103.5,
std=58.4,57.1,57.4``), then laid out NCHW or NHWC as the input's shape says (the axis of size
3, or 1), in the input's dtype (a uint8 input takes the pixels as they are). The spec is one
string, ``--preprocess resize=256,mean=127,std=128,channels=bgr,limit=64``, or the run
config's ``preprocess`` key.

The decoded samples are streamed into a ``.npy`` file in a temporary folder (removed when the
process ends), which the data set then reads in batches like any other, so a folder of
thousands of photos is never held in memory. Pillow does the decoding and resampling
(bilinear); the rest is numpy. Folders of recordings: :mod:`mpsearch.data.audio`.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpsearch.core.errors import DataError, UsageError
from mpsearch.data.spec import DataSpec

__all__ = ["IMAGE_SUFFIXES", "Preprocess", "decode_folder", "image_files", "parse_preprocess",
           "temp_folder"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_TEMP: list[Path] = []  # folders of decoded images, removed at exit


@atexit.register
def _remove_temp() -> None:
    for d in _TEMP:
        shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """How an image becomes a sample (module docstring)."""

    resize: int | None = None  # shorter side before the centre crop (None: the input's size)
    mean: tuple[float, ...] = (0.0,)  # per channel, or one for all
    std: tuple[float, ...] = (255.0,)
    channels: str = "rgb"  # "rgb", "bgr" or "grey"
    limit: int | None = None  # the first N files by name (None: all)
    # recordings (mpsearch.data.audio): resampled to ``rate`` Hz (None: the file's), windows
    # of ``window`` samples (None: the input's length) every ``hop``, times ``scale``
    rate: int | None = None
    window: int | None = None
    hop: int | None = None
    scale: float = 1.0

    def __str__(self) -> str:
        parts = [f"resize={self.resize}"] if self.resize else []
        parts += [f"mean={','.join(f'{v:g}' for v in self.mean)}",
                  f"std={','.join(f'{v:g}' for v in self.std)}", f"channels={self.channels}"]
        parts += [f"{k}={getattr(self, k)}" for k in ("limit", "rate", "window", "hop")
                  if getattr(self, k)]
        return ";".join(parts + ([f"scale={self.scale:g}"] if self.scale != 1.0 else []))


_EXAMPLE = "--preprocess 'resize=256;mean=127;std=128' (';' between keys, ',' between channels)"


def parse_preprocess(text: str | Preprocess | None) -> Preprocess:
    """``key=value`` pairs joined by ``;``: resize, mean, std (one value or one per channel,
    comma-separated), channels (rgb, bgr, grey), limit; for recordings rate, window, hop,
    scale."""
    if text is None or isinstance(text, Preprocess):
        return text or Preprocess()
    fields: dict = {}
    for part in filter(None, (p.strip() for p in str(text).split(";"))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        try:
            if not sep:
                raise ValueError
            if key in ("mean", "std"):
                vals = tuple(float(v) for v in value.split(","))
                if not all(math.isfinite(v) for v in vals) or (key == "std" and 0 in vals):
                    raise ValueError
                fields[key] = vals
            elif key == "scale":
                fields[key] = float(value)
                if not math.isfinite(fields[key]) or fields[key] == 0:
                    raise ValueError
            elif key in ("resize", "limit", "rate", "window", "hop"):
                fields[key] = int(value)
                if fields[key] <= 0:
                    raise ValueError
            elif key == "channels":
                fields[key] = value.strip().lower().replace("gray", "grey")
                if fields[key] not in ("rgb", "bgr", "grey"):
                    raise ValueError
            else:
                raise UsageError(f"--preprocess: unknown key '{key}'",
                                 fix="use resize, mean, std, channels, limit (images), rate, "
                                     f"window, hop, scale (recordings): {_EXAMPLE}")
        except ValueError:
            raise UsageError(f"--preprocess: '{part}' is not a valid {key or 'key=value'}",
                             fix=f"write e.g. {_EXAMPLE}") from None
    return Preprocess(**fields)


def temp_folder() -> Path:
    """A folder for decoded samples, removed when the process ends."""
    tmp = Path(tempfile.mkdtemp(prefix="mpsearch-data-"))
    _TEMP.append(tmp)
    return tmp


def image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                  and f.suffix.lower() in IMAGE_SUFFIXES)


def decode_folder(folder: Path, spec: DataSpec, pre: Preprocess, *, name: str,
                  progress: Callable[[int], None] | None = None) -> Path:
    """The images of ``folder`` as one ``<input>.npy`` file in a temporary folder (returned),
    ``(images, *per-sample dims)`` in the input's dtype."""
    files = image_files(folder)[:pre.limit]
    if not files:
        raise DataError(f"{name} data folder {folder} has no images",
                        fix="pass a folder of .jpg/.png files, or .npz files")
    sampled = [s for s in spec.inputs if s.sample_axis is not None]
    if len(spec.inputs) != 1 or len(sampled) != 1 or len(sampled[0].shape) != 4:
        raise DataError(f"{name} data folder {folder} holds images, but the model's inputs are "
                        f"{', '.join(s.describe() for s in spec.inputs)}: a folder of images "
                        "feeds a model with one image input [N, C, H, W] or [N, H, W, C]",
                        fix="save the inputs as .npz with one key per model input")
    s = sampled[0]
    dims = [s.shape[i] for i in s.per_sample]  # e.g. [3, 224, 224] or [224, 224, 3]
    want = 1 if pre.channels == "grey" else 3
    if dims[0] == want and dims[2] != want:
        first, (h, w) = True, (dims[1], dims[2])
    elif dims[2] == want:
        first, (h, w) = False, (dims[0], dims[1])
    else:
        raise DataError(f"input '{s.name}' {s.describe()} has no axis of {want} channels "
                        f"for {pre.channels} images", fix="set channels= in --preprocess")
    if h is None or w is None:
        raise DataError(f"input '{s.name}' {s.describe()} has a dynamic height or width",
                        fix="fix it with --input-shape, or save the inputs as .npz")
    mean = np.broadcast_to(np.asarray(pre.mean, np.float32), (want,))
    std = np.broadcast_to(np.asarray(pre.std, np.float32), (want,))
    out = temp_folder() / f"{s.name}.npy"
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=s.dtype,
                                    shape=(len(files), *dims))
    for i, f in enumerate(files):
        px = _pixels(f, pre, h, w, name)  # H x W x C float32
        x = px if s.dtype == np.uint8 else (px - mean) / std
        arr[i] = x.transpose(2, 0, 1) if first else x
        if progress:
            progress(1)
    arr.flush()
    del arr
    return out


def _pixels(path: Path, pre: Preprocess, h: int, w: int, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if pre.channels == "grey" else "RGB")
            side = pre.resize or max(h, w)
            scale = side / min(im.size)
            rw, rh = max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))
            im = im.resize((rw, rh), Image.Resampling.BILINEAR)
            left, top = (rw - w) // 2, (rh - h) // 2
            im = im.crop((left, top, left + w, top + h))
            px = np.asarray(im, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{name} data: cannot read image {path} ({e})",
                        fix="remove or re-save the file") from e
    if px.ndim == 2:
        px = px[:, :, None]
    return px[:, :, ::-1] if pre.channels == "bgr" else px
