"""Hardware profiles: one YAML file per device, parsed once into frozen, typed objects.

A profile says which number formats the device has, which (weight, activation) candidates
each op type may take, what a MAC, a byte and a format conversion cost there (time and
energy), optionally a measured per-layer latency table, how sparsity pays off, and the
compiler's rules (tied formats at Add/Concat/Mul, pinned layers). The schema is documented
with a commented example in ``hw_profiles/README.md``.

Every problem is a :class:`~mpsearch.core.errors.ProfileError` naming the file, the line and the
key path (``cost.compute.macs_per_s.w8a8``). Line numbers come from PyYAML's composed node
tree, which also catches duplicate keys (``yaml.safe_load`` keeps the last one silently).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mpsearch.core.errors import MpsearchError, ProfileError
from mpsearch.core.formats import Candidate, Format, FormatKind, parse_candidate
from mpsearch.core.frozen import freeze, freeze_fields

__all__ = ["ComputeCost", "ConversionCost", "EnergyCost", "HardwareProfile", "LatencyTable",
           "MemoryCost", "SparsityPattern", "load_profile", "parse_profile"]

SCHEMA_VERSION = 1
RUNTIMES = ("qnn-htp", "ort-cpu", "tensorrt", "generic")


# --------------------------------------------------------------------------- typed result


@dataclass(frozen=True, kw_only=True)
class ComputeCost:
    macs_per_s: Mapping[Candidate, float]  # peak multiply-accumulates per second per pair
    source: str

    def __post_init__(self) -> None:
        freeze_fields(self, "macs_per_s")


@dataclass(frozen=True, kw_only=True)
class MemoryCost:
    bytes_per_s: float  # bandwidth to weights and activations (roofline)
    source: str


@dataclass(frozen=True, kw_only=True)
class EnergyCost:
    pj_per_mac: Mapping[Candidate, float]
    pj_per_byte: float  # moving one byte to or from memory
    source: str

    def __post_init__(self) -> None:
        freeze_fields(self, "pj_per_mac")


@dataclass(frozen=True, kw_only=True)
class ConversionCost:
    """A format change between adjacent layers (a DQ/Q pair or a Convert op)."""

    per_edge_s: float
    per_byte_s: float
    source: str


@dataclass(frozen=True, kw_only=True)
class LatencyTable:
    """Measured seconds per layer and candidate, for one model (``mpsearch hw measure``)."""

    model_sha256: str
    layers: Mapping[str, Mapping[Candidate, float]]
    other_s: Mapping[Format, float]  # the non-layer ops of the whole model, per activation
    conversion_s_per_byte: float
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", freeze({k: freeze(v) for k, v in self.layers.items()}))
        freeze_fields(self, "other_s")


@dataclass(frozen=True, kw_only=True)
class SparsityPattern:
    name: str  # "2:4", "unstructured", "channel"
    speedup: float  # compute speed-up at the pattern's density (1.0: memory savings only)
    metadata_bits: float  # per kept weight
    source: str


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    name: str
    description: str
    path: Path | None
    runtime: str
    soc_model: int | None
    weight_formats: tuple[Format, ...]
    activation_formats: tuple[Format, ...]
    default_pairs: tuple[Candidate, ...]
    op_pairs: Mapping[str, tuple[Candidate, ...]]
    compute: ComputeCost
    memory: MemoryCost
    energy: EnergyCost
    conversion: ConversionCost
    per_layer_overhead_s: float
    overhead_source: str
    latency_table: LatencyTable | None = None
    sparsity: Mapping[str, SparsityPattern] = field(default_factory=dict)
    tie_ops: frozenset[str] = frozenset()
    pins: Mapping[str, Candidate] = field(default_factory=dict)
    # the device's outputs must agree with the CPU EP at least this (None: the default, 25 dB)
    verify_min_sqnr_db: float | None = None

    def __post_init__(self) -> None:
        freeze_fields(self, "op_pairs", "sparsity", "pins")

    def pairs_for(self, op_type: str) -> tuple[Candidate, ...]:
        """The candidates an op type may take on this device."""
        return self.op_pairs.get(op_type, self.default_pairs)

    @property
    def all_pairs(self) -> tuple[Candidate, ...]:
        seen: dict[Candidate, None] = dict.fromkeys(self.default_pairs)
        for pairs in self.op_pairs.values():
            seen.update(dict.fromkeys(pairs))
        return tuple(seen)


# --------------------------------------------------------------------------- parsing


class _Doc:
    """The parsed YAML plus the line of every key path, for messages."""

    def __init__(self, text: str, where: str) -> None:
        self.where = where
        self.lines: dict[tuple[str, ...], int] = {}
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ProfileError(f"{where}{line}: invalid YAML ({problem})",
                               fix="fix the YAML syntax") from e
        if root is None:
            raise ProfileError(f"{where}: the profile is empty", fix="see hw_profiles/README.md")
        self._index(root, ())
        self.data = yaml.safe_load(text)

    def _index(self, node: yaml.Node, path: tuple[str, ...], line: int | None = None) -> None:
        self.lines[path] = line if line is not None else node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                key = str(k.value)
                if key in seen:
                    self.lines[(*path, key)] = k.start_mark.line + 1
                    raise self.error((*path, key), "is defined twice",
                                     "keep one definition")
                seen.add(key)
                self._index(v, (*path, key), k.start_mark.line + 1)  # a key's own line
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._index(v, (*path, str(i)))

    def error(self, path: tuple[str, ...], problem: str, fix: str) -> ProfileError:
        line = next((self.lines[path[:k]] for k in range(len(path), -1, -1)
                     if path[:k] in self.lines), None)
        key = ".".join(path) or "(top level)"
        at = f"{self.where}:{line}" if line else self.where
        return ProfileError(f"{at}: {key} {problem}", fix=fix)


_TYPES = {"str": str, "int": int, "number": (int, float), "mapping": dict, "list": list}


def _get(doc: _Doc, obj: Mapping[str, Any], path: tuple[str, ...], key: str, kind: str, *,
         required: bool = True, default: Any = None) -> Any:
    if key not in obj:
        if required:
            raise doc.error((*path, key), "is missing", f"add '{key}' (see hw_profiles/README.md)")
        return default
    v = obj[key]
    ok = isinstance(v, _TYPES[kind]) and not (kind in ("int", "number") and isinstance(v, bool))
    if not ok and kind == "number" and isinstance(v, str):
        return _number(doc, v, (*path, key), positive=False)
    if not ok:
        raise doc.error((*path, key), f"must be a {kind}, not {type(v).__name__} ({v!r})",
                        f"write a {kind}")
    return v


def _keys(doc: _Doc, obj: Mapping[str, Any], path: tuple[str, ...], allowed: set[str]) -> None:
    for k in obj:
        if k not in allowed:
            raise doc.error((*path, str(k)), "is not a known key",
                            f"use one of: {', '.join(sorted(allowed))}")


def _number(doc: _Doc, v: Any, path: tuple[str, ...], *, positive: bool = True) -> float:
    if isinstance(v, str):  # YAML 1.1 reads 2.5e9 (no exponent sign) as a string
        with contextlib.suppress(ValueError):
            v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise doc.error(path, f"must be a finite number, not {v!r}", "write a number")
    if v < 0 or (positive and v == 0):
        raise doc.error(path, f"must be {'positive' if positive else 'zero or more'}, not {v}",
                        "costs and throughputs cannot be negative")
    return float(v)


def _source(doc: _Doc, obj: Mapping[str, Any], path: tuple[str, ...]) -> str:
    s = _get(doc, obj, path, "source", "str")
    if not s.strip():
        raise doc.error((*path, "source"), "is empty",
                        "name where the numbers come from, or say 'placeholder'")
    return s.strip()


def _candidate(doc: _Doc, text: Any, path: tuple[str, ...], weights: tuple[Format, ...],
               acts: tuple[Format, ...]) -> Candidate:
    if not isinstance(text, str):
        raise doc.error(path, f"must be a candidate name such as w8a8, not {text!r}",
                        "write w8a8, w4a16, fp16, ...")
    try:
        c = parse_candidate(text)
    except MpsearchError as e:
        raise doc.error(path, f"'{text}' is not a candidate ({e.problem})",
                        e.fix or "write w8a8, w4a16, fp16, ...") from e
    for role, f, have in (("weight", c.weight, weights), ("activation", c.activation, acts)):
        if f.spec.kind is FormatKind.FLOAT and f is Format.FLOAT:
            continue
        if f not in have:
            raise doc.error(path, f"'{text}' uses {role} format {f}, which formats.{role}s "
                                  "does not declare",
                            f"declare {f} under formats.{role}s or remove '{text}'")
    return c


def _formats(doc: _Doc, obj: Mapping[str, Any], path: tuple[str, ...],
             key: str) -> tuple[Format, ...]:
    items = _get(doc, obj, path, key, "list")
    if not items:
        raise doc.error((*path, key), "is empty", "list at least one format")
    out = []
    for i, name in enumerate(items):
        try:
            out.append(Format.from_name(str(name)))
        except MpsearchError as e:
            raise doc.error((*path, key, str(i)), f"'{name}' is not a number format",
                            e.fix or "see hw_profiles/README.md") from e
    return tuple(out)


def _pair_map(doc: _Doc, obj: Any, path: tuple[str, ...], weights, acts, *,
              positive: bool = True) -> dict[Candidate, float]:
    if not isinstance(obj, dict) or not obj:
        raise doc.error(path, "must be a non-empty mapping of candidate -> number",
                        "write e.g. {w8a8: 1.0, w8a16: 0.5}")
    return {_candidate(doc, k, (*path, str(k)), weights, acts):
            _number(doc, v, (*path, str(k)), positive=positive) for k, v in obj.items()}


def parse_profile(text: str, *, where: str = "<profile>",
                  path: Path | None = None) -> HardwareProfile:
    """Parse and validate a profile's YAML text, one section at a time."""
    doc = _Doc(text, where)
    d = doc.data
    if not isinstance(d, dict):
        raise doc.error((), "must be a mapping of sections", "see hw_profiles/README.md")
    top = {"schema", "name", "description", "target", "formats", "ops", "cost", "sparsity",
           "rules", "latency_table"}
    _keys(doc, d, (), top)
    schema = _get(doc, d, (), "schema", "int")
    if schema != SCHEMA_VERSION:
        raise doc.error(("schema",), f"is {schema}; this mpsearch reads schema "
                                     f"{SCHEMA_VERSION}", "update the profile or mpsearch")
    name = _get(doc, d, (), "name", "str")
    description = _get(doc, d, (), "description", "str", required=False, default="")
    runtime, soc, threshold = _target(doc, d)
    fm = _get(doc, d, (), "formats", "mapping")
    _keys(doc, fm, ("formats",), {"weights", "activations"})
    weights = _formats(doc, fm, ("formats",), "weights")
    acts = _formats(doc, fm, ("formats",), "activations")
    default_pairs, op_pairs = _ops(doc, d, weights, acts)
    costs = _costs(doc, d, weights, acts)
    table = None
    if "latency_table" in d:
        table = _latency_table(doc, _get(doc, d, (), "latency_table", "mapping"), weights, acts)
    for pair in {*default_pairs, *(p for ps in op_pairs.values() for p in ps)}:
        pair = Candidate(weight=pair.weight, activation=pair.activation)  # costs are dense
        for key, priced in (("compute.macs_per_s", costs["compute"].macs_per_s),
                            ("energy.pj_per_mac", costs["energy"].pj_per_mac)):
            if pair not in priced:
                raise doc.error(("cost", *key.split(".")), f"has no entry for {pair}, which "
                                "ops allows", f"add {pair} under cost.{key}")
    sparsity = _sparsity(doc, d)
    for op, pairs in [("default", default_pairs), *op_pairs.items()]:
        for i, pair in enumerate(pairs):
            if pair.sparsity is not None and pair.sparsity.pattern not in sparsity:
                raise doc.error(("ops", op, str(i)), f"'{pair}' uses sparsity pattern "
                                f"'{pair.sparsity.pattern}', which sparsity.patterns does not "
                                "list", f"add {pair.sparsity.pattern} under sparsity.patterns")
    tie_ops, pins = _rules(doc, d, weights, acts)
    return HardwareProfile(
        name=name, description=description, path=path, runtime=runtime, soc_model=soc,
        weight_formats=weights, activation_formats=acts, default_pairs=default_pairs,
        op_pairs=op_pairs, **costs, latency_table=table, sparsity=sparsity, tie_ops=tie_ops,
        pins=pins, verify_min_sqnr_db=threshold)


