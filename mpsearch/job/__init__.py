"""The job users come for: :func:`mpsearch.job.search.search` chains the stages under one frozen
:class:`~mpsearch.job.config.SearchConfig` and returns a typed
:class:`~mpsearch.job.result.SearchResult`. Beside it, what the search does between solves:
refinement (measure what the plan rests on and solve again, :mod:`.refinement`), selection of
the best measured plan of a shortlist (:mod:`.selection`), a measured local search
(:mod:`.polish`), the user's pins (:mod:`.pins`); and what a run writes: ``plan.json`` and
``plan.csv`` (:mod:`.document`) and the whole run folder (:mod:`.run_folder`).

The package is ``job``, not ``search``, because ``mpsearch.search`` is the public function.

May import: core, data, graph, quant, hw, export, sensitivity, solve, device, report.
"""
