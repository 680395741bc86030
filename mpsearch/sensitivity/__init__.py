"""Sensitivity: how much the network output suffers when one quantizer group takes one
candidate, measured (:mod:`.measured`) and predicted from the layer Hessian (:mod:`.hessian`)."""

from mpsearch.sensitivity.cache import SensitivityCache, data_digest, default_cache_dir
from mpsearch.sensitivity.run import Method, estimate, table_variant
from mpsearch.sensitivity.table import HessianFit, SensitivityTable, candidates_for, sqnr

__all__ = ["HessianFit", "Method", "SensitivityCache", "SensitivityTable", "candidates_for",
           "data_digest", "default_cache_dir", "estimate", "sqnr", "table_variant"]
