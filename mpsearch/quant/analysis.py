"""The plan-independent part, once: ingest -> (equalize) -> calibrate -> quantization parameters.

``analyze`` runs it (one ONNX Runtime pass over the calibration data, with the layer Hessians
when rounding or the sensitivity stage wants them); the returned :class:`Analysis` is what
every later stage reads: the prepared graph, its calibration and the :class:`RangeSetter`
that quantizes any layer in any format. :func:`mpsearch.export.qdq.quantize` then exports any
number of plans from it cheaply.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from mpsearch.core.errors import UsageError
from mpsearch.data.dataset import Dataset
from mpsearch.graph.calibrate import Calibration, calibrate, make_session
from mpsearch.graph.equalize import EqualizeMode, EqualizeReport, equalize
from mpsearch.graph.evaluate import sqnr_db
from mpsearch.graph.ingest import prepare_model
from mpsearch.graph.layer_graph import LayerGraph, build_layer_graph
from mpsearch.graph.ranges import RangeMethod, output_bounds
from mpsearch.quant.layer import Rounding, WeightSettings
from mpsearch.quant.parameters import RangeSetter

__all__ = ["Analysis", "QuantizeOptions", "analyze"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    """Settings of the plan-independent stages."""

    batch_size: int = 8  # calibration batch: larger ones run slower with every tensor exposed
    activation_range: RangeMethod = RangeMethod.MSE
    weight_range: RangeMethod = RangeMethod.MSE
    equalize: EqualizeMode = EqualizeMode.OFF  # measured: does not help (graph/equalize.py)
    bias_correction: bool = True
    # GPTQ on the layer Hessians, measured better than nearest (quant/layer.py); costs a
    # slower calibration pass (the Hessians)
    rounding: Rounding = Rounding.HESSIAN

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise UsageError(f"batch size {self.batch_size!r} is not a positive integer",
                             fix="pass --batch-size 1 or more")

    @property
    def weights(self) -> WeightSettings:
        """How layer weights are quantized under these options."""
        return WeightSettings(method=self.weight_range, bias_correction=self.bias_correction,
                              rounding=self.rounding)


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """A model ready to be exported under any plan."""

    original: onnx.ModelProto  # the user's model, untouched (the FP32 reference)
    graph: LayerGraph  # of the prepared (and possibly equalized) model
    calibration: Calibration
    ranges: RangeSetter
    options: QuantizeOptions
    equalization: EqualizeReport | None = None
    timings: Mapping[str, float] = field(default_factory=dict)

    def with_rounding(self, rounding: Rounding) -> Analysis:
        """The same analysis (no new calibration) with weights rounded by ``rounding``."""
        if rounding is Rounding.HESSIAN and not self.calibration.hessians:
            raise UsageError("Hessian rounding needs the layer Hessians, which this analysis "
                             "did not collect",
                             fix="analyze with options rounding=Rounding.HESSIAN or "
                                 "hessians=True")
        options = dataclasses.replace(self.options, rounding=rounding)
        return dataclasses.replace(self, ranges=self.ranges.with_settings(options.weights),
                                   options=options)


def _float_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type == TensorProto.FLOAT}


RELU6_DRIFT_LIMIT_DB = 40.0


def _check_float_drift(before: onnx.ModelProto, after: onnx.ModelProto,
                       sample: Mapping[str, np.ndarray]) -> None:
    """Refuse an equalization that changed the FP32 function (ReLU6 replaced by Relu)."""
    a = make_session(before).run(None, dict(sample))
    b = make_session(after).run(None, dict(sample))
    sig = sum(float((x.astype(np.float64) ** 2).sum()) for x in a)
    noise = sum(float(((x.astype(np.float64) - y) ** 2).sum()) for x, y in zip(a, b, strict=True))
    db = sqnr_db(sig, noise)
    if db < RELU6_DRIFT_LIMIT_DB:
        raise UsageError(f"equalization mode relu6 replaces ReLU6 by Relu, which changes this "
                         f"model's "
                         f"FP32 output ({db:.1f} dB SQNR on a calibration sample)",
                         fix="use equalize mode exact or off (--equalize exact|off)")
    log.info("relu6 equalization changes the FP32 output by %.1f dB SQNR", db)


def analyze(model: onnx.ModelProto, data: Dataset, *,
            options: QuantizeOptions | None = None, hessians: bool = False,
            progress: Callable[[int], None] | None = None) -> Analysis:
    """Ingest ``model`` and calibrate it on ``data``. ``model`` is not modified.
    ``hessians``: also collect the layer Hessians (:mod:`mpsearch.graph.layer_hessian`); they are
    collected anyway when ``options.rounding`` is ``Rounding.HESSIAN``, which rounds with them."""
    opts = options or QuantizeOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prepared = prepare_model(model)
    # Dynamic dims (batch, sequence) are taken from the data: the first sample's shapes.
    first = next(data.batches(1), None)
    shapes = {k: v.shape for k, v in first.items()} if first else None  # batch 1
    graph = build_layer_graph(prepared, input_shapes=shapes, prepared=True)
    graph.require_layers()
    report = None
    if opts.equalize is not EqualizeMode.OFF:
        eq_model, report = equalize(graph, mode=opts.equalize)
        if report.clips_replaced and first is not None:
            _check_float_drift(graph.model, eq_model, first)
        if report.pairs:
            graph = build_layer_graph(eq_model, input_shapes=shapes, prepared=True)
    timings["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hessians = hessians or opts.rounding is Rounding.HESSIAN
    cal = calibrate(graph, data.batches(opts.batch_size), hessians=hessians, progress=progress)
    timings["calibrate"] = time.perf_counter() - t0
    graph = graph.with_observed_shapes(
        {t: st.sample_shape for t, st in cal.stats.items() if st.sample_shape is not None})
    unknown = sorted(n for n, layer in graph.layers.items() if layer.macs is None)
    if unknown:
        log.warning("the MACs of %d layer(s) are unknown even after calibration (e.g. %s): "
                    "they count as 0 in bit-operations and compute time", len(unknown),
                    unknown[0])
    ranges = RangeSetter(cal.stats, _float_weights(graph.model), moments=cal.moments,
                         activation_method=opts.activation_range, settings=opts.weights,
                         hessians=cal.hessians, bounds=output_bounds(graph))
    return Analysis(original=model, graph=graph, calibration=cal, ranges=ranges, options=opts,
                    equalization=report, timings=timings)
