"""Data in and files out: calibration and evaluation datasets checked against the model's inputs
and streamed in batches (:mod:`.dataset`, :mod:`.npyio`), and output folders written
atomically, never over the inputs (:mod:`.outputs`).

May import: core.
"""
