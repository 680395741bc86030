"""The vocabulary every stage speaks: the one error family (:mod:`.errors`), number formats,
candidates and their fake-quantizers (:mod:`.formats`), the registry of per-op facts
(:mod:`.ops`: weight input, channel axis, MACs, channel flow), and small shared tools (BLAS
threads, a thread-safe memo, the version).

May import: nothing.
"""
