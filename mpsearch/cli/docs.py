"""The README's option tables, rendered from the parsers themselves, so that ``--help`` and the
README cannot disagree.

The README marks each table with ``<!-- options: COMMAND -->`` ... ``<!-- /options -->``
(``COMMAND`` as typed: ``run``, ``hw show``); :func:`render` replaces what stands between the
markers with a table of that sub-command's options (the flags every command shares are listed
once, under ``<!-- options: common -->``). ``python -m mpsearch.cli.docs README.md`` rewrites
the file; ``--check`` exits 1 when it is out of date (``tests/test_docs.py`` runs the check).
Written here because argparse renders help as plain text only.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mpsearch.cli.args import common_parser
from mpsearch.cli.main import build_parser

__all__ = ["options_table", "render"]

_BLOCK = re.compile(r"(<!-- options: (?P<command>[a-z ]+) -->\n)(?P<body>.*?)(<!-- /options -->)",
                    re.S)
_COMMON = {a.dest for a in common_parser()._actions}


def _subparser(parser: argparse.ArgumentParser, words: Sequence[str]) -> argparse.ArgumentParser:
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if word not in sub.choices:
            raise KeyError(f"no sub-command {' '.join(words)!r}")
        parser = sub.choices[word]
    return parser


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def options_table(command: str) -> str:
    """The Markdown table of ``command``'s options (``common``: the shared flags)."""
    if command == "common":
        parser, keep = common_parser(), None
    else:
        parser, keep = _subparser(build_parser(), command.split()), _COMMON
    fmt = parser._get_formatter()
    rows = ["| option | meaning |", "|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if keep is not None and action.dest in keep:
            continue
        if isinstance(action, argparse._SubParsersAction):
            continue
        name = action.metavar or action.dest if not action.option_strings else \
            fmt._format_action_invocation(action)
        required = " (required)" if action.required and action.option_strings else ""
        text = fmt._expand_help(action) if action.help else ""  # as --help shows it (%%)
        rows.append(f"| `{_cell(name)}` | {_cell(text)}{required} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """``text`` with every marked block replaced by its command's current table."""
    return _BLOCK.sub(lambda m: m.group(1) + "\n" + options_table(m.group("command")) + "\n"
                      + m.group(4), text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpsearch.cli.docs", description=__doc__)
    ap.add_argument("file", type=Path, help="the Markdown file to update (README.md)")
    ap.add_argument("--check", action="store_true",
                    help="only say whether the file is up to date (exit 1 if not)")
    args = ap.parse_args(argv)
    text = args.file.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.file}: option tables are out of date; run "
                  f"python -m mpsearch.cli.docs {args.file}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.file.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
