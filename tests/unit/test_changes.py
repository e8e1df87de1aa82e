"""A commit's `changes` (what `docker commit --change` takes): each instruction as Docker
dispatches it, the word processing of its arguments, and errors that name `changes[i]`."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.errors import ImageError
from sandbox.images import imageconfig as ic
from sandbox.images import shellwords
from sandbox.images.changes import apply_changes, parse_changes
from sandbox.images.instructions import parse

BASE: dict[str, Any] = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "EMPTY="],
    "Cmd": ["python3"],
    "WorkingDir": "/srv",
    "ArgsEscaped": True,
}


def run(*changes: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    return apply_changes(BASE if base is None else base, parse_changes(changes))


def refused(*changes: str, base: dict[str, Any] | None = None) -> str:
    with pytest.raises(ImageError) as info:
        run(*changes, base=base)
    return str(info.value)


# --- word processing (shellwords) --------------------------------------------------------

ENV = {"A": "a b", "E": "", "P": "/usr/local/bin:/usr/bin", "F": "file.tar.gz"}


@pytest.mark.parametrize(("text", "expected"), [
    ("plain", "plain"),
    ("$A", "a b"),
    ("${A}x", "a bx"),
    ("'$A'", "$A"),                    # single quotes: literal
    ('"$A"', "a b"),                   # double quotes: variables expanded
    ('"say \\"hi\\""', 'say "hi"'),    # \" inside double quotes
    ('"a\\nb"', "a\\nb"),              # other escapes stay inside double quotes
    ("a\\ b", "a b"),                  # escaped space outside quotes
    ("\\$A", "$A"),                    # escaped dollar
    ("end\\", "end"),                  # a lone trailing escape goes
    ('a"b c"d', "ab cd"),
    ("$", "$"),
    ("$1$UNSET.", "."),                # positional and unset: empty
    ("${UNSET:-dflt}", "dflt"),
    ("${E:-dflt}", "dflt"),            # :- also when empty
    ("${E-dflt}", ""),                 # - only when unset
    ("${A:-dflt}", "a b"),
    ("${A:+alt}", "alt"),
    ("${E:+alt}", ""),
    ("${E+alt}", "alt"),
    ("${UNSET+alt}", ""),
    ("${UNSET:-$A}", "a b"),           # the word is expanded too
    ("${F#*.}", "tar.gz"),
    ("${F##*.}", "gz"),
    ("${F%.*}", "file.tar"),
    ("${F%%.*}", "file"),
    ("${P/bin/BIN}", "/usr/local/BIN:/usr/bin"),
    ("${P//bin/BIN}", "/usr/local/BIN:/usr/BIN"),
])
def test_word(text: str, expected: str) -> None:
    assert shellwords.word(text, ENV) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("80 443", ["80", "443"]),
    ("$A", ["a", "b"]),                # whitespace from a variable splits
    ('"$A" c', ["a b", "c"]),          # quoted whitespace does not
    ("x\\ y  z", ["x y", "z"]),
    ('""', []),
])
def test_words(text: str, expected: list[str]) -> None:
    assert shellwords.words(text, ENV) == expected


def test_the_escape_character_can_be_a_backtick() -> None:
    assert shellwords.word("a`$A`\\b", ENV, escape="`") == "a$A\\b"


@pytest.mark.parametrize(("text", "fragment"), [
    ('"open', "double quote is not closed"),
    ("'open", "single quote is not closed"),
    ("${A", "not closed by '}'"),
    ("${A:-x", "not closed by '}'"),
    ("${}", "bad substitution"),
    ("${A*}", "modifier Docker does not have"),
    ("${UNSET?}", "UNSET: is not allowed to be unset"),
    ("${E:?set it}", "E: set it"),
])
def test_word_errors(text: str, fragment: str) -> None:
    with pytest.raises(ImageError) as info:
        shellwords.word(text, ENV)
    assert fragment in str(info.value)


# --- each instruction --------------------------------------------------------------------

def test_cmd_exec_and_shell_forms() -> None:
    assert run('CMD ["echo", "a b"]')["Cmd"] == ["echo", "a b"]
    # The text form runs in the shell, untouched: $HOME is the shell's to expand.
    out = run('CMD echo "$HOME"  ')
    assert out["Cmd"] == ["/bin/sh", "-c", 'echo "$HOME"']
    assert "ArgsEscaped" not in out  # a Windows-only flag, dropped as Docker does on Linux
    assert run("CMD []")["Cmd"] == []
    # The config's SHELL runs the text form.
    assert run("CMD x", base={"Shell": ["/bin/bash", "-ec"]})["Cmd"] == ["/bin/bash", "-ec", "x"]


def test_entrypoint_clears_the_inherited_cmd_unless_a_cmd_came_first() -> None:
    out = run('ENTRYPOINT ["/init"]')
    assert out["Entrypoint"] == ["/init"] and "Cmd" not in out
    out = run("CMD serve", 'ENTRYPOINT ["/init"]')
    assert out["Cmd"] == ["/bin/sh", "-c", "serve"] and out["Entrypoint"] == ["/init"]
    out = run('ENTRYPOINT ["/init"]', "CMD serve")
    assert out["Cmd"] == ["/bin/sh", "-c", "serve"]
    assert run("ENTRYPOINT top -b")["Entrypoint"] == ["/bin/sh", "-c", "top -b"]


def test_env_forms_quotes_and_expansion() -> None:
    out = run('ENV A=1 B="two words" C=\'$HOME\' D=$HOME/x',
              "ENV LEGACY form with spaces",
              "ENV PATH=/opt/bin:$PATH")
    assert out["Env"] == [
        "PATH=/opt/bin:/usr/local/bin:/usr/bin:/bin",  # replaced where it was
        "HOME=/root", "EMPTY=", "A=1", "B=two words", "C=$HOME", "D=/root/x",
        "LEGACY=form with spaces"]


def test_env_words_see_the_environment_before_the_instruction() -> None:
    # As in Docker: every word of one ENV is expanded against the Env before it.
    out = run("ENV X=1 Y=${X:-unset}", "ENV Z=$X")
    assert "Y=unset" in out["Env"] and "Z=1" in out["Env"]


def test_env_over_a_multi_line_change() -> None:
    out = run("ENV A=1 \\\n    B=2")
    assert out["Env"][-2:] == ["A=1", "B=2"]


def test_the_escape_directive() -> None:
    out = run("# escape=`\nENV W=C:\\dir`\n  V=$HOME`$")
    assert out["Env"][-2:] == ["W=C:\\dir", "V=/root$"]


def test_label() -> None:
    out = run('LABEL "com.example.vendor"="ACME Inc" version=1.0 home=$HOME',
              "LABEL version=2.0")
    assert out["Labels"] == {"com.example.vendor": "ACME Inc", "version": "2.0",
                             "home": "/root"}
    kept = run("LABEL b=2", base={"Labels": {"a": "1"}})
    assert kept["Labels"] == {"a": "1", "b": "2"}


def test_expose() -> None:
    out = run("EXPOSE 80 53/udp 8000-8002/TCP 9/sctp", "ENV PORTS='81 82'")
    assert out["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "8000/tcp": {},
                                   "8001/tcp": {}, "8002/tcp": {}, "9/sctp": {}}
    # A variable naming several ports gives several, as in Docker.
    out = run("EXPOSE $PORTS", base={"Env": ["PORTS=81 82/udp"]})
    assert out["ExposedPorts"] == {"81/tcp": {}, "82/udp": {}}


def test_onbuild_stores_the_trigger_text() -> None:
    out = run("ONBUILD RUN echo $HOME", "onbuild  COPY --chown=1:1 . /app",
              "ONBUILD ADD a \\\n  b")
    assert out["OnBuild"] == ["RUN echo $HOME", "COPY --chown=1:1 . /app", "ADD a   b"]
    assert run("ONBUILD CMD x", base={"OnBuild": ["RUN a"]})["OnBuild"] == ["RUN a", "CMD x"]


@pytest.mark.parametrize("value", ["SIGTERM", "term", "SIGRTMIN+3", "9", "KILL", "$SIG"])
def test_stopsignal_names_and_numbers(value: str) -> None:
    out = run(f"STOPSIGNAL {value}", base={"Env": ["SIG=SIGUSR1"]})
    assert out["StopSignal"] == ("SIGUSR1" if value == "$SIG" else value)


def test_user() -> None:
    assert run("USER app")["User"] == "app"
    assert run("USER 1000:$G", base={"Env": ["G=50"]})["User"] == "1000:50"


def test_volume() -> None:
    out = run('VOLUME ["/data", "/logs"]', "VOLUME /cache /tmp/$HOME")
    assert out["Volumes"] == {"/data": {}, "/logs": {}, "/cache": {}, "/tmp//root": {}}


def test_workdir_goes_on_from_the_current_one() -> None:
    assert run("WORKDIR /app")["WorkingDir"] == "/app"
    assert run("WORKDIR sub", "WORKDIR ../x/./y/")["WorkingDir"] == "/srv/x/y"
    assert run("WORKDIR rel", base={})["WorkingDir"] == "/rel"
    assert run("WORKDIR $HOME/w")["WorkingDir"] == "/root/w"


def test_the_base_is_left_as_it_was() -> None:
    base = {"Env": ["A=1"], "Labels": {"x": "1"}, "ExposedPorts": {"1/tcp": {}}}
    run("ENV A=2", "LABEL x=2", "EXPOSE 2", base=base)
    assert base == {"Env": ["A=1"], "Labels": {"x": "1"}, "ExposedPorts": {"1/tcp": {}}}


def test_a_base_with_odd_values_where_lists_and_objects_go_starts_them_afresh() -> None:
    out = run("EXPOSE 80", "ONBUILD RUN x", "LABEL a=b", "VOLUME /v",
              base={"ExposedPorts": "junk", "OnBuild": None, "Labels": [], "Volumes": 3})
    assert (out["ExposedPorts"], out["OnBuild"], out["Labels"], out["Volumes"]) == (
        {"80/tcp": {}}, ["RUN x"], {"a": "b"}, {"/v": {}})


def test_no_changes_keep_the_config() -> None:
    assert run() == BASE


# --- errors name the change ------------------------------------------------------------

@pytest.mark.parametrize(("changes", "fragment"), [
    (["RUN echo hi"], "changes[0]: RUN cannot be a commit change"),
    (["ENV A=1", "COPY . /"], "changes[1]: COPY cannot be a commit change"),
    (["ENV A=1", "CMD x", "FROM busybox"], "changes[2]: FROM cannot be a commit change"),
    (["garbage in"], "changes[0]: 'garbage' is not a Dockerfile instruction"),
    ([""], "changes[0]: expected an instruction"),
    (["   \n"], "changes[0]: expected an instruction"),
    (["# only a comment"], "changes[0]: "),
    (["CMD a\nCMD b"], "changes[0]: holds 2 instructions"),
    (["CMD --flag=1 a"], "changes[0]: CMD takes no flags"),
    (["ENV"], "changes[0]: ENV: needs at least one"),
    (["ENV A"], "changes[0]: ENV must have two arguments"),
    (["ENV A=1 B"], "changes[0]: Syntax error"),
    (['ENV A="open'], "changes[0]: ENV: cannot expand"),
    (["ENV =x"], "changes[0]: ENV: environment variable name"),
    (["ENV A=1", 'ENV B="${A:?must be set}"', 'ENV C="${NOPE:?must be set}"'],
     "changes[2]: ENV: cannot expand '\"${NOPE:?must be set}\"': NOPE: must be set"),
    ([f"LABEL a={'x' * 17000}"], "changes[0]: the changes are too long (17008 bytes here"),
    ([f"LABEL a={'x' * 15000}"] * 5, "changes[4]: the changes are too long (15008 bytes here, "
                                     "75040 so far"),
    (["LABEL"], "changes[0]: LABEL: needs at least one"),
    (["EXPOSE"], "changes[0]: EXPOSE: needs at least one port"),
    (["EXPOSE http"], "changes[0]: EXPOSE: 'http' is not a port"),
    (["EXPOSE 8080:80"], "maps a host port"),
    (["EXPOSE 80/quic"], "tcp, udp or sctp"),
    (["EXPOSE 0", ], "ports are 1 to 65535"),
    (["EXPOSE 70000"], "ports are 1 to 65535"),
    (["EXPOSE 90-80"], "ports are 1 to 65535"),
    (["ONBUILD"], "changes[0]: ONBUILD: needs the instruction"),
    (["ONBUILD ONBUILD RUN x"], "changes[0]: ONBUILD: chaining ONBUILD"),
    (["ONBUILD FROM busybox"], "FROM is not allowed as an ONBUILD trigger"),
    (["ONBUILD maintainer me"], "MAINTAINER is not allowed as an ONBUILD trigger"),
    (["ONBUILD garbage x"], "'garbage' is not a Dockerfile instruction"),
    (["ONBUILD RUN <<EOF\necho\nEOF"], "without a heredoc"),
    (["STOPSIGNAL"], "changes[0]: STOPSIGNAL: needs exactly one argument"),
    (["STOPSIGNAL SIGNOPE"], "'SIGNOPE' is not a signal"),
    (["STOPSIGNAL 0"], "'0' is not a signal"),
    (["STOPSIGNAL 65"], "'65' is not a signal"),
    (["STOPSIGNAL 9 10"], "'9 10' is not a signal"),
    (["USER"], "changes[0]: USER: needs exactly one argument"),
    (["USER a:b:c"], "changes[0]: USER: user 'a:b:c' is not"),
    (["VOLUME"], "changes[0]: VOLUME: needs at least one path"),
    (['VOLUME [""]'], "a volume cannot be an empty path"),
    (["WORKDIR"], "changes[0]: WORKDIR: needs exactly one argument"),
    (["WORKDIR $UNSET"], "changes[0]: WORKDIR: the directory is empty"),
    (["# escape=x\nCMD a"], "changes[0]: invalid escape token"),
    (["ENV A=1"] * 257, "changes: 257 changes, over the 256 allowed"),
])
def test_errors_name_the_change(changes: list[str], fragment: str) -> None:
    assert fragment in refused(*changes)


def test_not_a_list() -> None:
    with pytest.raises(ImageError, match="changes: expected a list"):
        parse_changes("CMD x")  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=r"changes\[1\]: expected an instruction"):
        parse_changes(["CMD x", 5])  # type: ignore[list-item]


def test_another_field_name() -> None:
    with pytest.raises(ImageError, match=r"^change\[0\]: RUN"):
        parse_changes(["RUN x"], field="change")


def test_instructions_of_a_dockerfile_keep_their_lines() -> None:
    found = parse("FROM busybox\n# note\nRUN echo \\\n  hi\nCMD x\n", "Dockerfile")
    assert [(i.keyword, i.node.start_line) for i in found] == [("FROM", 1), ("RUN", 3),
                                                               ("CMD", 5)]


# --- the config a commit writes -------------------------------------------------------

BASE_CONFIG = {
    "architecture": "amd64", "os": "linux", "author": "base author",
    "created": "2020-01-01T00:00:00Z",
    "config": BASE,
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
    "history": [{"created_by": "base"}],
}


def test_commit_config_carries_changes_history_and_author() -> None:
    import orjson
    base = ic.parse_config(orjson.dumps(BASE_CONFIG))
    new = "sha256:" + "2" * 64
    data = ic.build_config(diff_ids=[*base.diff_ids, new], base=base,
                           run=run("ENV A=1", "EXPOSE 80", "LABEL a=b"),
                           created="2024-05-01T10:00:00.000001Z", history_comment="msg",
                           created_by="sandboxd commit", author="Ann <ann@example.com>")
    cfg = ic.parse_config(data)
    assert cfg.diff_ids == (*base.diff_ids, new)
    assert cfg.raw["history"] == [
        {"created_by": "base"},
        {"created": "2024-05-01T10:00:00.000001Z", "created_by": "sandboxd commit",
         "comment": "msg", "author": "Ann <ann@example.com>"}]
    assert cfg.raw["author"] == "Ann <ann@example.com>"
    assert cfg.raw["created"] == "2024-05-01T10:00:00.000001Z"
    assert "A=1" in cfg.env and cfg.labels == {"a": "b"}
    assert cfg.raw["config"]["ExposedPorts"] == {"80/tcp": {}}
    # Without an author the base's is not carried over (docker commit sets its own).
    cfg = ic.parse_config(ic.build_config(diff_ids=[*base.diff_ids, new], base=base))
    assert "author" not in cfg.raw and "author" not in cfg.raw["history"][-1]


def test_a_config_over_the_size_limit_is_an_image_error_not_a_bad_upstream() -> None:
    huge = {"Labels": {"big": "x" * ic.MAX_CONFIG_BYTES}}
    with pytest.raises(ImageError, match=r"over the \d+ byte limit: shorten"):
        ic.build_config(diff_ids=[], run=huge)


def test_a_line_too_long_for_the_parser_is_refused_not_dropped() -> None:
    # Go's line scanner would end the text there without a word ("no instructions").
    with pytest.raises(ImageError, match="Dockerfile: line 2 is 70008 bytes, over the "
                                         "parser's limit of 65535; split it"):
        parse(f"FROM x\nLABEL a={'x' * 70000}\n", "Dockerfile")
