"""The cache machinery that the example builders (``examples/<name>/prepare.py``) share.

Each builder writes ``model.onnx``, ``calib.npz`` and ``eval.npz`` into a cache folder, then a
``stamp.json`` holding the settings that decided those bytes and the size of every output.
A later run whose settings and sizes match the stamp does nothing. Every file is written
through a temporary file and renamed into place, and the stamp is deleted before a build and
written last, so an interrupted build is never taken for a finished one.

The builders are run as scripts and loaded by path, not imported as a package, so they put
this folder on ``sys.path`` and ``import _cache``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

STAMP = "stamp.json"
OUTPUTS = ("model.onnx", "calib.npz", "eval.npz")


class Prepare(Protocol):
    """A builder's ``prepare``: build into ``cache_dir`` unless current; paths by key."""

    def __call__(
        self, cache_dir: Path | None = None, *, force: bool = False
    ) -> dict[str, Path]: ...


def quiet_third_party() -> None:
    """The exporter's chatter, which says nothing about the example, kept off the terminal:
    torch.onnx's "torchvision is not installed. Skipping torchvision::nms" (torchvision is
    not needed to export these models), pytree's copyreg ``FutureWarning`` about
    ``LeafSpec`` and the exporter's note that two inputs share a dynamic axis. Real errors
    still surface (errors are logged, other warnings shown)."""
    import warnings

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*",
                            category=FutureWarning)
    # MiniLM's two inputs share the batch and sequence dims; the exporter says so
    warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used",
                            category=UserWarning)


def output_paths(cache: Path) -> dict[str, Path]:
    """``{"model": cache / "model.onnx", "calib": ..., "eval": ...}``."""
    return {name.split(".")[0]: cache / name for name in OUTPUTS}


def up_to_date(cache: Path, settings: dict[str, Any]) -> bool:
    """True when the stamp in ``cache`` has these settings and every output has its size."""
    try:
        stamp = json.loads((cache / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("settings") != settings:
        return False
    sizes = stamp.get("sizes", {})
    return all(
        (cache / name).is_file() and (cache / name).stat().st_size == sizes.get(name)
        for name in OUTPUTS
    )


def invalidate(cache: Path) -> None:
    """Create ``cache`` if needed and delete its stamp: from here on it is being rebuilt."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / STAMP).unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` of ``arrays`` (uncompressed) to exactly ``path``, atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object stops numpy appending ".npz"
            np.savez(f, **arrays)

    atomic_write(path, write)


def save_onnx(path: Path, proto: Any) -> None:
    """Save the ModelProto ``proto`` to ``path`` atomically, exporter debug metadata stripped."""
    import onnx

    from mpsearch.graph.ingest import strip_debug_metadata

    atomic_write(path, lambda tmp: onnx.save(strip_debug_metadata(proto), str(tmp)))


def write_stamp(cache: Path, settings: dict[str, Any], results: dict[str, Any]) -> None:
    """Write ``stamp.json`` last: the settings, the output sizes, then ``results`` (checks)."""
    stamp = {
        "settings": settings,
        "sizes": {name: (cache / name).stat().st_size for name in OUTPUTS},
        **results,
    }
    atomic_write(cache / STAMP, lambda tmp: tmp.write_text(json.dumps(stamp, indent=1) + "\n"))


def main(
    argv: list[str] | None,
    *,
    name: str,
    doc: str | None,
    default_cache: Path,
    prepare: Prepare,
    logger: logging.Logger,
    mb_decimals: int = 2,
) -> int:
    """A builder's command line: ``[--force] [--cache-dir DIR]``, then one summary line.

    ``doc`` is the builder's module docstring (its first line describes the command);
    ``logger`` is the builder's, the only one shown at INFO.
    """
    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Ours only: the exporter's libraries log a lot at INFO (onnx_ir: every deduplicated
    # initializer).
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    paths = prepare(args.cache_dir, force=args.force)
    sizes = ", ".join(
        f"{p.name} {p.stat().st_size / 1e6:.{mb_decimals}f} MB" for p in paths.values()
    )
    print(f"{name}: {sizes} in {paths['model'].parent} ({time.perf_counter() - start:.1f} s)")
    return 0
