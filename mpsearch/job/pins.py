"""The user's pins (``--pin NODE=CANDIDATE``, ``--keep-float NODE``), checked before the
search: the layer exists, the device can run the candidate, and every group it is tied to (at
an Add or Concat) can take the same activation format."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Candidate, Format, parse_candidate
from mpsearch.hw.cost import CostModel
from mpsearch.quant.analysis import Analysis

__all__ = ["resolve_pins"]


def resolve_pins(analysis: Analysis, costs: CostModel,
                 candidates: Mapping[str, Sequence[Candidate]],
                 pin: Mapping[str, str | Candidate], keep_float: Iterable[str]
                 ) -> dict[str, Candidate]:
    """Layer -> the candidate it must take: ``keep_float`` layers in float, ``pin``'s as
    given; each checked against the graph, the device and the ties (UsageError naming the
    fix otherwise)."""
    lg = analysis.graph
    out: dict[str, Candidate] = {}
    for node in keep_float:
        if node not in lg.layers:
            raise UsageError(f"--keep-float {node}: no quantizable layer of that name",
                             fix="see 'mpsearch inspect MODEL' for the layer names")
        out[node] = Candidate(weight=Format.FLOAT, activation=Format.FLOAT)
    for node, cand in pin.items():
        if node not in lg.layers:
            raise UsageError(f"--pin {node}: no quantizable layer of that name",
                             fix="see 'mpsearch inspect MODEL' for the layer names")
        out[node] = cand if isinstance(cand, Candidate) else parse_candidate(str(cand))
    for node, c in out.items():
        if c not in candidates[node]:
            try:
                costs.layer(node, c)
            except Exception as e:  # noqa: BLE001 - a profile error here is the user's pin
                raise UsageError(f"pin {node}={c.name}: {costs.profile.name} cannot run "
                                 f"{c.name} ({e})",
                                 fix=f"pin one of {', '.join(x.name for x in candidates[node])}"
                                 ) from None
    for tie in lg.tie_classes():
        for g in sorted(tie & set(out)):
            act = out[g].activation
            for other in sorted(tie - {g}):
                if not any(c.activation == act for c in (*candidates[other],
                                                         *([out[other]] if other in out
                                                           else []))):
                    raise UsageError(
                        f"pin {g}={out[g].name} needs {other} to take {act.name} activations "
                        f"too (they meet at an Add or Concat and must share a format), and "
                        f"none of its candidates does",
                        fix=f"pin {other} as well, or allow {act.name} activations for it")
    return out
