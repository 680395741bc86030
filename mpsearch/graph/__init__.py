"""The model as the stages see it, and what one calibration pass measures of it: ingestion (load,
check, normalise: :mod:`.ingest`; ``If`` nodes the data decides once, replaced by their branch:
:mod:`.control`), the layer graph with its quantizer groups and ties
(:mod:`.layer_graph`), what flows along it under a plan (activation formats, channel routes:
:mod:`.flow`), the calibration pass (:mod:`.calibrate`) with its statistics (ranges,
histograms, channel moments, the layer Hessians ``E[x xᵀ]``: :mod:`.layer_hessian`), range
setting (:mod:`.ranges`), cross-layer equalization (:mod:`.equalize`) and the comparison of a
quantized model with FP32 (:mod:`.evaluate`).

May import: core, data.
"""
