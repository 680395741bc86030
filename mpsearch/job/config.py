"""The settings of a search, typed and validated once: :class:`SearchConfig`, and
:class:`RunConfig` for a whole ``mpsearch run`` (the inputs, the search, the verification).

Every option a run takes lives here, with its default, in frozen keyword-only dataclasses
grouped as they belong together (candidates, refinement, measurement, cache); the command line
builds the same objects from its flags (:mod:`mpsearch.cli.args`), Python code builds them
directly, and a run writes the one it used into its output folder as ``config.yaml``, which
``mpsearch run --config`` reads back (flags given beside it override it). Validation is
pydantic's (v2) over the dataclasses' annotations: types coerced from YAML, unknown keys
refused, every problem reported with its key path (``search.refinement.rounds``) or, from the
command line, its flag (``--refine``), in the :class:`~mpsearch.core.errors.UsageError` family.
Budgets and candidates are parsed by their own parsers (:func:`mpsearch.solve.budget.parse_budget`,
:func:`mpsearch.core.formats.parse_candidate`) and written back as the user writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import Candidate, Format, parse_candidate
from mpsearch.core.frozen import freeze
from mpsearch.data.images import Preprocess, parse_preprocess
from mpsearch.job.polish import EVALUATIONS
from mpsearch.job.refinement import EXPLORE
from mpsearch.job.selection import CHECK_FRACTION
from mpsearch.job.target import Target, parse_target
from mpsearch.quant.analysis import QuantizeOptions
from mpsearch.quant.gating import GateSearch
from mpsearch.sensitivity.run import Method
from mpsearch.sensitivity.table import SparsityChoice
from mpsearch.solve.budget import Budget, parse_budget

__all__ = ["CONFIG_SCHEMA", "CacheConfig", "CandidateConfig", "MeasureConfig",
           "RefinementConfig", "RunConfig", "SearchConfig", "VerifyConfig", "load_run_config",
           "parse", "to_yaml"]

CONFIG_SCHEMA = "mpsearch.run/1"
_STRICT = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

T = TypeVar("T")


# --------------------------------------------------------------------------- field types


def _budget(v: Any) -> Budget:
    return v if isinstance(v, Budget) else parse_budget(str(v))


def _target(v: Any) -> Target:
    return v if isinstance(v, Target) else parse_target(str(v))


def _preprocess(v: Any) -> Preprocess:
    return parse_preprocess(v)


def _candidate(v: Any) -> Candidate:
    return v if isinstance(v, Candidate) else parse_candidate(str(v))


def _shape(v: Any) -> tuple[int, ...]:
    if isinstance(v, str):  # "1,3,224,224", as on the command line
        try:
            v = [int(d) for d in v.split(",")]
        except ValueError:
            raise ValueError(f"'{v}' is not a list of integers") from None
    dims = tuple(v)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
        raise ValueError(f"{list(dims)} is not a shape of positive integers")
    return dims


BudgetField = Annotated[Budget, BeforeValidator(_budget),
                        PlainSerializer(lambda b: f"{b.key}={b.value!r}", return_type=str)]
TargetField = Annotated[Target, BeforeValidator(_target),
                        PlainSerializer(str, return_type=str)]
PreprocessField = Annotated[Preprocess, BeforeValidator(_preprocess),
                            PlainSerializer(str, return_type=str)]
CandidateField = Annotated[Candidate, BeforeValidator(_candidate),
                           PlainSerializer(lambda c: c.name, return_type=str)]
Pins = Annotated[Mapping[str, CandidateField], AfterValidator(freeze)]
Shapes = Annotated[Mapping[str, Annotated[tuple[int, ...], BeforeValidator(_shape)]],
                   AfterValidator(freeze)]
PathText = Annotated[str, BeforeValidator(os.fspath)]  # a path as the user wrote it


def _format(v: Any) -> Format:
    return v if isinstance(v, Format) else Format.from_name(str(v))


def _formats(v: Any) -> Any:
    return v.split(",") if isinstance(v, str) else v  # "uint16,int16", as on a command line


FormatField = Annotated[Format, BeforeValidator(_format),
                        PlainSerializer(lambda f: f.value.name, return_type=str)]
Avoid = Annotated[Mapping[str, Annotated[tuple[FormatField, ...], BeforeValidator(_formats)]],
                  AfterValidator(freeze)]


def _axis(v: Any) -> int | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "once")):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"'{v}' is not an axis")
    try:
        axis = int(v)
    except ValueError:
        raise ValueError(f"'{v}' is not an axis (an integer, or none)") from None
    if axis < 0:
        raise ValueError(f"axis {axis} is negative")
    return axis


SampleAxes = Annotated[Mapping[str, Annotated[int | None, BeforeValidator(_axis)]],
                       AfterValidator(freeze)]
Count = Annotated[int, Field(ge=0, strict=True)]
Positive = Annotated[int, Field(ge=1, strict=True)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


# --------------------------------------------------------------------------- the configs


def _config(cls: type[T]) -> type[T]:
    """A frozen, keyword-only dataclass validated by pydantic, whose problems raise a
    :class:`UsageError` naming the field, built directly or read from a mapping."""
    cls = pydantic_dataclass(frozen=True, kw_only=True, config=_STRICT)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            raise _usage_error(e, cls, origin=cls.__name__, names=None) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@_config
class CandidateConfig:
    """Which candidates each group may take, beyond what the profile allows its op."""

    only: tuple[CandidateField, ...] | None = None  # a subset of the profile's; None: all
    sparsity: SparsityChoice = SparsityChoice.NONE  # the profile's pruned candidates offered
    gating: GateSearch | None = None  # Bayesian-Bits gate sweeps as extra candidates
    pin: Pins = Field(default_factory=dict)  # layer -> the candidate it must take
    keep_float: tuple[str, ...] = ()  # layers left in float
    # layer -> activation formats it must not take: the device computed them wrongly there (a
    # run that re-planned around a verification culprit writes this, so --config repeats it)
    avoid: Avoid = Field(default_factory=dict)


@_config
class RefinementConfig:
    """What the search measures between and after solves (:mod:`mpsearch.job.refinement`,
    :mod:`mpsearch.job.selection`, :mod:`mpsearch.job.polish`)."""

    rounds: Count = 3  # measure the pairs the plan departs on, solve again
    explore: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = EXPLORE
    select: bool = True  # ship the best measured plan of a shortlist, not the ILP's as it is
    polish: Count = EVALUATIONS  # neighbouring plans measured after the shortlist
    # the fraction of the calibration data held out of ranges, rounding and sensitivities to
    # choose between measured plans on (the check part; 0: choose on the fitted samples)
    check: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = CHECK_FRACTION


@_config
class MeasureConfig:
    """Which plans are exported and run against FP32 on the evaluation data."""

    enabled: bool = True
    front_points: Count = 2  # front points besides the plan, those nearest the budget
    all_uniform: bool = False  # every uniform plan that fits, not only the best predicted


@_config
class CacheConfig:
    """The sensitivity cache (:mod:`mpsearch.sensitivity.cache`)."""

    enabled: bool = True
    dir: PathText | None = None  # None: $XDG_CACHE_HOME/mpsearch, else ~/.cache/mpsearch


@_config
class SearchConfig:
    """Everything :func:`mpsearch.job.search.search` takes besides the model, the profile and
    the data. Only ``budgets`` (or a ``target``) has no default."""

    budgets: tuple[BudgetField, ...] = ()  # all hold; the 1st: the axis of the front
    # the cheapest plan on the axis whose check-part quality meets it (mpsearch.job.target);
    # the budgets, if any, then cap the search
    target: TargetField | None = None
    method: Method = Method.HESSIAN  # how sensitivities are found
    candidates: CandidateConfig = Field(default_factory=CandidateConfig)
    # error charged per format conversion, x the all-w8a8 plan's predicted error
    convert_penalty: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    refinement: RefinementConfig = Field(default_factory=RefinementConfig)
    measurement: MeasureConfig = Field(default_factory=MeasureConfig)
    quantize: QuantizeOptions = Field(default_factory=QuantizeOptions)
    # replace each If whose condition is the same on every calibration sample by the branch
    # taken (mpsearch.graph.control): the shipped model computes only that branch
    specialize_if: bool = False
    seed: int = 0  # seeds everything random: same inputs and seed, same bytes
    workers: Positive = 1  # processes for measured sensitivities
    cache: CacheConfig = Field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if not self.budgets and self.target is None:
            raise UsageError("a search needs a budget or a target",
                             fix="pass --budget (e.g. bops=0.9) or --target (e.g. sqnr=25)")
        seen: dict[str, Budget] = {}
        for b in self.budgets:
            if b.metric in seen:
                raise UsageError(f"budgets {seen[b.metric]} and {b} both limit {b.metric}",
                                 fix="give one budget per quantity")
            seen[b.metric] = b


@_config
class VerifyConfig:
    """Compiling the shipped model on the device (Qualcomm profiles) and comparing it with the
    CPU EP (:mod:`mpsearch.device.verify`)."""

    enabled: bool = True
    samples: Positive = 4  # emulation is slow: about 0.6 s a sample on EfficientNet-Lite0
    # every output of the device must agree with the CPU EP at least this (None: the profile's
    # target.verify_min_sqnr_db, else 25 dB)
    min_sqnr_db: Finite | None = None
    input_shapes: Shapes = Field(default_factory=dict)  # input -> static shape for the device
    # when the device disagrees, how many times to re-plan with the culprit's layers in
    # another activation format and verify again (search.candidates.avoid)
    replans: Count = 2


@_config
class RunConfig:
    """One ``mpsearch run``: its inputs and output folder, the search, the verification."""

    model: PathText
    hw: PathText  # the hardware profile
    data: PathText | None = None  # calibration data (None: data-free, mpsearch.data.synthetic)
    eval_data: PathText | None = None  # where plans are measured (None: the calibration data)
    # input -> the model axis its samples go to, or None: given once (inferred where not named)
    sample_axes: SampleAxes = Field(default_factory=dict)
    # how a folder of images becomes samples (mpsearch.data.images); None: pixels / 255
    preprocess: PreprocessField | None = None
    out: PathText
    search: SearchConfig
    verification: VerifyConfig = Field(default_factory=VerifyConfig)


# --------------------------------------------------------------------------- reading


def _value_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


def _keys_at(kind: type, loc: tuple[str, ...]) -> list[str]:
    """The keys a config class takes at ``loc`` (empty where ``loc`` is no config)."""
    for key in loc:
        fields = {f.name: f for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) \
            else {}
        if key not in fields:
            return []
        kind = typing.get_type_hints(kind)[key]
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []


def _problem(err: Mapping[str, Any], name: str, keys: list[str]) -> tuple[str, str]:
    """A pydantic error as (problem, fix), in the project's words."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    shown = f"{name} {_value_text(value)}" if kind != "missing" else name
    if kind == "greater_than_equal":
        bound = ctx.get("ge")
        if bound == 0:
            return f"{shown} is negative", "pass 0 or more"
        return f"{shown} is below {bound:g}", f"pass {bound:g} or more"
    if kind == "greater_than":
        return f"{shown} is not above {ctx.get('gt'):g}", f"pass more than {ctx.get('gt'):g}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{shown} is not an integer", "pass a whole number"
    if kind in ("float_type", "float_parsing"):
        return f"{shown} is not a number", "pass a number"
    if kind == "finite_number":
        return f"{shown} is not a finite number", "pass a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return f"{shown} is not true or false", "write true or false"
    if kind == "enum":
        return f"{shown} is not a known choice", f"use one of {ctx.get('expected', '')}"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = ", ".join(keys) if keys else "see docs/config.md"
        return f"{name} is not a known key", f"use one of: {known}"
    if kind == "missing":
        return f"{name} is missing", f"give {name}"
    if kind == "too_short":
        return f"{name} is empty", f"give at least {ctx.get('min_length', 1)}"
    return f"{shown}: {err['msg']}", "see docs/config.md"


