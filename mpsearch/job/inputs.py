"""What a search opens and checks before its first stage: the data (arrays, or folders of
images or recordings decoded with a progress bar), the samples that are constant (warned of),
the control flow put in a form the target runs (:mod:`mpsearch.graph.control`), and the
budgets the costs alone decide (refused before the calibration pass)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from mpsearch.data.audio import audio_files
from mpsearch.data.dataset import Dataset, constant_samples, media_folder, open_dataset
from mpsearch.data.images import image_files
from mpsearch.graph.control import (
    Specialized,
    condition_values,
    require_one_branch,
    select_ifs,
    specialize_ifs,
)
from mpsearch.graph.ingest import prepare_model
from mpsearch.graph.layer_graph import build_layer_graph
from mpsearch.hw.cost import CostModel
from mpsearch.hw.profile import HardwareProfile
from mpsearch.job.config import CandidateConfig
from mpsearch.sensitivity.table import candidates_for
from mpsearch.solve.allocate import allocate, build_problem
from mpsearch.solve.budget import Budget

__all__ = ["check_reachable", "constant_warning", "control_flow", "open_data"]

log = logging.getLogger(__name__)


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
    costs = CostModel(lg, profile, warn=False)  # the run's own cost model warns
    cands = candidates_for(lg, costs, candidates.only, sparsity=candidates.sparsity)
    if not all(cands.get(g) for g in lg.group_names):
        return  # said with its reason after calibration
    built = build_problem(lg, costs, cands, {(g, c): 0.0 for g in lg.group_names
                                             for c in cands[g]})
    allocate(built.problem, costs, budgets, penalty=1.0)


def control_flow(model: onnx.ModelProto, *, specialize: bool, no_control_flow: bool,
                 calib: Dataset, others: Sequence[Dataset | None], batch_size: int
                 ) -> tuple[onnx.ModelProto, tuple[Specialized, ...], list[str]]:
    """``model`` with its ``If`` nodes in the form the run plans, what was rewritten, and the
    warnings for the report. ``specialize`` (``--specialize-if``): each If the calibration data
    decides once becomes its branch, and the ``others`` (check, evaluation) data must take the
    same branches. ``no_control_flow`` (QNN's HTP): each If left becomes both branches and a
    Where, and a branch the calibration data never takes is warned of: its layers' errors go
    unseen."""
    done: tuple[Specialized, ...] = ()
    warnings: list[str] = []
    if specialize:
        original = model
        model, done = specialize_ifs(original, calib.batches(batch_size),
                                     name="the calibration data")
        for ds in others:
            if ds is not None:
                require_one_branch(done, original, ds.batches(batch_size),
                                   name=f"the {ds.name} data")
        if done:
            log.warning("%s%s", done[0].describe(), "" if len(done) == 1 else
                        f"; and {len(done) - 1} more If node(s) likewise "
                        "(plan.json 'specialized')")
    if no_control_flow:
        before = model
        model, selected = select_ifs(before)
        values = condition_values(before, calib.batches(batch_size)) if selected else {}
        for s in selected:
            log.warning("%s", s.describe())
            seen = values.get(s.node, set())
            if len(seen) == 1:
                never = "else" if next(iter(seen)) else "then"
                warnings.append(f"the calibration data never takes the {never} branch of If "
                                f"'{s.node}': the errors of its layers are not seen, so they "
                                "are planned as if they did not matter; calibrate on data "
                                "that takes both branches")
        done += selected
    return model, done, warnings
