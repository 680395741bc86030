"""Tables and plots a person reads: the self-contained ``report.html`` (:mod:`.html`,
:mod:`.sections`), the Pareto plot (:mod:`.pareto`), the allocation along the network
(:mod:`.allocation`) and the sensitivity heatmap (:mod:`.heatmap`), all drawn from a run
folder's files (:mod:`.runfiles`), so ``mpsearch report`` redraws them without re-running
anything.

May import: core, data, hw, sensitivity.
"""
