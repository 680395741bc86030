"""The one provider of quantization parameters for a model and its calibration.

Activation parameters come from :mod:`mpsearch.graph.ranges`, layer weights (dense or pruned)
from :mod:`mpsearch.quant.layer`; both are memoised per tensor (or layer), format and sparsity
in the :class:`RangeSetter`, which also keeps the layer Hessians' GPTQ and SparseGPT factors.
The exporter and the sensitivity estimators ask the same object, so what is scored is what is
shipped; its memos are safe under the sensitivity stage's thread pool.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mpsearch.core.formats import Format, Sparsity
from mpsearch.core.memo import Memo
from mpsearch.graph.calibrate import ChannelMoments, TensorStats
from mpsearch.graph.layer_graph import Layer
from mpsearch.graph.layer_hessian import LayerHessian
from mpsearch.graph.ranges import QParams, RangeMethod, activation_qparams
from mpsearch.quant.layer import (
    LayerInputs,
    LayerWeights,
    Rounding,
    WeightSettings,
    quantize_layer,
)
from mpsearch.quant.rounding import FactorCache

__all__ = ["RangeSetter"]


class RangeSetter:
    """Quantization parameters, memoised per tensor or layer, format and sparsity."""

    def __init__(self, stats: Mapping[str, TensorStats], weights: Mapping[str, np.ndarray], *,
                 moments: Mapping[str, ChannelMoments] | None = None,
                 activation_method: RangeMethod = RangeMethod.MSE,
                 settings: WeightSettings = WeightSettings(),  # noqa: B008 - frozen
                 hessians: Mapping[str, LayerHessian] | None = None,
                 bounds: Mapping[str, tuple[float, float]] | None = None) -> None:
        """``settings``: how weights are quantized (``Rounding.HESSIAN`` rounds with
        ``hessians``, layer name -> its Hessian; layers without one are rounded to nearest).
        ``bounds``: tensor -> the interval its producer's values lie in
        (:func:`mpsearch.graph.ranges.output_bounds`), which its range never leaves."""
        self.stats = stats
        self.bounds = bounds or {}
        self.weights = weights
        self.moments = moments or {}
        self.activation_method = activation_method
        self.settings = settings
        self.hessians = hessians or {}
        self._act: Memo[tuple[str, Format], QParams] = Memo()
        self._layers: Memo[tuple, LayerWeights] = Memo()
        self._factors = FactorCache()

    @property
    def rounding(self) -> Rounding:
        return self.settings.rounding

    def with_settings(self, settings: WeightSettings) -> RangeSetter:
        """The same statistics with weights quantized by ``settings``; activation parameters
        and Hessian factors (which do not depend on them) are shared."""
        other = RangeSetter(self.stats, self.weights, moments=self.moments,
                            activation_method=self.activation_method, settings=settings,
                            hessians=self.hessians, bounds=self.bounds)
        other._act, other._factors = self._act, self._factors
        return other

    def activation(self, tensor: str, fmt: Format) -> QParams:
        return self._act.get((tensor, fmt), lambda: activation_qparams(
            self.stats[tensor], fmt, self.activation_method, self.bounds.get(tensor)))

    def layer(self, layer: Layer, fmt: Format, *, sparsity: Sparsity | None = None,
              input_scale: float | None = None) -> LayerWeights:
        """The layer's weights in ``fmt``, pruned to ``sparsity`` (None: dense).
        ``input_scale``: the scale of its integer input when the bias is stored as int32
        (None otherwise)."""
        if sparsity is not None and sparsity.density >= 1:
            sparsity = None
        if layer.weight is None:
            raise ValueError(f"layer {layer.name} has no weight")

        def make() -> LayerWeights:
            # The int32 limit on the bias only raises the scales of a few nearly dead
            # channels: start from the result without it, so the clipping search and the
            # rounding (seconds for a large layer) are not redone for every input format.
            base = (self.layer(layer, fmt, sparsity=sparsity) if input_scale is not None
                    else None)
            inputs = LayerInputs(layer=layer, weight=self.weights[layer.weight],
                                 bias=self.weights[layer.bias] if layer.bias else None,
                                 moments=self.moments.get(layer.inputs[0]),
                                 hessian=self.hessians.get(layer.name))
            return quantize_layer(inputs, fmt, settings=self.settings, sparsity=sparsity,
                                  input_scale=input_scale, base=base, factors=self._factors)

        return self._layers.get((layer.name, fmt, sparsity, input_scale), make)