def _target(doc: _Doc, d: Mapping[str, Any]) -> tuple[str, int | None, float | None]:
    target = _get(doc, d, (), "target", "mapping")
    _keys(doc, target, ("target",), {"runtime", "soc_model", "verify_min_sqnr_db"})
    runtime = _get(doc, target, ("target",), "runtime", "str")
    if runtime not in RUNTIMES:
        raise doc.error(("target", "runtime"), f"'{runtime}' is not a known runtime",
                        f"use one of: {', '.join(RUNTIMES)}")
    soc = _get(doc, target, ("target",), "soc_model", "int", required=runtime == "qnn-htp")
    threshold = None
    if "verify_min_sqnr_db" in target:
        threshold = _number(doc, _get(doc, target, ("target",), "verify_min_sqnr_db", "number"),
                            ("target", "verify_min_sqnr_db"), positive=False)
    return runtime, soc, threshold


def _ops(doc: _Doc, d: Mapping[str, Any], weights, acts
         ) -> tuple[tuple[Candidate, ...], dict[str, tuple[Candidate, ...]]]:
    """``ops``: (the default candidates, op type -> its candidates)."""
    op_pairs: dict[str, tuple[Candidate, ...]] = {}
    for op, pairs in _get(doc, d, (), "ops", "mapping").items():
        p = ("ops", str(op))
        if not isinstance(pairs, list):
            raise doc.error(p, f"must be a list of candidates, not {type(pairs).__name__}",
                            "write e.g. [w8a8, w8a16]")
        if not pairs:
            raise doc.error(p, "is an empty list", "list at least one candidate, or remove it")
        op_pairs[str(op)] = tuple(_candidate(doc, c, (*p, str(i)), weights, acts)
                                  for i, c in enumerate(pairs))
    if "default" not in op_pairs:
        raise doc.error(("ops", "default"), "is missing",
                        "give the candidates of op types not listed under ops.default")
    return op_pairs.pop("default"), op_pairs


