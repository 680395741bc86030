"""Streaming readers for ``.npy`` files and ``.npz`` members: headers checked at open, rows read
in bounded chunks. ``np.load`` reads a whole ``.npz`` member on access, so members are read
forward from the zip stream here instead; ``.npy`` files are memory-mapped."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from mpsearch.core.errors import DataError

__all__ = ["CHUNK_BYTES", "READ_ERRORS", "Reader", "StoredArray", "ZipRows", "npy_array",
           "npy_rows", "npz_members", "read_header"]

CHUNK_BYTES = 32 << 20  # the most read at once from an .npz member
READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
Reader = Callable[[np.ndarray], np.ndarray]  # sorted row indices -> those rows


@dataclass(frozen=True)
class StoredArray:
    """One stored array, from its header: a .npy file (key None) or an .npz member."""

    path: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool


def read_header(f, where: str, size: int) -> tuple[tuple[int, ...], np.dtype, bool]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read(f)
    except READ_ERRORS as e:
        raise DataError(f"{where} is not a readable .npy array ({e})",
                        fix="re-save it with numpy.save or numpy.savez") from e
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects, not numbers", fix="save a numeric array")
    if size != f.tell() + dtype.itemsize * int(np.prod(shape)):
        raise DataError(f"{where} is truncated or corrupt: {size} bytes do not match its header "
                        f"{tuple(shape)} {dtype}", fix="re-save it with numpy.save or numpy.savez")
    return tuple(shape), dtype, bool(fortran)


def npz_members(path: Path, label: str) -> dict[str, StoredArray]:
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    key = info.filename[:-4]
                    with zf.open(info) as f:
                        head = read_header(f, f"{label} data {path} (key '{key}')", info.file_size)
                    arrays[key] = StoredArray(path, key, *head)
    except READ_ERRORS as e:
        raise DataError(f"{label} data {path} is not a readable .npz (zip) file ({e})",
                        fix="save the data with numpy.savez(path, input_name=array, ...)") from e
    return arrays


def npy_array(path: Path, label: str) -> StoredArray:
    try:
        with open(path, "rb") as f:
            head = read_header(f, f"{label} data {path}", path.stat().st_size)
            return StoredArray(path, None, *head)
    except OSError as e:
        raise DataError(f"{label} data {path} cannot be read ({e})", fix="check the file") from e


class ZipRows:
    """Reads rows of one .npz member forward only, at most ``CHUNK_BYTES`` at a time."""

    def __init__(self, f: IO[bytes], size: int, arr: StoredArray, where: str) -> None:
        self._f, self._arr, self._pos = f, arr, 0
        read_header(f, where, size)
        self._row = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
        self._step = max(1, CHUNK_BYTES // max(self._row, 1))
        self._whole = (np.frombuffer(f.read(), arr.dtype).reshape(arr.shape, order="F")
                       if arr.fortran else None)  # rare: read the member whole

    def _read(self, n: int) -> np.ndarray:
        out = np.empty((n, *self._arr.shape[1:]), self._arr.dtype)
        buf, got = memoryview(out.reshape(-1).view(np.uint8)), 0
        while got < len(buf):
            k = self._f.readinto(buf[got:])
            if not k:
                raise EOFError("the member ends early")
            got += k
        return out

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        if self._whole is not None:
            return self._whole[idx]
        if idx[0] > self._pos:  # skip the rows before the first wanted one
            self._f.seek((int(idx[0]) - self._pos) * self._row, 1)
            self._pos = int(idx[0])
        parts, stop = [], int(idx[-1]) + 1
        while self._pos < stop:
            n = min(self._step, stop - self._pos)
            block = self._read(n)
            lo, hi = np.searchsorted(idx, [self._pos, self._pos + n])
            parts.append(block if hi - lo == n else block[idx[lo:hi] - self._pos])
            self._pos += n
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def npy_rows(arr: StoredArray) -> Reader:
    mm = np.load(arr.path, mmap_mode="r", allow_pickle=False)

    def rows(idx: np.ndarray) -> np.ndarray:
        a, b = int(idx[0]), int(idx[-1]) + 1
        return np.array(mm[a:b]) if b - a == len(idx) else np.asarray(mm[idx])
    return rows
