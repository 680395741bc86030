"""The one provider of quantization parameters for a model and its calibration.

Activation parameters come from :mod:`mpsearch.graph.ranges`, layer weights from
:mod:`mpsearch.quant.layer`; both are memoised per tensor (or layer) and format. The exporter and
the sensitivity estimators ask the same object, so what is scored is what is shipped.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mpsearch.core.formats import Format
from mpsearch.graph.calibrate import ChannelMoments, TensorStats
from mpsearch.graph.layer_graph import Layer
from mpsearch.graph.layer_hessian import LayerHessian
from mpsearch.graph.ranges import QParams, RangeMethod, activation_qparams
from mpsearch.quant.layer import LayerWeights, Rounding, quantize_layer

__all__ = ["RangeSetter"]


class RangeSetter:
    """Quantization parameters, memoised per tensor or layer and format."""

    def __init__(self, stats: Mapping[str, TensorStats], weights: Mapping[str, np.ndarray], *,
                 moments: Mapping[str, ChannelMoments] | None = None,
                 activation_method: RangeMethod = RangeMethod.MSE,
                 weight_method: RangeMethod = RangeMethod.MSE,
                 bias_correction: bool = True,
                 hessians: Mapping[str, LayerHessian] | None = None,
                 rounding: Rounding = Rounding.NEAREST) -> None:
        """``hessians``: layer name -> its Hessian, what ``Rounding.HESSIAN`` rounds with
        (layers without one are rounded to nearest)."""
        self.stats = stats
        self.weights = weights
        self.moments = moments or {}
        self.activation_method = activation_method
        self.weight_method = weight_method
        self.bias_correction = bias_correction
        self.hessians = hessians or {}
        self.rounding = rounding
        self._act: dict[tuple[str, Format], QParams] = {}
        self._layers: dict[tuple[str, Format, float | None], LayerWeights] = {}

    def with_rounding(self, rounding: Rounding) -> RangeSetter:
        """The same statistics and settings with weights rounded by ``rounding``; activation
        parameters (which do not depend on it) are shared."""
        other = RangeSetter(self.stats, self.weights, moments=self.moments,
                            activation_method=self.activation_method,
                            weight_method=self.weight_method,
                            bias_correction=self.bias_correction, hessians=self.hessians,
                            rounding=rounding)
        other._act = self._act
        return other

    def activation(self, tensor: str, fmt: Format) -> QParams:
        key = (tensor, fmt)
        if key not in self._act:
            self._act[key] = activation_qparams(self.stats[tensor], fmt, self.activation_method)
        return self._act[key]

    def layer(self, layer: Layer, fmt: Format, *,
              input_scale: float | None = None) -> LayerWeights:
        """The layer's weights in ``fmt``. ``input_scale``: the scale of its integer input
        when the bias is stored as int32 (None otherwise)."""
        key = (layer.name, fmt, input_scale)
        if key not in self._layers:
            if layer.weight is None:
                raise ValueError(f"layer {layer.name} has no weight")
            bias = self.weights[layer.bias] if layer.bias else None
            # The int32 limit on the bias only raises the scales of a few nearly dead
            # channels: start from the result without it, so the clipping search and the
            # rounding (seconds for a large layer) are not redone for every input format.
            base = self.layer(layer, fmt) if input_scale is not None else None
            self._layers[key] = quantize_layer(
                layer, self.weights[layer.weight], bias, fmt,
                moments=self.moments.get(layer.inputs[0]), method=self.weight_method,
                input_scale=input_scale, bias_correction=self.bias_correction,
                hessian=self.hessians.get(layer.name), rounding=self.rounding, base=base)
        return self._layers[key]