def _section(doc: _Doc, cost: Mapping[str, Any], name: str, keys: set[str]
             ) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    path = ("cost", name)
    sec = _get(doc, cost, ("cost",), name, "mapping")
    _keys(doc, sec, path, keys | {"source"})
    return sec, path


def _costs(doc: _Doc, d: Mapping[str, Any], weights, acts) -> dict[str, Any]:
    """``cost``: the HardwareProfile fields it gives, by name."""
    cost = _get(doc, d, (), "cost", "mapping")
    _keys(doc, cost, ("cost",), {"compute", "memory", "energy", "overhead", "conversion"})

    def num(sec: Mapping[str, Any], path: tuple[str, ...], key: str, *,
            positive: bool = True) -> float:
        return _number(doc, _get(doc, sec, path, key, "number"), (*path, key),
                       positive=positive)

    def pairs(sec: Mapping[str, Any], path: tuple[str, ...], key: str) -> dict:
        return _pair_map(doc, _get(doc, sec, path, key, "mapping"), (*path, key), weights, acts)

    c, cp = _section(doc, cost, "compute", {"macs_per_s"})
    m, mp = _section(doc, cost, "memory", {"bytes_per_s"})
    e, ep = _section(doc, cost, "energy", {"pj_per_mac", "pj_per_byte"})
    o, op = _section(doc, cost, "overhead", {"per_layer_s"})
    cv, cvp = _section(doc, cost, "conversion", {"per_edge_s", "per_byte_s"})
    return {
        "compute": ComputeCost(macs_per_s=pairs(c, cp, "macs_per_s"), source=_source(doc, c, cp)),
        "memory": MemoryCost(bytes_per_s=num(m, mp, "bytes_per_s"), source=_source(doc, m, mp)),
        "energy": EnergyCost(pj_per_mac=pairs(e, ep, "pj_per_mac"),
                             pj_per_byte=num(e, ep, "pj_per_byte", positive=False),
                             source=_source(doc, e, ep)),
        "per_layer_overhead_s": num(o, op, "per_layer_s", positive=False),
        "overhead_source": _source(doc, o, op),
        "conversion": ConversionCost(per_edge_s=num(cv, cvp, "per_edge_s", positive=False),
                                     per_byte_s=num(cv, cvp, "per_byte_s", positive=False),
                                     source=_source(doc, cv, cvp)),
    }


