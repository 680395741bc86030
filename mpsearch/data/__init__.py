"""Data in and files out: what the data must look like (:mod:`.spec`: the model's inputs, their
sample axes, inputs given once), calibration and evaluation datasets checked against it and
streamed in batches (:mod:`.dataset`, :mod:`.npyio`), and output folders written atomically,
never over the inputs, holding only files that pass the checker (:mod:`.outputs`).

May import: core.
"""
