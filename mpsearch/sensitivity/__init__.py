"""Sensitivity: how much the network output suffers when one quantizer group takes one candidate.
One module per estimator (measured single-group runs: :mod:`.measured` on the graph below the
group, :mod:`.suffix`; predicted from the layer Hessian: :mod:`.hessian` with its gains,
:mod:`.gain`; gating sweeps as extra candidates: :mod:`.gated`), one entry point
(:func:`mpsearch.sensitivity.run.estimate`), the table they fill (:mod:`.table`) and its
cache (:mod:`.cache`).

May import: core, data, graph, quant, hw, export.
"""
