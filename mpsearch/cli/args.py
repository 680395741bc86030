"""Arguments the sub-commands share: the common flags, argument types (input shapes, pins), and
the options of ``run`` and ``pareto``, each tied to the key of
:class:`~mpsearch.job.config.RunConfig` it sets.

The search options are one table (:data:`SEARCH_OPTIONS`): a flag, its config key, and its help,
whose default is read from the config class, so ``--help``, ``docs/config.md``, the README
(generated from these parsers) and the library cannot disagree. Every option defaults to
"not given": only the flags a user types override the config (``--config run.yaml``, else the
classes' defaults), and a bad value is reported under the flag's name.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpsearch.core.errors import UsageError
from mpsearch.job.config import (
    MeasureConfig,
    RefinementConfig,
    RunConfig,
    SearchConfig,
    VerifyConfig,
    load_run_config,
    parse,
)
from mpsearch.job.polish import EVALUATIONS
from mpsearch.job.selection import MIN_CHECK
from mpsearch.quant.analysis import QuantizeOptions

__all__ = ["DATA_HELP", "SEARCH_OPTIONS", "add_options", "common_parser", "parse_pins",
           "parse_sample_axes", "parse_shapes", "run_config", "search_config"]

DATA_HELP = (".npz (keys = input names, axis 0 = samples), a folder of .npz/.npy, or a folder "
             "of images for a one-image-input model (run: see --preprocess; elsewhere pixels "
             "/ 255)")


def common_parser() -> argparse.ArgumentParser:
    """The flags every sub-command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print a JSON document on stdout instead of tables (on an "
                             "error: {\"error\": {type, problem, fix, exit}})")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    common.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    common.add_argument("--debug", action="store_true",
                        help="show tracebacks for errors (and debug logging)")
    return common


def parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]] | None:
    """``NAME=D,D,...`` flags -> input name -> shape (None when none were given)."""
    if not items:
        return None
    out = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            out[name] = tuple(int(d) for d in dims.split(","))
        except ValueError as e:
            raise UsageError(f"cannot read --input-shape '{item}'",
                             fix="write NAME=1,3,224,224") from e
        if not name or any(d <= 0 for d in out[name]):
            raise UsageError(f"cannot read --input-shape '{item}'",
                             fix="write NAME=1,3,224,224 with positive dims")
    return out


def _name_value(items: Sequence[str], flag: str, example: str) -> dict[str, str]:
    """``NAME=VALUE`` flags -> name -> value text (checked when the config is built)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{flag} {item} is not NAME=VALUE", fix=f"write e.g. {example}")
        out[name] = value
    return out


def parse_sample_axes(items: Sequence[str]) -> dict[str, str]:
    """``NAME=K`` / ``NAME=none`` flags -> input -> axis text."""
    return _name_value(items, "--sample-axis", "--sample-axis state=1, or state=none")


def parse_pins(items: Sequence[str]) -> dict[str, str]:
    """``NODE=CANDIDATE`` flags -> node -> candidate name."""
    return _name_value(items, "--pin", "--pin node_Conv_0=w8a16")


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _comma_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


@dataclass(frozen=True)
class Option:
    """One flag of ``run``/``pareto``: the config key it sets (a path into
    :class:`RunConfig`), its argparse settings, and how its value becomes the config's."""

    flags: tuple[str, ...]
    key: tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    value: Callable[[Any], Any] = lambda v: v
    commands: frozenset[str] = frozenset({"run", "pareto"})

    @property
    def dest(self) -> str:
        return self.flags[-1].lstrip("-").replace("-", "_")


