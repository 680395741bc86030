"""Writing results safely: the output folder is checked before any long work starts, every file
is written to a temporary name and renamed into place, and a failed run removes what it wrote
(and the folder, if it created it). The input model is never a target."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx

from mpsearch.core.errors import ExportError, InternalError, UsageError

__all__ = ["OutputDir", "check_model_file"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_model_file(path: str | os.PathLike[str], *, name: str) -> None:
    """Raise :class:`InternalError` unless the model at ``path`` passes the full checker and
    opens in an ONNX Runtime CPU session."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise InternalError(f"mpsearch wrote {name}, which fails onnx.checker "
                            f"({str(e).splitlines()[0][:300]}): this is a bug in mpsearch; "
                            "please report it with the input model's name") from e
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for graphs it cannot load
        raise InternalError(f"mpsearch wrote {name}, which ONNX Runtime cannot load "
                            f"({str(e).splitlines()[0][:300]}): this is a bug in mpsearch; "
                            "please report it with the input model's name") from e


class OutputDir:
    """A folder that receives a run's files, all or nothing."""

    def __init__(self, path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]],
                 names: Iterable[str], flag: str = "--out") -> None:
        self.path = Path(path)
        self.names = list(names)
        for i in inputs:
            src = Path(i).resolve()
            for n in self.names:
                if (self.path / n).resolve() == src:
                    raise UsageError(f"the output {self.path / n} would overwrite the input {i}",
                                     fix=f"choose another {flag}")
            if src == self.path.resolve():
                raise UsageError(f"the output folder {self.path} is the input {i}",
                                 fix=f"choose another {flag}")
        if self.path.exists() and not self.path.is_dir():
            raise ExportError(f"{flag} {self.path} exists and is not a folder",
                              fix="pass a folder path")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".mpsearch-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            if self.created:
                self._remove_dir()
            raise ExportError(f"cannot write to the output folder {self.path} ({e.strerror})",
                              fix=f"choose a writable {flag}") from e
        self.written: list[Path] = []

    def _target(self, name: str) -> Path:
        if name not in self.names:
            raise ValueError(f"{name} was not declared")
        return self.path / name

    def _atomic(self, name: str, write) -> Path:
        target = self._target(name)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            os.replace(tmp, target)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise ExportError(f"cannot write {target} ({e.strerror})",
                              fix="check free disk space and permissions") from e
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.written.append(target)
        return target

    def write_model(self, name: str, model: onnx.ModelProto) -> Path:
        """Write a model that is valid, or nothing: before it is renamed into place it must pass
        ``onnx.checker`` with ``full_check`` (nodes topologically sorted, types and shapes
        consistent, every subgraph too) and load in ONNX Runtime; a failure is mpsearch's bug
        (:class:`InternalError`), never a silently written file."""

        def write(p: str) -> None:
            onnx.save(model, p)
            check_model_file(p, name=name)

        return self._atomic(name, write)

    def write_json(self, name: str, obj: object) -> Path:
        def w(p: str) -> None:
            with open(p, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, sort_keys=False)
                f.write("\n")

        return self._atomic(name, w)

    def write_with(self, name: str, write) -> Path:
        """Write ``name`` with ``write(temporary_path)`` (a plot, a CSV), atomically."""
        return self._atomic(name, write)

    def remove_unwritten(self, *, still_to_come: Iterable[str] = ()) -> list[str]:
        """Remove the declared files this run has not written (and will not: ``still_to_come``
        are kept), left by an earlier run into the same folder: a folder holds one run's files,
        never a mix of two. Returns the names removed."""
        done = {p.name for p in self.written} | set(still_to_come)
        removed = []
        for name in self.names:
            p = self.path / name
            if name not in done and p.is_file():
                p.unlink()
                removed.append(name)
        return removed

    def rollback(self) -> None:
        """Remove what this run wrote (and the folder if this run created it)."""
        for p in self.written:
            p.unlink(missing_ok=True)
        self.written.clear()
        if self.created:
            self._remove_dir()

    def _remove_dir(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()
