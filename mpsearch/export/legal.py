"""What a QDQ export accepts: a candidate for every quantizer group and none for anything else,
no 4-bit activations, and sparse candidates only where their layer can take the pattern
(2:4 and unstructured: :func:`mpsearch.quant.prune.sparsity_refusal`; output channels: where
:func:`mpsearch.graph.flow.channel_route` can follow them to a dense consumer) with
quantized weights (pruned integers or fp8, zeros at the zero point)."""

from __future__ import annotations

from collections.abc import Mapping

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Candidate, Format
from mpsearch.graph.flow import ChannelRefusal, channel_route
from mpsearch.graph.layer_graph import LayerGraph
from mpsearch.quant.prune import sparsity_refusal

__all__ = ["check_plan"]


def check_plan(lg: LayerGraph, plan: Mapping[str, Candidate]) -> None:
    names = set(lg.group_names)
    missing = [g for g in lg.group_names if g not in plan]
    extra = sorted(set(plan) - names)
    if missing:
        raise UsageError(f"the plan has no candidate for {len(missing)} group(s), first "
                         f"'{missing[0]}'", fix="give every quantizer group a candidate")
    if extra:
        raise UsageError(f"the plan names unknown group(s) {extra[:3]}",
                         fix="use group names from 'mpsearch inspect'")
    for g, c in plan.items():
        if c.sparsity is not None:
            _check_sparse(lg, g, c)
        if c.activation is Format.INT4 or c.activation is Format.UINT4:
            raise UsageError(f"group '{g}': 4-bit activations are not supported",
                             fix="use 8- or 16-bit activations")


def _check_sparse(lg: LayerGraph, g: str, c: Candidate) -> None:
    """A sparse candidate is exported where its layer can take the pattern (2:4, unstructured;
    output channels where their route is legal) and its weights are quantized (pruned integers
    or fp8, zeros at the zero point)."""
    sp = c.sparsity
    if not c.weight.is_quantized:
        raise UsageError(f"group '{g}': candidate {c} prunes {c.weight} weights; only "
                         "integer and fp8 weights are exported pruned",
                         fix="use a sparse candidate with integer or fp8 weights")
    if sp.pattern == "channel":
        route = channel_route(lg, g)
        if isinstance(route, ChannelRefusal):
            raise UsageError(f"group '{g}': candidate {c} cannot prune its output channels: "
                             f"{route.reason} (at '{route.node}')",
                             fix="give this group a dense candidate or another sparsity")
    reason = sparsity_refusal(lg.layers[g], sp)
    if reason is not None:
        raise UsageError(f"group '{g}': cannot take {sp.name}: {reason}",
                         fix="give this group a dense candidate")