SEARCH_OPTIONS: tuple[Option, ...] = (
    Option(("--budget",), ("search", "budgets"), commands=frozenset({"run"}), kwargs=dict(
        action="append", metavar="KEY=VALUE",
        help="a hard limit, repeatable (all hold at once; the first is the front's axis): "
             "latency=0.7 (x the all-w8a8 plan on this device), latency_ms=1.2, bops=0.9 "
             "(bit-operations x w8a8), size=0.6 (weight bytes x w8a8), size_mb=4 (10^6 "
             "bytes), energy=0.8 (x w8a8), energy_mj=0.5. An impossible budget exits 2 and "
             "names, per budget, the smallest value any plan reaches. Without --budget and "
             "--target: --target sqnr_drop=0.5, the cheapest plan within 0.5 dB of uniform "
             "w8a8 on the check part")),
    Option(("--target",), ("search", "target"), commands=frozenset({"run"}), kwargs=dict(
        metavar="KEY=VALUE",
        help="a quality to meet instead of a cost to stay within: ship the cheapest plan (in "
             "the first --budget's quantity, which then caps it; else bit-operations) whose "
             "quality on the check part meets it, found by bisection over the cost limit "
             "(about 6 searches): sqnr=25 (output SQNR against FP32, dB), sqnr_drop=0.5 (dB "
             "below uniform w8a8's SQNR on the same samples), top1_drop=1%% "
             "(top-1 disagreement with FP32), accuracy_drop=0.5%% (with labels in --data). "
             "A target no plan meets exits 2 naming the best quality reached and the "
             "closest uniform plan")),
    Option(("--sample-axis",), ("sample_axes",), value=lambda items: parse_sample_axes(items),
           commands=frozenset({"run"}), kwargs=dict(
               action="append", metavar="NAME=K",
               help="the model axis an input's samples go to (its stored arrays keep them on "
                    "axis 0), e.g. a sequence-first LSTM input x=1; NAME=none for an input "
                    "given once, the same for every sample (repeatable; default: axis 0, or "
                    "the first dynamic axis where axis 0 is static; a fully static input whose "
                    "array has exactly its shape, and a scalar, are given once)")),
    Option(("--preprocess",), ("preprocess",), commands=frozenset({"run"}), kwargs=dict(
        metavar="SPEC",
        help="how a folder of images (.jpg/.png) or recordings (.wav) as --data or "
             "--eval-data becomes samples: images 'resize=256;mean=127;std=128;channels=rgb' "
             "(shorter side resized, centre crop to the input's height and width, (pixel - "
             "mean) / std per channel, the input's layout and dtype; default mean=0;std=255, "
             "pixels in [0, 1]); recordings 'rate=16000;window=16000;hop=8000;scale=32768' "
             "(mono, resampled, windows of the input's length, x scale; default the file's "
             "rate, no overlap, samples in [-1, 1]); limit=N takes the first N files")),
    Option(("--eval-data",), ("eval_data",), kwargs=dict(
        metavar="EVAL", help="data from other sources than --data (other photos, speakers, "
                             "texts), same layout, held out of everything: the shipped plan's "
                             "headline figure (default: none, the figures are on --data's "
                             "check and fitted parts, with a warning)")),
    Option(("--method",), ("search", "method"), kwargs=dict(
        choices=["hessian", "measured"],
        help="sensitivities: hessian (default; predicted from the layer Hessians "
             "H = 2 E[x x^T], seconds) or measured (every group and candidate run for real, "
             "minutes)")),
    Option(("--candidates",), ("search", "candidates", "only"), value=_comma_list, kwargs=dict(
        metavar="LIST", help="only these candidates, comma-separated (e.g. w8a8,w4a8,w8a16; "
                             "default: all the profile allows per op)")),
    Option(("--sparsity",), ("search", "candidates", "sparsity"), kwargs=dict(
        choices=["none", "2:4", "unstructured", "channel", "all"],
        help="also offer the profile's pruned candidates of this pattern (OBS/SparseGPT with "
             "the layer Hessian, survivors quantized in the same pass; layers that cannot "
             "take a pattern, e.g. 2:4 on a depthwise conv, are left out with the reason). "
             "channel drops whole output channels (lowest Hessian energy) where only dense "
             "consumers read them (no residual Add, Concat or graph output on the way), "
             "exported physically smaller. Default none: at equal compression quantization "
             "usually wins (Kuzmin et al. 2023), sparsity pays only where the profile gives "
             "it a speed-up (H100 2:4) or memory is the budget, and sparse candidates cost "
             "sensitivity time")),
    Option(("--gating",), ("search", "candidates", "gating"), kwargs=dict(
        nargs="?", const="gates", choices=["gates", "exact"], metavar="gates|exact",
        help="also offer, per layer whose output channels can be pruned (and whose op the "
             "profile pairs with +channel), the (weight bit-width, channels kept) "
             "configurations of a lambda sweep over the layer objective on the calibration "
             "Hessian: gates (bare --gating) trains Bayesian-Bits hard-concrete gates, exact "
             "takes the exact minimiser of the same objective (faster, never worse on it). "
             "Each becomes a wXaY+channel@d candidate, scored and solved like the others. "
             "Off by default: it pays only where pruning channels pays on the device and "
             "budget")),
    Option(("--pin",), ("search", "candidates", "pin"), value=parse_pins, kwargs=dict(
        action="append", metavar="NODE=CANDIDATE",
        help="force a layer to a candidate, e.g. --pin node_Conv_0=w8a16 (repeatable; a tied "
             "partner must be able to share its activation format)")),
    Option(("--keep-float",), ("search", "candidates", "keep_float"), kwargs=dict(
        action="append", metavar="NODE",
        help="leave a layer in float (repeatable; the profile must cost float)")),
    Option(("--convert-penalty",), ("search", "convert_penalty"), kwargs=dict(
        type=float, metavar="X",
        help="charge each format conversion between adjacent layers X times the all-w8a8 "
             "plan's predicted error (default "
             f"{_default(SearchConfig, 'convert_penalty'):g}: conversions cost only their "
             "latency)")),
    Option(("--refine",), ("search", "refinement", "rounds"), kwargs=dict(
        type=int, metavar="N",
        help="rounds of verification: the pairs the plan departs from w8a8 on are measured "
             "for real (at their candidate and at w8a8), the other predictions rescaled per "
             "candidate by the median measured/predicted ratio, and the problem solved again "
             f"(default {_default(RefinementConfig, 'rounds')}; 0 trusts the predictions)")),
    Option(("--explore",), ("search", "refinement", "explore"), kwargs=dict(
        type=float, metavar="X",
        help="each refinement round also measures where the plan would depart if every "
             "unmeasured alternative were X times less harmful than predicted (default "
             f"{_default(RefinementConfig, 'explore'):g}): a prediction that is too "
             "pessimistic is otherwise never measured, since its pair is never chosen; 1 "
             "measures only the plan's own departures")),
    Option(("--no-select",), ("search", "refinement", "select"), value=lambda v: not v,
           commands=frozenset({"run"}), kwargs=dict(
               action="store_true",
               help="ship the ILP's plan as it is, instead of the best measured (on the "
                    "check part of --data) of a shortlist of plans that fit: the ILP's plan "
                    "of every refinement round, greedy's, the best uniform ones")),
    Option(("--check",), ("search", "refinement", "check"), commands=frozenset({"run"}),
           kwargs=dict(
               type=float, metavar="F",
               help="hold the fraction F of --data out of calibration (ranges, rounding, "
                    "sensitivities) and choose between measured plans on it: a seeded split "
                    f"by sample (--seed), at least {MIN_CHECK} samples, else no split, with a "
                    "warning (default "
                    f"{_default(RefinementConfig, 'check'):g}; 0: choose on the fitted "
                    "samples, which flatters every plan chosen on them). Split your data by "
                    "source yourself (other photos, other speakers) when it holds several "
                    "crops of one")),
    Option(("--polish",), ("search", "refinement", "polish"), commands=frozenset({"run"}),
           kwargs=dict(
               type=int, metavar="N",
               help="after the shortlist, measure at most N neighbouring plans that fit on "
                    "the check part of --data (one layer raised, or a producer and its consumer "
                    "raised together, paid for by the least harmful lowerings), the raises of "
                    "largest predicted gain first, and keep each that measures better by a "
                    f"paired test (default {EVALUATIONS}, 0.4-1.2 s each on "
                    "EfficientNet-Lite0; 0: none)")),
    Option(("--front-points",), ("search", "measurement", "front_points"), kwargs=dict(
        type=int, metavar="N",
        help="front points exported and measured besides the plan, those nearest the budget "
             f"(default {_default(MeasureConfig, 'front_points')}; pareto: 6, spread along "
             "the front)")),
    Option(("--no-measure",), ("search", "measurement", "enabled"), value=lambda v: not v,
           commands=frozenset({"run"}), kwargs=dict(
               action="store_true", help="export without running any evaluation")),
    Option(("--no-verify",), ("verification", "enabled"), value=lambda v: not v,
           commands=frozenset({"run"}), kwargs=dict(
               action="store_true",
               help="on a Qualcomm profile (target.runtime: qnn-htp), skip compiling the plan "
                    "on QNN's HTP backend. By default run compiles it (emulated, CPU fallback "
                    "disabled), runs --verify-samples samples of the evaluation data against "
                    "the CPU EP and writes verify.json; a plan the compiler refuses is still "
                    "written, with the compiler's reasons in the report and on stderr, and "
                    "run exits 1")),
    Option(("--verify-samples",), ("verification", "samples"), commands=frozenset({"run"}),
           kwargs=dict(
               type=int, metavar="N",
               help="samples of the evaluation data run on the emulated HTP (default "
                    f"{_default(VerifyConfig, 'samples')}; emulation is slow: about 0.6 s a "
                    "sample on EfficientNet-Lite0, after a 4 s compile)")),
    Option(("--verify-min-db",), ("verification", "min_sqnr_db"), commands=frozenset({"run"}),
           kwargs=dict(
               type=float, metavar="DB",
               help="the plan counts as verified only where every node is on the HTP and every "
                    "output agrees with the CPU EP at DB or better (default: the profile's "
                    "target.verify_min_sqnr_db, else 25); below it run exits 3")),
    Option(("--replans",), ("verification", "replans"), commands=frozenset({"run"}),
           kwargs=dict(
               type=int, metavar="N",
               help="when the HTP disagrees with the CPU EP, find the first tensor it computes "
                    "differently, take that activation format off the layers that set it, "
                    "search again and verify again, at most N times (default "
                    f"{_default(VerifyConfig, 'replans')}; 0: report the disagreement only)")),
    Option(("--input-shape",), ("verification", "input_shapes"), value=parse_shapes,
           commands=frozenset({"run"}), kwargs=dict(
               action="append", metavar="NAME=D,D,...",
               help="static input shape for the device compiler, e.g. input=1,3,224,224 "
                    "(repeatable; default: dynamic dimensions fixed to batch 1 and the "
                    "data's sizes; the report says which)")),
    Option(("--specialize-if",), ("search", "specialize_if"), kwargs=dict(
        action="store_true",
        help="replace each If node whose condition is the same on every calibration sample "
             "(a sample rate given once, say) by the branch taken, so that layers inside it "
             "are planned and the HTP can run it; the shipped model then computes only that "
             "branch (plan.json 'specialized', the report and stderr say which). Evaluation "
             "data that would take the other branch exit 2")),
    Option(("--seed",), ("search", "seed"), kwargs=dict(
        type=int, metavar="N",
        help="seeds everything random; same inputs and seed give byte-identical outputs "
             f"(default {_default(SearchConfig, 'seed')})")),
    Option(("--workers",), ("search", "workers"), kwargs=dict(
        type=int, metavar="N",
        help="processes for measured sensitivities, each with cores/N ONNX Runtime threads "
             f"(default {_default(SearchConfig, 'workers')})")),
    Option(("--cache-dir",), ("search", "cache", "dir"), kwargs=dict(
        metavar="DIR",
        help="sensitivity cache (default $XDG_CACHE_HOME/mpsearch, else ~/.cache/mpsearch), "
             "keyed by a hash of model, data and settings")),
    Option(("--no-cache",), ("search", "cache", "enabled"), value=lambda v: not v, kwargs=dict(
        action="store_true", help="neither read nor write the sensitivity cache")),
    Option(("--batch-size",), ("search", "quantize", "batch_size"), kwargs=dict(
        type=int, metavar="N",
        help="samples per ONNX Runtime call in calibration and measurement (default "
             f"{_default(QuantizeOptions, 'batch_size')})")),
)
_FLAG = {o.key: o.flags[-1] for o in SEARCH_OPTIONS}


