"""`sbx COMMAND --help` is a manual page for every command and subcommand: NAME, SYNOPSIS,
the options, EXAMPLES and EXIT STATUS; every sbx command in an example parses with sbx's
own parser, and every example line is valid shell."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess

import pytest

from sbx.cli import build_parser, main
from sbx.manual import Manual, ManualParser

# What shlex lexes as shell operators: each ends a command (`a | b`, `a && b`, `a > f`) or
# opens or closes a nested one (`x=$(b)`, `<(b)`)
OPERATOR_CHARS = frozenset("();<>|&")
# `sbx loadtest --help` is `python -m loadtest`'s own help (the command takes its options)
OWN_HELP = {("loadtest",)}


def _pages(parser: argparse.ArgumentParser,
           path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], ManualParser]]:
    assert isinstance(parser, ManualParser)
    pages = [] if path in OWN_HELP else [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                pages += _pages(sub, (*path, name))
    return pages


def sbx_commands(line: str) -> list[list[str]]:
    """The argv (after `sbx`) of each sbx command in an example's shell line, those inside
    `$(...)` and `<(...)` too (where such a substitution is an argument, it stands as the
    word `$(...)`)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found: list[list[str]] = []
    levels: list[list[str]] = [[]]  # the words of the command read at each nesting level

    def end() -> None:
        if levels[-1][:1] == ["sbx"]:
            found.append(levels[-1][1:])
        levels[-1] = []

    for token in lexer:
        if not set(token) <= OPERATOR_CHARS:
            levels[-1].append(token)
            continue
        for char in token:  # the lexer joins neighbours: `))`, `<(`, `>&`
            if char == "(":
                words = levels[-1]
                if words and words[-1].endswith("$"):  # `$(`: the value is a word here
                    words[-1] += "(...)"
                levels.append([])
            elif char == ")" and len(levels) > 1:
                end()
                levels.pop()
            else:
                end()
    while levels:
        end()
        levels.pop()
    return found


PAGES = _pages(build_parser())
NAMES = [" ".join(("sbx", *path)) for path, _ in PAGES]


def _manual(parser: ManualParser) -> Manual:
    assert parser.manual is not None, f"{parser.prog} has no manual (examples, exit status)"
    return parser.manual


@pytest.mark.parametrize(("path", "parser"), PAGES, ids=NAMES)
def test_help_is_a_manual_page(path: tuple[str, ...], parser: ManualParser,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    page = capsys.readouterr().out
    prog = " ".join(("sbx", *path))
    assert page.startswith(f"NAME\n    {prog} - ")
    assert f"SYNOPSIS\n    {prog} [-h]" in page
    headings = [line for line in page.splitlines() if line and not line[0].isspace()]
    assert {"EXAMPLES", "EXIT STATUS", "OPTIONS"} <= set(headings), headings
    assert headings.index("EXAMPLES") < headings.index("EXIT STATUS")
    manual = _manual(parser)
    assert manual.examples
    for example in manual.examples:
        assert f"\n    {example.line}\n" in page
    assert "\n    0 " in page or "\n    N " in page  # success is always said
    assert re.search(r"\n    125 +sbx or sandboxd failed", page)


@pytest.mark.parametrize(("path", "parser"), PAGES, ids=NAMES)
def test_every_example_parses_with_sbxs_parser(path: tuple[str, ...],
                                               parser: ManualParser) -> None:
    invoked = []
    for example in _manual(parser).examples:
        for argv in sbx_commands(example.line):
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"the example {example.line!r} of sbx {' '.join(path)} does not "
                            f"parse: sbx {' '.join(argv)}")
            invoked.append(tuple(argv[:len(path)]))
    assert path in invoked, f"no example of sbx {' '.join(path)} runs it"


def test_every_example_is_valid_shell() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    lines = {example.line for _, parser in PAGES for example in _manual(parser).examples}
    for line in sorted(lines):
        done = subprocess.run([bash, "-n", "-c", line], capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, f"{line!r}: {done.stderr}"


@pytest.mark.parametrize(("line", "commands"), [
    ("sbx run busybox -- echo hi", [["run", "busybox", "--", "echo", "hi"]]),
    ("id=$(sbx create busybox)", [["create", "busybox"]]),
    ("echo '{\"a\": 1}' | sbx batch -", [["batch", "-"]]),
    ("sbx rm $(sbx create busybox) other", [["create", "busybox"], ["rm", "$(...)", "other"]]),
    ("x=$(sbx file put -) && sbx batch - < b.json", [["file", "put", "-"], ["batch", "-"]]),
    ("sbx exec \"$id\" -- sh -c 'a | b; c'", [["exec", "$id", "--", "sh", "-c", "a | b; c"]]),
    ("mkdir -p d && sbx completion bash > d/sbx", [["completion", "bash"]]),
    ("source <(sbx completion bash)", [["completion", "bash"]]),
    ("printf 'x' > f", []),
])
def test_sbx_commands_of_a_shell_line(line: str, commands: list[list[str]]) -> None:
    assert sbx_commands(line) == commands


def test_a_usage_error_still_prints_the_short_usage(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sbx run ") and "EXAMPLES" not in err
