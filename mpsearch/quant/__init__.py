"""Quantizing layers: one layer's weights in one format (output-aware clipping, bias correction,
GPTQ rounding: :mod:`.layer`, :mod:`.rounding`), OBS/SparseGPT pruning (:mod:`.prune`),
Bayesian-Bits gates learned per layer (:mod:`.gating`), the one provider of quantization
parameters (:mod:`.parameters`), and :func:`~mpsearch.quant.analysis.analyze`, which runs the
plan-independent part once and returns the :class:`~mpsearch.quant.analysis.Analysis` every
later stage reads.

May import: core, data, graph.
"""