def add_options(s: argparse.ArgumentParser, command: str) -> None:
    """The inputs and the search options of ``command`` (``run`` or ``pareto``), each
    defaulting to "not given"."""
    run = command == "run"
    s.add_argument("model", nargs="?" if run else None,
                   help="FP32 ONNX model file (not modified)"
                        + ("; may come from --config instead" if run else ""))
    s.add_argument("--hw", metavar="PROFILE",
                   help="hardware profile YAML: legal formats per op and the cost model"
                        + (" (required unless --config names it)" if run else ""),
                   required=not run)
    s.add_argument("--data", metavar="CALIB", required=not run,
                   help=f"calibration data: {DATA_HELP}"
                        + ("; default: calib.npz or calib/ beside the model (and eval.npz or "
                           "eval/ beside it as --eval-data), else a data-free run on random "
                           "inputs of the declared shapes, with a warning" if run else ""))
    s.add_argument("--out", metavar="DIR", required=not run,
                   help="output folder" + ("; default: MODEL_STEM.mpsearch/ in the working "
                                           "directory (never a folder mpsearch did not write)"
                                           if run else ""))
    if run:
        s.add_argument("--config", metavar="RUN_YAML",
                       help="read every setting (inputs included) from a run config, e.g. the "
                            "config.yaml a run writes into its folder; flags given beside it "
                            "override it (docs/config.md)")
    for o in SEARCH_OPTIONS:
        if command in o.commands:
            s.add_argument(*o.flags, dest=o.dest, default=None, **o.kwargs)


