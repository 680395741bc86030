"""Cost model: what each layer costs in each candidate on one device, and what a plan costs.

Per layer ``l`` and candidate ``c = (w, a)``:

* MACs from the LayerGraph; bit-operations ``BOPs = MACs · b_w · b_a`` (float formats count
  their width: fp16 16, fp32 32);
* weight bytes ``params · d · (b_w + m) / 8`` for a sparsity of density ``d`` with ``m`` index
  bits per kept weight (dense: ``d = 1, m = 0``), plus the bias (int32 next to integer weights
  and activations, else the float width); activation bytes ``(inputs + output) · b_a / 8``;
  BOPs count kept weights only; the compute term divides by the pattern's speed-up (2:4 on
  sparse tensor cores: 2; elsewhere 1: memory savings only);
* output-channel pruning (``+channel@d``) is structural: the layer's MACs, weights, bias and
  output bytes scale by ``d`` (the pattern's speed-up should be 1), and so do the MACs, weights
  and input bytes of what reads the channels (:func:`mpsearch.graph.flow.channel_route`:
  a depthwise conv on the way shrinks whole, the dense consumer loses input columns). Those
  savings are credited to the pruned group, costed in its own (dense) pair where the reader's
  op allows it, else in w8a8, so group costs still add (an approximation where the reader
  takes another pair); a measured table's dense time is scaled by ``d``;
* latency: the profile's measured table when it has this layer and candidate, else the roofline
  ``max(MACs / peak(c), bytes / bandwidth) + per-layer overhead``;
* energy ``MACs · e_MAC(c) + bytes · e_byte``.

A plan adds its layers, plus a conversion wherever a producer's activation format differs from
a consumer's (``per_edge + bytes · per_byte``), plus, with a latency table, the measured time of
the non-layer ops, shared among groups by output size. Totals are also given relative to the
all-w8a8 plan on the same device (the device's 8-bit integer pair).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from mpsearch.core.errors import ProfileError, UsageError
from mpsearch.core.formats import Candidate, Format, FormatKind
from mpsearch.graph.flow import ChannelRefusal, channel_route, node_formats
from mpsearch.graph.layer_graph import Layer, LayerGraph
from mpsearch.hw.profile import HardwareProfile

__all__ = ["CostModel", "LayerCost", "PlanCost", "reference_candidate"]

log = logging.getLogger(__name__)

METRICS = ("latency_s", "bops", "weight_bytes", "activation_bytes", "energy_j")


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    layer: str
    candidate: Candidate
    macs: int
    bops: float
    weight_bytes: float
    activation_bytes: float
    latency_s: float
    energy_j: float
    latency_from: str  # "table" or "roofline"


@dataclass(frozen=True, kw_only=True)
class PlanCost:
    latency_s: float
    bops: float
    weight_bytes: float
    activation_bytes: float
    energy_j: float
    conversions: int
    conversion_s: float
    relative: Mapping[str, float]  # each metric / the all-w8a8 plan's

    def as_dict(self) -> dict[str, float]:
        return {m: getattr(self, m) for m in METRICS}


def reference_candidate(profile: HardwareProfile) -> Candidate:
    """The device's w8a8: its first 8-bit integer (weight, activation) pair."""
    for c in profile.all_pairs:
        w, a = c.weight.spec, c.activation.spec
        if w.kind is FormatKind.INT and a.kind is FormatKind.INT and w.bits == 8 == a.bits:
            return c
    raise ProfileError(f"profile {profile.name} allows no 8-bit integer pair, so costs cannot "
                       "be given relative to w8a8", fix="allow w8a8 for some op")


def _elements(shape: tuple[int | None, ...] | None) -> int:
    if not shape or any(d is None for d in shape):
        return 0
    return math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)


