"""What a search opens and checks before its first stage: the data (arrays, or folders of
images or recordings decoded with a progress bar), the samples that are constant (warned of),
and the budgets the costs alone decide (refused before the calibration pass)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from mpsearch.data.audio import audio_files
from mpsearch.data.dataset import Dataset, constant_samples, media_folder, open_dataset
from mpsearch.data.images import image_files
from mpsearch.graph.ingest import prepare_model
from mpsearch.graph.layer_graph import build_layer_graph
from mpsearch.hw.cost import CostModel
from mpsearch.hw.profile import HardwareProfile
from mpsearch.job.config import CandidateConfig
from mpsearch.sensitivity.table import candidates_for
from mpsearch.solve.allocate import allocate, build_problem
from mpsearch.solve.budget import Budget

__all__ = ["check_reachable", "constant_warning", "open_data"]


def open_data(d: Any, model: onnx.ModelProto, *, name: str,
              sample_axes: Mapping[str, int | None], preprocess: Any,
              progress: Callable) -> Dataset:
    """``d`` as a :class:`Dataset` of ``model``'s inputs: a Dataset as it is, a ``.npz``/
    ``.npy``, or a folder of images or WAV recordings decoded with ``preprocess``."""
    if isinstance(d, Dataset):
        return d
    kind = media_folder(Path(d))
    if kind is None:
        return open_dataset(d, model, name=name, sample_axes=sample_axes)
    files = image_files(Path(d)) if kind == "images" else audio_files(Path(d))
    with progress(f"decoding the {name} {kind}", len(files)) as advance:
        return open_dataset(d, model, name=name, sample_axes=sample_axes,
                            preprocess=preprocess, progress=advance)


def constant_warning(batches: Sequence[Mapping], ds: Dataset, part: str) -> str | None:
    """The warning for samples whose every input is constant (:func:`constant_samples`), or
    None."""
    bad = constant_samples(batches)
    if not bad:
        return None
    where = ", ".join(str(ds.source_index(k)) for k in bad[:5])
    return (f"{len(bad)} of the {len(ds)} samples of the {part} are constant (an all-zero "
            f"input?): sample(s) {where}{' ...' if len(bad) > 5 else ''} of {ds.path}; they "
            "calibrate nothing and their output error is measured against no signal: drop "
            "them from the data")


def check_reachable(model: onnx.ModelProto, calib: Dataset, profile: HardwareProfile,
                    candidates: CandidateConfig, budgets: Sequence[Budget]) -> None:
    """Budgets that cost alone decides, checked before the calibration pass: the graph and
    the device's costs give the smallest reachable total of every budgeted quantity
    (InfeasibleBudgetError naming each, as after calibration). Skipped where some layer's MACs
    are known only from the calibration run's shapes."""
    if not budgets:
        return
    first = next(calib.batches(1), None)
    shapes = {k: v.shape for k, v in first.items()} if first else None
    lg = build_layer_graph(prepare_model(model), input_shapes=shapes, prepared=True)
    if not lg.layers or any(layer.macs is None for layer in lg.layers.values()):
        return
    costs = CostModel(lg, profile)
    cands = candidates_for(lg, costs, candidates.only, sparsity=candidates.sparsity)
    if not all(cands.get(g) for g in lg.group_names):
        return  # said with its reason after calibration
    built = build_problem(lg, costs, cands, {(g, c): 0.0 for g in lg.group_names
                                             for c in cands[g]})
    allocate(built.problem, costs, budgets, penalty=1.0)