def _sparsity(doc: _Doc, d: Mapping[str, Any]) -> dict[str, SparsityPattern]:
    sparsity: dict[str, SparsityPattern] = {}
    if "sparsity" not in d:
        return sparsity
    sp = _get(doc, d, (), "sparsity", "mapping")
    _keys(doc, sp, ("sparsity",), {"patterns", "source"})
    src = _source(doc, sp, ("sparsity",))
    for pname, spec in _get(doc, sp, ("sparsity",), "patterns", "mapping").items():
        p = ("sparsity", "patterns", str(pname))
        if not isinstance(spec, dict):
            raise doc.error(p, "must be a mapping", "write {speedup: ..., metadata_bits: ...}")
        _keys(doc, spec, p, {"speedup", "metadata_bits"})
        sparsity[str(pname)] = SparsityPattern(
            name=str(pname), source=src,
            speedup=_number(doc, _get(doc, spec, p, "speedup", "number"), (*p, "speedup")),
            metadata_bits=_number(doc, _get(doc, spec, p, "metadata_bits", "number"),
                                  (*p, "metadata_bits"), positive=False))
    return sparsity


def _rules(doc: _Doc, d: Mapping[str, Any], weights, acts
           ) -> tuple[frozenset[str], dict[str, Candidate]]:
    """``rules``: (the op types whose ports are tied, layer -> pinned candidate)."""
    if "rules" not in d:
        return frozenset(), {}
    r = _get(doc, d, (), "rules", "mapping")
    _keys(doc, r, ("rules",), {"tie", "pin"})
    ties = _get(doc, r, ("rules",), "tie", "list", required=False, default=[])
    pins = {str(node): _candidate(doc, cand, ("rules", "pin", str(node)), weights, acts)
            for node, cand in (_get(doc, r, ("rules",), "pin", "mapping", required=False,
                                    default={}) or {}).items()}
    return frozenset(str(t) for t in ties), pins