class CostModel:
    """Costs of every (group, candidate) of one LayerGraph on one device, memoised."""

    def __init__(self, lg: LayerGraph, profile: HardwareProfile, *, warn: bool = True) -> None:
        """``warn``: say when the profile's latency table is not this model's (off for a
        cost model built only to check budgets before the run's own)."""
        self.lg, self.profile = lg, profile
        self.reference = reference_candidate(profile)
        # A table is measured on one model; layer names such as node_Conv_12 recur across
        # models, so it is used only when it covers exactly this graph's layers.
        table = profile.latency_table
        self.table = table if table is not None and set(table.layers) == set(lg.layers) else None
        if table is not None and self.table is None and warn:
            log.warning("the latency table in profile %s was measured on another model "
                        "(%s); using the roofline instead", profile.name,
                        table.model_sha256[:12])
        self._cache: dict[tuple[str, Candidate], LayerCost] = {}
        self._out = {name: _elements(lg.activations[layer.output].shape)
                     if layer.output in lg.activations else 0
                     for name, layer in lg.layers.items()}
        self._in = {name: sum(_elements(lg.activations[t].shape) for t in layer.inputs
                              if t in lg.activations)
                    for name, layer in lg.layers.items()}

    def candidates(self, group: str) -> tuple[Candidate, ...]:
        """The candidates the device allows for this group's op (pins win)."""
        layer = self.lg.layers[group]
        if group in self.profile.pins:
            return (self.profile.pins[group],)
        return self.profile.pairs_for(layer.op_type)

    def layer(self, group: str, cand: Candidate) -> LayerCost:
        key = (group, cand)
        if key not in self._cache:
            self._cache[key] = self._layer_cost(self.lg.layers[group], cand)
        return self._cache[key]

    def _layer_cost(self, layer: Layer, c: Candidate) -> LayerCost:
        sp = c.sparsity
        if sp is None or sp.pattern != "channel":
            return self._scaled_cost(layer, c)
        d = sp.density
        own = self._scaled_cost(layer, c, mac_scale=d, weights=d, bias=d, output=d)
        route = channel_route(self.lg, layer.name)
        if isinstance(route, ChannelRefusal):
            raise UsageError(f"group '{layer.name}': candidate {c} prunes output channels, "
                             f"which it cannot: {route.reason}",
                             fix="give this group a dense candidate")
        dense = Candidate(weight=c.weight, activation=c.activation)
        saved = dict.fromkeys(("bops", "weight_bytes", "activation_bytes", "latency_s",
                               "energy_j"), 0.0)
        for node in (*route.depthwise, *route.consumers):
            reader = self.lg.layers[node]
            rc = dense if dense in self.profile.pairs_for(reader.op_type) else self.reference
            out = d if node in route.depthwise else 1.0
            full = self._scaled_cost(reader, rc)
            part = self._scaled_cost(reader, rc, mac_scale=d, weights=d, bias=out, inputs=d,
                                     output=out)
            for m in saved:
                saved[m] += getattr(full, m) - getattr(part, m)
        return LayerCost(layer=layer.name, candidate=c, macs=own.macs,
                         bops=own.bops - saved["bops"],
                         weight_bytes=own.weight_bytes - saved["weight_bytes"],
                         activation_bytes=own.activation_bytes - saved["activation_bytes"],
                         latency_s=own.latency_s - saved["latency_s"],
                         energy_j=own.energy_j - saved["energy_j"], latency_from=own.latency_from)

    def _scaled_cost(self, layer: Layer, c: Candidate, *, mac_scale: float = 1.0,
                     weights: float = 1.0, bias: float = 1.0, inputs: float = 1.0,
                     output: float = 1.0) -> LayerCost:
        """The cost of ``layer`` in ``c`` with its MACs, weights, bias, input and output
        bytes scaled (channel pruning, :meth:`_layer_cost`; all 1: the layer as it is)."""
        p = self.profile
        macs = round((layer.macs or 0) * mac_scale)
        wb, ab = c.weight.bits, c.activation.bits
        has_w = layer.weight is not None
        weight_params = layer.params - (layer.out_channels or 0 if layer.bias else 0)
        bias_bits = 32 if (c.weight.spec.kind is FormatKind.INT
                           and c.activation.spec.kind is FormatKind.INT) else max(ab, 16)
        sp = c.sparsity
        density, speedup, meta_bits = 1.0, 1.0, 0.0
        if sp is not None:
            pattern = p.sparsity.get(sp.pattern)
            if pattern is None:
                raise ProfileError(f"profile {p.name} has no sparsity pattern '{sp.pattern}' "
                                   f"(candidate {c})",
                                   fix=f"add it under sparsity.patterns or do not use {c}")
            speedup, meta_bits = pattern.speedup, pattern.metadata_bits
            if sp.pattern != "channel":  # channel pruning comes in through the scales
                density = sp.density
        kept = weight_params * density * weights
        weight_bytes = (kept * (wb + meta_bits) + (layer.out_channels or 0) * bias_bits
                        * bool(layer.bias) * bias) / 8 if has_w else 0.0
        act_bytes = (self._in[layer.name] * inputs + self._out[layer.name] * output) * ab / 8
        measured = self.table.layers.get(layer.name, {}) if self.table is not None else {}
        dense_c = Candidate(weight=c.weight, activation=c.activation)
        if c in measured and mac_scale == 1:
            latency, source = measured[c], "table"
        elif (sp is None or sp.pattern == "channel") and dense_c in measured:
            latency, source = measured[dense_c] * mac_scale, "table"
        else:
            peak = p.compute.macs_per_s.get(Candidate(weight=c.weight, activation=c.activation))
            if peak is None:
                raise ProfileError(f"profile {p.name} has no compute cost for {c} "
                                   f"(layer {layer.name})",
                                   fix=f"add {c} under cost.compute.macs_per_s")
            latency = (max(macs / (peak * speedup),
                           (weight_bytes + act_bytes) / p.memory.bytes_per_s)
                       + p.per_layer_overhead_s)
            source = "roofline"
        dense = Candidate(weight=c.weight, activation=c.activation)
        e_mac = p.energy.pj_per_mac.get(dense)
        if e_mac is None:
            raise ProfileError(f"profile {p.name} has no energy cost for {c}",
                               fix=f"add {c} under cost.energy.pj_per_mac")
        energy = (macs / speedup * e_mac + (weight_bytes + act_bytes) * p.energy.pj_per_byte) \
            * 1e-12
        return LayerCost(layer=layer.name, candidate=c, macs=macs,
                         bops=float(macs) * density * wb * ab,
                         weight_bytes=weight_bytes, activation_bytes=act_bytes,
                         latency_s=latency, energy_j=energy, latency_from=source)

    # -- plans

    def plan(self, plan: Mapping[str, Candidate], *, relative: bool = True) -> PlanCost:
        totals = dict.fromkeys(METRICS, 0.0)
        for g, c in plan.items():
            lc = self.layer(g, c)
            for m in METRICS:
                totals[m] += getattr(lc, m)
        n_conv, conv_s = self._conversions(plan)
        totals["latency_s"] += conv_s + self.other_ops_s(plan)
        rel = {}
        if relative:
            ref = self.plan({g: self.reference for g in plan}, relative=False)
            rel = {m: totals[m] / getattr(ref, m) if getattr(ref, m) else math.nan
                   for m in METRICS}
        return PlanCost(conversions=n_conv, conversion_s=conv_s, relative=rel, **totals)

    def _conversions(self, plan: Mapping[str, Candidate]) -> tuple[int, float]:
        fmt = node_formats(self.lg, plan)
        p, table = self.profile, self.table
        per_byte = table.conversion_s_per_byte if table else p.conversion.per_byte_s
        per_edge = 0.0 if table else p.conversion.per_edge_s
        count, seconds = 0, 0.0
        for act in self.lg.activations.values():
            src = fmt.get(act.producer) if act.producer else None
            if src is None or not src.is_quantized:
                continue
            targets = {fmt[c] for c in act.consumers if fmt[c].is_quantized and fmt[c] is not src}
            for f in targets:
                count += 1
                seconds += per_edge + _elements(act.shape) * (src.bits + f.bits) / 8 * per_byte
        return count, seconds

    def other_ops_s(self, plan: Mapping[str, Candidate]) -> float:
        """Measured time of the non-layer ops, shared among groups by output size."""
        table = self.table
        if table is None or not table.other_s:
            return 0.0
        total = sum(self._out.values()) or 1
        s = 0.0
        for g, c in plan.items():
            f = c.activation if c.activation.is_quantized else Format.FLOAT
            per = table.other_s.get(f, table.other_s.get(Format.FLOAT, 0.0))
            s += per * self._out[g] / total
        return s
