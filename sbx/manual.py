"""`sbx COMMAND --help` as a manual page: NAME, SYNOPSIS, DESCRIPTION, the arguments and
options, EXAMPLES and EXIT STATUS. Each command's examples and exit statuses are declared
where its parser is built (sbx/cli.py), as a `Manual` handed to `add_parser`; the tests
parse every example with sbx's own parser (tests/unit/test_sbx_help.py) and run them all
against a real service (tests/service/test_cli_examples.py)."""

from __future__ import annotations

import argparse
import re
import shutil
import textwrap
from dataclasses import dataclass
from typing import Any

INDENT = " " * 4
FIRST_SENTENCE = re.compile(r"(.*?\.)(?:\s+|$)(.*)", re.DOTALL)
USAGE_ERROR = ("2", "the command line is wrong (unknown option, missing argument): sbx "
                    "prints its usage on stderr")
SBX_FAILED = ("125", "sbx or sandboxd failed: the service answered an error (for a run, also "
                     "its internal_error verdict) or could not be reached at --url; the "
                     "reason is on stderr")


@dataclass(frozen=True)
class Example:
    """A shell line as a user types it, and what it does."""

    line: str
    what: str


@dataclass(frozen=True)
class Manual:
    """What a command's page says beyond its options. `exits` are the statuses of this
    command other than the usage error (2) and sbx's own failure (125), which every page
    lists; `sections` are further (TITLE, text) sections, e.g. ENVIRONMENT."""

    examples: tuple[Example, ...]
    exits: tuple[tuple[str, str], ...] = (("0", "it worked"),)
    sections: tuple[tuple[str, str], ...] = ()


def summary(text: str) -> str:
    """The first sentence of a description: a command's line in lists and in NAME."""
    match = FIRST_SENTENCE.match(text.strip())
    return match.group(1) if match else text.strip()


class ManualParser(argparse.ArgumentParser):
    """An ArgumentParser whose help is a manual page (subparsers made through it are too:
    argparse gives them the parent's class, and `manual=` goes through add_parser)."""

    def __init__(self, *args: Any, manual: Manual | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.manual = manual

    def format_help(self) -> str:
        width = max(shutil.get_terminal_size().columns - 2, 60) - len(INDENT)
        description = (self.description or "").strip()
        rest = FIRST_SENTENCE.match(description)
        sections = [("NAME", _fill(f"{self.prog} - {summary(description)}", width)),
                    ("SYNOPSIS", self._usage(width))]
        if rest and rest.group(2).strip():
            sections.append(("DESCRIPTION", _fill(rest.group(2), width)))
        for group in self._action_groups:
            actions = group._group_actions  # argparse's own format_help reads it too
            commands = [a for a in actions if isinstance(a, argparse._SubParsersAction)]
            if commands:
                rows = [(name, summary(sub.description or ""))
                        for a in commands for name, sub in a.choices.items()]
                sections.append(("COMMANDS", _table(rows, width)))
            if rest_actions := [a for a in actions if a not in commands]:
                title = {"positional arguments": "ARGUMENTS"}.get(group.title or "",
                                                                  (group.title or "").upper())
                sections.append((title, self._items(rest_actions, width)))
        if self.manual is not None:
            sections += self._manual_sections(self.manual, width)
        return "\n".join(f"{title}\n{textwrap.indent(body.rstrip(), INDENT)}\n"
                         for title, body in sections)

    def _formatter(self, width: int) -> argparse.HelpFormatter:
        return self.formatter_class(prog=self.prog, width=width)  # type: ignore[call-arg]

    def _usage(self, width: int) -> str:
        formatter = self._formatter(width)
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups,
                            prefix="")
        return formatter.format_help()

    def _items(self, actions: list[argparse.Action], width: int) -> str:
        formatter = self._formatter(width)
        formatter.add_arguments(actions)
        return formatter.format_help()

    @staticmethod
    def _manual_sections(manual: Manual, width: int) -> list[tuple[str, str]]:
        examples = [_fill("Each line works as written in a shell, in order, with the service "
                          "at $SANDBOXD_URL (and $SANDBOXD_TOKEN).", width)]
        examples += [f"{example.line}\n{_fill(example.what, width, INDENT, INDENT)}"
                     for example in manual.examples]
        exits = _table([*manual.exits, USAGE_ERROR, SBX_FAILED], width)
        return [("EXAMPLES", "\n\n".join(examples)), ("EXIT STATUS", exits),
                *((title, _fill(text, width)) for title, text in manual.sections)]


def _table(rows: list[tuple[str, str]], width: int) -> str:
    """Two columns: a short key (a command, an exit status) and its text, wrapped beside it."""
    column = max(len(key) for key, _ in rows) + 2
    return "\n".join(_fill(f"{key:<{column}}{text}", width, "", " " * column)
                     for key, text in rows)


def _fill(text: str, width: int, first: str = "", rest: str = "") -> str:
    """Paragraphs (blank-line separated) wrapped to `width`, their first lines indented by
    `first`, the others by `rest`."""
    return "\n\n".join(
        textwrap.fill(paragraph, width, initial_indent=first, subsequent_indent=rest,
                      break_on_hyphens=False, break_long_words=False)
        for paragraph in textwrap.dedent(text).strip().split("\n\n"))
