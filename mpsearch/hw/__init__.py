"""Hardware: device profiles parsed from YAML into frozen objects (:mod:`.profile`), the cost of
a layer and of a plan on a device (:mod:`.cost`: latency, bit-operations, bytes, energy), and
measured latency tables written back into a profile (:mod:`.table_io`; measuring them is
:mod:`mpsearch.device.latency`).

May import: core, graph.
"""
