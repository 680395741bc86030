"""The command line, thin over the library: :mod:`.main` builds the parser and maps errors to
exit codes, one module per sub-command (``inspect``, ``quantize``, ``eval``, ``hw``,
``sensitivity``, ``run``, ``pareto``, ``report``, ``verify``), :mod:`.args` holds the argument
types and options they share, :mod:`.ui` the progress bars and tables.

May import: core, data, graph, quant, hw, export, sensitivity, solve, device, report, job.
"""