def parse(kind: type[T], data: Mapping[str, Any], *, origin: str = "",
          names: Callable[[tuple[str, ...]], str] | None = None) -> T:
    """``kind`` (a config class) from a mapping, validated; a problem raises a
    :class:`UsageError` naming where it is (``origin``: the file, e.g. ``run.yaml``; ``names``:
    a key path -> how the user spells it, e.g. ``--refine``)."""
    try:
        return TypeAdapter(kind).validate_python(dict(data))
    except ValidationError as e:
        raise _usage_error(e, kind, origin=origin, names=names) from None


def _usage_error(e: ValidationError, kind: type, *, origin: str,
                 names: Callable[[tuple[str, ...]], str] | None) -> UsageError:
    err = e.errors(include_url=False)[0]
    loc = tuple(str(p) for p in err["loc"])
    name = names(loc) if names else ".".join(loc)
    problem, fix = _problem(err, name, _keys_at(kind, loc[:-1]))
    return UsageError(f"{origin}: {problem}" if origin else problem, fix=fix)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data (strings, numbers, lists, mappings), as ``config.yaml`` holds it."""
    return TypeAdapter(type(config)).dump_python(config, mode="json")


def to_yaml(config: RunConfig, *, relative_to: str | os.PathLike[str] | None = None) -> str:
    """``config.yaml``: the run's config, its paths relative to ``relative_to`` (the folder the
    file goes to) so that the folder can move, and nothing machine-dependent."""
    doc = to_dict(config)
    if relative_to is not None:
        base = Path(relative_to).resolve()
        for key in ("model", "hw", "data", "eval_data", "out"):
            if doc.get(key) is not None:
                doc[key] = os.path.relpath(Path(doc[key]).resolve(), base)
    text = yaml.safe_dump({"schema": CONFIG_SCHEMA, **doc}, sort_keys=False,
                          default_flow_style=False, allow_unicode=True)
    return ("# mpsearch run configuration: `mpsearch run --config config.yaml` runs it again\n"
            "# (paths are relative to this file; flags given beside --config override it)\n"
            + text)


def load_run_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a run config file holds, its paths made relative to the working directory
    (they are written relative to the file), not yet validated (the command line merges its
    flags into it first)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read --config {p} ({e.strerror})",
                         fix="pass an existing YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', None) or e})",
                         fix="fix the YAML syntax") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{p}: a run config is a mapping of keys", fix="see docs/config.md")
    schema = doc.pop("schema", CONFIG_SCHEMA)
    if schema != CONFIG_SCHEMA:
        raise UsageError(f"{p}: schema {schema!r}; this mpsearch reads {CONFIG_SCHEMA}",
                         fix="update the file or mpsearch")
    for key in ("model", "hw", "data", "eval_data", "out"):
        if isinstance(doc.get(key), str):
            doc[key] = os.path.normpath(p.parent / doc[key])
    return doc
