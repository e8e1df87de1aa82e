"""`sbx completion`: the bash script is sourced by a real bash (not interactive) and its
completion function called as bash's programmable completion calls it (COMP_WORDS,
COMP_CWORD, COMP_LINE, COMP_POINT set); what it offers is checked against sbx's own parser,
so every command, subcommand and long option is covered."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbx.cli import build_parser, main

BASH = shutil.which("bash")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parsers(parser: argparse.ArgumentParser,
             path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                         argparse.ArgumentParser]]:
    yield path, parser
    for name, sub in _subcommands(parser).items():
        yield from _parsers(sub, (*path, name))


def _script(capsys: pytest.CaptureFixture[str], shell: str) -> str:
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


def _complete(script: Path, cwd: Path, *queries: tuple[str, ...]) -> list[set[str]]:
    """What bash's completion of sbx offers for each query (the words typed so far, the last
    one being completed), all in one bash that sourced `script`."""
    lines = [f"source {shlex.quote(str(script))}",
             "complete -p sbx >/dev/null || { echo 'no completion for sbx' >&2; exit 1; }",
             'ask() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; '
             'COMP_POINT=${#COMP_LINE}; COMPREPLY=(); '
             'complete_sbx=$(complete -p sbx); fn=${complete_sbx##*-F }; fn=${fn%% *}; '
             '"$fn" sbx "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"; '
             'printf "%s\\0" "${COMPREPLY[@]}"; echo; }']
    lines += [f"ask sbx {shlex.join(query)}" for query in queries]
    assert BASH is not None
    done = subprocess.run([BASH, "--norc", "--noprofile", "-c", "\n".join(lines)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    answers = done.stdout.split("\n")[:-1]
    assert len(answers) == len(queries), done.stdout
    return [set(filter(None, answer.split("\0"))) for answer in answers]


@pytest.fixture
def bash_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Path:
    if BASH is None:
        pytest.skip("bash is not installed")
    script = tmp_path / "sbx.bash"
    script.write_text(_script(capsys, "bash"))
    return script


def test_bash_completes_every_command_subcommand_and_option(
        bash_script: Path, tmp_path: Path) -> None:
    parsers = list(_parsers(build_parser()))
    with_subcommands = [(path, p) for path, p in parsers if _subcommands(p)]
    queries = [(*path, "--") for path, _ in parsers]
    queries += [(*path, "") for path, _ in with_subcommands]
    answers = _complete(bash_script, tmp_path, *queries)
    for (path, parser), offered in zip(parsers, answers, strict=False):
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        assert offered == options, f"sbx {' '.join(path)} --<TAB>"
    for (path, parser), offered in zip(with_subcommands, answers[len(parsers):], strict=True):
        assert offered == set(_subcommands(parser)), f"sbx {' '.join(path)} <TAB>"
    # the named ones, spelled out
    assert {"run", "file", "job", "completion"} <= answers[len(parsers)]
    assert {"--cached-file", "--copy-out", "--limit", "--interactive"} <= answers[
        [path for path, _ in parsers].index(("run",))]


def test_bash_completes_prefixes_choices_and_local_paths(
        bash_script: Path, tmp_path: Path) -> None:
    (tmp_path / "hello.sh").write_text("#!/bin/sh\n")
    (tmp_path / "context").mkdir()
    answers = _complete(bash_script, tmp_path,
                        ("r",), ("run", "--co"), ("run", "--network", ""), ("file", "g"),
                        ("job", "s"), ("completion", ""), ("file", "put", "hel"),
                        ("build", "con"), ("run", "busybox", "--", "ls", "-"))
    assert answers[:6] == [{"run", "rm", "rmi"}, {"--copy-out", "--copy-out-cached"},
                           {"none", "proxy", "full"}, {"get"}, {"submit", "secret"},
                           {"bash", "zsh"}]
    assert answers[6] == {"hello.sh"}
    assert answers[7] in ({"context"}, {"context/"})
    assert not {"--url", "--limit"} & answers[8]  # after `--` the words are the command's


def test_zsh_script_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    script = _script(capsys, "zsh")
    assert script.startswith("#compdef sbx")
    for path, parser in _parsers(build_parser()):
        for name in _subcommands(parser):
            assert f"{name}:" in script or f"{name})" in script, " ".join((*path, name))
        for action in parser._actions:
            for option in action.option_strings:
                assert option in script, f"sbx {' '.join(path)} {option}"


def test_completion_takes_only_known_shells(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["completion", "fish"])
    assert e.value.code == 2
    assert "invalid choice: 'fish'" in capsys.readouterr().err