def _latency_table(doc: _Doc, t: Mapping[str, Any], weights, acts) -> LatencyTable:
    p = ("latency_table",)
    _keys(doc, t, p, {"model_sha256", "model", "layers", "other_s", "conversion_s_per_byte",
                      "source"})
    layers = {}
    for lname, entries in _get(doc, t, p, "layers", "mapping").items():
        layers[str(lname)] = _pair_map(doc, entries, (*p, "layers", str(lname)), weights, acts)
    other = {}
    for fname, v in _get(doc, t, p, "other_s", "mapping").items():
        try:
            f = Format.from_name(str(fname))
        except MpsearchError as e:
            raise doc.error((*p, "other_s", str(fname)), f"'{fname}' is not a number format",
                            e.fix or "") from e
        other[f] = _number(doc, v, (*p, "other_s", str(fname)), positive=False)
    return LatencyTable(
        model_sha256=_get(doc, t, p, "model_sha256", "str"), layers=layers, other_s=other,
        conversion_s_per_byte=_number(doc, _get(doc, t, p, "conversion_s_per_byte", "number"),
                                      (*p, "conversion_s_per_byte"), positive=False),
        source=_source(doc, t, p))


def load_profile(path: str | os.PathLike[str]) -> HardwareProfile:
    """Read and validate a profile file."""
    p = Path(path)
    if not p.is_file():
        what = "does not exist" if not p.exists() else "is not a file"
        raise ProfileError(f"hardware profile {p} {what}",
                           fix="pass a YAML file such as hw_profiles/snapdragon_8gen3.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"hardware profile {p} cannot be read ({e})",
                           fix="check the file") from e
    return parse_profile(text, where=str(p), path=p)