def _given(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options the user typed, as a nested mapping of config keys."""
    out: dict[str, Any] = {}
    for o in SEARCH_OPTIONS:
        v = getattr(args, o.dest, None) if command in o.commands else None
        if v is None:
            continue
        node = out
        for k in o.key[:-1]:
            node = node.setdefault(k, {})
        node[o.key[-1]] = o.value(v)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def _flag_name(loc: tuple[str, ...]) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in _FLAG:
            return _FLAG[loc[:n]]
    return ".".join(loc)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's config: ``--config``'s file, else the defaults, with the flags given on top;
    validated once, here."""
    base: dict[str, Any] = {}
    origin = ""
    if getattr(args, "config", None):
        base, origin = load_run_config(args.config), str(args.config)
        parse(RunConfig, base, origin=origin)  # the file alone must hold
    given = _given(args, "run")
    for key in ("model", "hw", "data", "out"):
        if getattr(args, key, None) is not None:
            given[key] = getattr(args, key)
    missing = [k for k in ("model", "hw") if k not in given and k not in base]
    if missing:
        flags = ", ".join("MODEL" if k == "model" else f"--{k}" for k in missing)
        raise UsageError(f"mpsearch run needs {flags}", fix="give them, or --config RUN_YAML")
    merged = _merge(base, given)
    merged.setdefault("search", {})
    _run_defaults(merged)
    return parse(RunConfig, merged, names=lambda loc: _flag_name(loc) if
                 _in(given, loc) or not origin else f"{origin}: {'.'.join(loc)}")


DEFAULT_TARGET = "sqnr_drop=0.5"  # a run without --budget or --target ships this


def _run_defaults(merged: dict[str, Any]) -> None:
    """What ``mpsearch run MODEL --hw PROFILE`` fills in (README, "the shortest form"):
    ``--out`` is ``<model stem>.mpsearch/`` in the working directory, never a folder mpsearch
    did not write; ``--data`` is ``calib.npz`` or ``calib/`` beside the model (and then
    ``--eval-data`` ``eval.npz`` or ``eval/`` beside it), else none (a data-free run,
    :mod:`mpsearch.data.synthetic`); without ``--budget`` or ``--target`` the
    target is :data:`DEFAULT_TARGET`, the cheapest plan within 0.5 dB of uniform w8a8."""
    from pathlib import Path

    model = Path(str(merged["model"]))
    if "out" not in merged:
        out = Path.cwd() / f"{model.stem}.mpsearch"
        if out.is_dir() and any(out.iterdir()) and not (out / "plan.json").is_file():
            raise UsageError(f"the default output folder {out} exists and was not written by "
                             "mpsearch", fix="pass --out DIR")
        merged["out"] = str(out)
    if "data" not in merged:
        beside = next((p for p in (model.with_name("calib.npz"), model.with_name("calib"))
                       if p.exists()), None)
        merged["data"] = None if beside is None else str(beside)
        if beside is not None and "eval_data" not in merged:
            held = next((p for p in (model.with_name("eval.npz"), model.with_name("eval"))
                         if p.exists()), None)
            if held is not None:
                merged["eval_data"] = str(held)
    search = merged["search"]
    if not search.get("budgets") and not search.get("target"):
        search["target"] = DEFAULT_TARGET


def _in(tree: Mapping[str, Any], loc: tuple[str, ...]) -> bool:
    node: Any = tree
    for k in loc:
        if not isinstance(node, Mapping) or k not in node:
            return False
        node = node[k]
    return True


def search_config(args: argparse.Namespace, command: str, *,
                  fixed: Mapping[str, Any]) -> SearchConfig:
    """The search config of ``command`` from its flags, ``fixed`` holding what the command
    itself decides (``pareto``: its budget, no selection or polish)."""
    given = _given(args, command).get("search", {})
    return parse(SearchConfig, _merge(dict(fixed), given), names=lambda loc: _flag_name(
        ("search", *loc)))

