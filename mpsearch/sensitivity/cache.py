"""A resumable on-disk cache of sensitivity results.

The key is a SHA-256 over the model (its serialized bytes), the calibration data (every batch's
names, shapes, dtypes and bytes), the quantization settings and this cache's version: any change
to one of them selects a fresh folder, so stale results are never read. Inside the folder:

* ``measured.jsonl``: one line per measured (group, candidate), appended and flushed as each
  result arrives, so a run stopped at any point (Ctrl-C, a killed process) resumes where it
  stopped; a torn last line is ignored;
* ``table-<digest>.json``: a finished table, per method and candidate set, which a re-run
  returns without calibrating;
* ``file-<digest><suffix>``: a file drawn from a finished table (the heatmap PNG), under a key
  its maker computes from everything it depends on, so a re-run copies it instead of drawing
  it again (EfficientNet-Lite0: 0.8 s of a 1.9 s cached re-run were importing matplotlib and
  drawing 300 annotated cells).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Candidate, parse_candidate

__all__ = ["CACHE_VERSION", "SensitivityCache", "data_digest", "default_cache_dir"]

log = logging.getLogger(__name__)

# 11: element-wise ops as wide as their consumers; 10: Sigmoid/Softmax uint8 outputs snap to
# [0, 1]; 9: Clip as Max/Min
CACHE_VERSION = 11


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpsearch"


def data_digest(batches: Iterable[Mapping[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            a = np.ascontiguousarray(batch[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


class SensitivityCache:
    """One folder per (model, data, settings)."""

    def __init__(self, root: str | os.PathLike[str], *, model: onnx.ModelProto, data: str,
                 settings: Mapping[str, object]) -> None:
        h = hashlib.sha256()
        h.update(model.SerializeToString(deterministic=True))
        h.update(data.encode())
        h.update(json.dumps({**settings, "cache_version": CACHE_VERSION}, sort_keys=True,
                            default=str).encode())
        self.key = h.hexdigest()
        self.path = Path(root) / self.key[:24]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the cache folder {self.path} ({e.strerror})",
                             fix="pass a writable --cache-dir, or --no-cache") from e
        self._measured = self.path / "measured.jsonl"

    @classmethod
    def for_settings(cls, root: str | os.PathLike[str] | None, *, model: onnx.ModelProto,
                     batches: Iterable[Mapping[str, np.ndarray]], options: object,
                     **extra: object) -> SensitivityCache:
        """The cache of ``model`` on these calibration ``batches`` with the fields of the
        ``options`` dataclass (and ``extra`` settings) in the key; ``root`` None: the default
        folder."""
        settings = {f.name: str(getattr(options, f.name)) for f in dataclasses.fields(options)}
        settings.update({k: str(v) for k, v in extra.items()})
        return cls(root or default_cache_dir(), model=model, data=data_digest(batches),
                   settings=settings)

    # -- measured results, one line each

    def measured(self) -> dict[tuple[str, Candidate], float]:
        out: dict[tuple[str, Candidate], float] = {}
        if not self._measured.exists():
            return out
        for line in self._measured.read_text().splitlines():
            try:
                rec = json.loads(line)
                out[(rec["group"], parse_candidate(rec["candidate"]))] = float(rec["mse"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by an interrupted write
        return out

    def add_measured(self, group: str, cand: Candidate, mse: float) -> None:
        line = json.dumps({"group": group, "candidate": cand.name, "mse": mse})
        with open(self._measured, "a") as f:
            f.write(line + "\n")
            f.flush()

    # -- finished tables

    def _table_path(self, variant: Mapping[str, object]) -> Path:
        d = hashlib.sha256(json.dumps(variant, sort_keys=True, default=str).encode())
        return self.path / f"table-{d.hexdigest()[:16]}.json"

    def table(self, variant: Mapping[str, object]) -> dict | None:
        p = self._table_path(variant)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None

    def save_table(self, variant: Mapping[str, object], table: Mapping) -> None:
        p = self._table_path(variant)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".table-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f)
        os.replace(tmp, p)

    # -- files drawn from finished tables

    def _file_path(self, key: str, suffix: str) -> Path:
        return self.path / f"file-{key[:32]}{suffix}"

    def file(self, key: str, suffix: str) -> bytes | None:
        """The bytes saved under ``key`` (a hex digest), or None."""
        try:
            return self._file_path(key, suffix).read_bytes()
        except OSError:
            return None

    def save_file(self, key: str, suffix: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".file-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self._file_path(key, suffix))
