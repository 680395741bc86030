"""Command line: parses arguments, calls the library, prints. Errors from the MpsearchError
family exit with code 2 and one line on stderr (a traceback only with --debug); Ctrl-C exits
with 130; an InternalError (a check of mpsearch's own output failed) exits 1 with one line
saying it is a bug; any other exception is a bug too (code 1, with its traceback)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from mpsearch.cli import eval as eval_cmd
from mpsearch.cli import hw, inspect, pareto, quantize, report, run, sensitivity, verify
from mpsearch.cli.args import common_parser
from mpsearch.cli.ui import Ui
from mpsearch.core.errors import InternalError, MpsearchError
from mpsearch.core.version import __version__

__all__ = ["EXIT_BUG", "EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "main"]

log = logging.getLogger("mpsearch")

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
COMMANDS = (inspect, quantize, eval_cmd, hw, sensitivity, run, pareto, report, verify)


# What every sub-command's --help ends with: two or three commands that work as written
# (from the repository root, after `make demo` has built the example).
_M = "examples/efficientnet_lite0/cache"
_SD = "hw_profiles/snapdragon_8gen3.yaml"
EXAMPLES: dict[str, tuple[str, ...]] = {
    "run": (f"mpsearch run {_M}/model.onnx --hw {_SD}",
            f"mpsearch run {_M}/model.onnx --hw {_SD} --budget bops=0.75 --out out/",
            f"mpsearch run model.onnx --hw {_SD} --data photos/ --preprocess "
            "'mean=127;std=128' --target sqnr=25"),
    "pareto": (f"mpsearch pareto {_M}/model.onnx --hw {_SD} --data {_M}/calib.npz "
               "--out front/",),
    "quantize": (f"mpsearch quantize {_M}/model.onnx --uniform w8a8 --data {_M}/calib.npz "
                 "--out q/",
                 "mpsearch quantize model.onnx --uniform w8a16 --data calib.npz --holdout 0.25 "
                 "--out q16/"),
    "sensitivity": (f"mpsearch sensitivity {_M}/model.onnx --hw {_SD} --data {_M}/calib.npz "
                    "--out sens/",),
    "eval": (f"mpsearch eval {_M}/model.onnx out/model.qdq.onnx --data {_M}/eval.npz",),
    "verify": (f"mpsearch verify out/model.qdq.onnx --data {_M}/eval.npz",
               "mpsearch verify out/model.qdq.onnx --data eval.npz --json"),
    "inspect": (f"mpsearch inspect {_M}/model.onnx",),
    "report": ("mpsearch report out/", "mpsearch report out/ --out elsewhere.html"),
    "hw validate": (f"mpsearch hw validate {_SD}",),
    "hw show": (f"mpsearch hw show {_SD}", f"mpsearch hw show {_SD} --model {_M}/model.onnx"),
    "hw measure": (f"mpsearch hw measure {_M}/model.onnx --data {_M}/calib.npz --profile "
                   "hw_profiles/ort_cpu.yaml --out ort_cpu_measured.yaml",),
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping, except that lines indented by two spaces (the examples) are kept
    as they are."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:\n"):  # the epilog: one command a line, as written
            return text
        return super()._fill_text(text, width, indent)


def _with_examples(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Each sub-command's --help ends with its examples (:data:`EXAMPLES`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                key = f"{path} {name}".strip()
                child.formatter_class = _HelpFormatter
                if key in EXAMPLES:
                    child.epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[key])
                _with_examples(child, key)


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    p = argparse.ArgumentParser(
        prog="mpsearch",
        description="Hardware-aware mixed-precision quantization search for ONNX models.")
    p.add_argument("--version", action="version", version=f"mpsearch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub, common)
    _with_examples(p)
    return p


def _quiet_solver_banner() -> None:
    """Make the process's first HiGHS object with file descriptor 1 pointed at /dev/null.

    HiGHS's constructor writes a two-line banner straight to fd 1 (whatever ``output_flag``
    says), which would corrupt ``--json`` output; later objects print nothing. This is the
    command line's business, not the library's: it runs once, here, before any thread starts,
    and a Python caller of the library keeps its own stdout as it is."""
    try:
        import highspy
    except ImportError:  # pragma: no cover - highspy is a dependency
        return
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no fd 1 (a closed or captured stdout): nothing to guard
        highspy.Highs()
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _stdout_for_the_tool(chatter_to_stderr: bool) -> Iterator[None]:
    """stdout carries the tool's own output alone (with ``--json``, the JSON document):
    native libraries that print to file descriptor 1 (QNN's HTP libraries announce
    themselves there: " # LIBNATIVE: No alternate configuration ...") are pointed at
    /dev/null for the command's duration (at stderr with ``-v``/``--debug``), and Python's
    ``print`` writes to the real stdout. Only when stdout is the process's own (a caller that
    captured ``sys.stdout`` keeps it)."""
    if sys.stdout is not sys.__stdout__:
        yield
        return
    try:
        fd = sys.stdout.fileno()
        sys.stdout.flush()
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):
        yield
        return
    if chatter_to_stderr:
        os.dup2(2, fd)
    else:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    doc = io.TextIOWrapper(io.FileIO(saved, "w", closefd=False), encoding="utf-8",
                           line_buffering=True)
    real, sys.stdout = sys.stdout, doc
    try:
        yield
    finally:
        doc.flush()
        sys.stdout = real
        os.dup2(saved, fd)
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_solver_banner()
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    ui = Ui(quiet=args.quiet, as_json=args.json)
    try:
        with _stdout_for_the_tool(args.verbose or args.debug):
            return args.func(args, ui)
    except MpsearchError as e:
        if args.debug:
            raise
        print(f"mpsearch: error: {e.one_line()}", file=sys.stderr)
        return _json_error(args, EXIT_USAGE, type(e).__name__, e.problem, e.fix)
    except InternalError as e:
        if args.debug:
            raise
        print(f"mpsearch: internal error: {e.problem} (--debug shows the traceback)",
              file=sys.stderr)
        return _json_error(args, EXIT_BUG, "InternalError", e.problem, "report this as a bug")
    except KeyboardInterrupt:
        print("mpsearch: interrupted", file=sys.stderr)
        return _json_error(args, EXIT_INTERRUPTED, "KeyboardInterrupt", "interrupted", None)


def _json_error(args: argparse.Namespace, code: int, kind: str, problem: str,
                fix: str | None) -> int:
    """With ``--json``, a failed command still prints one JSON document on stdout: the error,
    its fix and the exit code (a script reading stdout needs no second channel)."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"type": kind, "problem": problem, "fix": fix,
                                    "exit": code}}), flush=True)
    return code
