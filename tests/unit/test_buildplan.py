"""A Dockerfile as a build plan (buildplan.py) and the build-only instructions
(instructions.py: ARG, SHELL, HEALTHCHECK, MAINTAINER), as Docker documents them and
BuildKit does: stages, targets, ARG scope, what RUN runs and COPY copies, ONBUILD triggers,
normal forms, and errors that name Dockerfile:LINE and the instruction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from sandbox.errors import ImageError
from sandbox.images import buildplan
from sandbox.images.buildplan import Plan, StageConfig
from sandbox.images.changes import parse_changes
from sandbox.images.instructions import BUILD_CONFIG_INSTRUCTIONS, CONFIG_INSTRUCTIONS
from sandbox.images.manifest import Platform

AMD64 = Platform.parse("linux/amd64")
ARM64 = Platform.parse("linux/arm64/v8")
BASE: dict[str, Any] = {"Env": ["PATH=/usr/bin:/bin", "HOME=/root"], "Cmd": ["sh"]}


def make(text: str, *, args: Mapping[str, str] | None = None, target: str | None = None,
         platform: Platform = AMD64) -> Plan:
    return buildplan.plan(text, build_args=args or {}, target=target, platform=platform,
                          build_platform=AMD64)


def refused(text: str, **kwargs: Any) -> str:
    with pytest.raises(ImageError) as info:
        walk(text, **kwargs)
    return str(info.value)


def walk(text: str, *, run: dict[str, Any] | None = None, args: Mapping[str, str] | None = None,
         target: str | None = None, platform: Platform = AMD64) -> dict[int, StageConfig]:
    """Each stage's config after its instructions, as a builder goes through them: the
    config ones applied, RUN and COPY/ADD read (what they would run or copy)."""
    p = make(text, args=args, target=target, platform=platform)
    done: dict[int, StageConfig] = {}
    for stage in p.stages:
        config = (stage.config(run if run is not None else BASE) if stage.base_stage is None
                  else done[stage.base_stage].copy_for(stage))
        for ins in (*config.triggers(), *stage.instructions):
            if ins.keyword == "RUN":
                config.run_args(ins)
            elif ins.keyword in ("COPY", "ADD"):
                config.copy_args(ins)
            else:
                config.apply(ins)
        done[stage.index] = config
    return done


def last(text: str, **kwargs: Any) -> StageConfig:
    done = walk(text, **kwargs)
    return done[max(done)]


def env_of(config: StageConfig) -> dict[str, str]:
    return config.state.env()


# --- stages, names, targets ------------------------------------------------------------

MULTI = """\
FROM busybox AS Base
RUN echo base
FROM golang:1.22 AS builder
COPY --from=base /etc/passwd /tmp/
RUN go build
FROM alpine AS unused
RUN echo never
FROM BUILDER AS tested
RUN go test
FROM scratch
COPY --from=1 /app /app
COPY --from=tested /report /report
COPY --from=nginx:1.25 /etc/nginx /etc/nginx
"""


def test_stages_and_what_the_target_needs_in_build_order() -> None:
    p = make(MULTI)
    assert [s.index for s in p.stages] == [0, 1, 3, 4]   # "unused" is pruned
    assert p.target == 4
    assert p.steps == (1 + 1) + (1 + 2) + (1 + 1) + (1 + 3)
    base, builder, tested, final = p.stages
    assert (base.name, base.base, base.base_stage, base.line) == ("base", "busybox", None, 1)
    assert (builder.name, builder.base) == ("builder", "golang:1.22")
    # FROM naming an earlier stage (any case) builds on it.
    assert (tested.base_stage, tested.base) == (1, "BUILDER")
    assert (final.name, final.base, final.text) == (None, "scratch", "FROM scratch")
    assert [i.keyword for i in final.instructions] == ["COPY", "COPY", "COPY"]
    assert final.instructions[0].where == "Dockerfile:11"


def test_target_by_name_or_index_prunes_what_it_does_not_need() -> None:
    assert [s.index for s in make(MULTI, target="Builder").stages] == [0, 1]
    assert [s.index for s in make(MULTI, target="unused").stages] == [2]
    assert [s.index for s in make(MULTI, target="0").stages] == [0]
    assert make(MULTI, target="tested").steps == 2 + 3 + 2
    with pytest.raises(ImageError, match=r"target 'nope' is not a stage of the Dockerfile; "
                                         r"its stage names are base, builder, unused, "
                                         r"tested \(or give an index from 0 to 4\)"):
        make(MULTI, target="nope")


def test_copy_from_resolves_names_numbers_and_images() -> None:
    final = walk(MULTI)[4]
    copies = [final.copy_args(ins) for ins in final.stage.instructions]
    assert [(c.from_, c.from_stage) for c in copies] == [
        ("1", 1), ("tested", 3), ("nginx:1.25", None)]
    assert copies[2].sources == ("/etc/nginx",) and copies[2].dest == "/etc/nginx"


def test_copy_from_expands_the_stage_args_and_pulls_in_that_stage() -> None:
    text = ("FROM busybox AS one\nFROM busybox AS two\nFROM scratch\nARG SRC=one\n"
            "COPY --from=$SRC /a /a\n")
    assert [s.index for s in make(text).stages] == [0, 2]
    assert [s.index for s in make(text, args={"SRC": "two"}).stages] == [1, 2]
    config = last(text, args={"SRC": "two"})
    assert config.copy_args(config.stage.instructions[-1]).from_stage == 1


def test_global_args_and_platform_args_expand_from() -> None:
    text = ("ARG TAG=1.36\nARG IMG=busybox:${TAG}\nFROM --platform=$BUILDPLATFORM $IMG AS b\n"
            "FROM alpine:$TARGETARCH\n")
    first = make(text, platform=ARM64, target="b").stages[0]
    assert first.base == "busybox:1.36" and first.platform == AMD64
    assert make(text, platform=ARM64).stages[0].base == "alpine:arm64"
    assert make(text, args={"TAG": "1.37"}, target="b").stages[0].base == "busybox:1.37"
    assert make(text, args={"IMG": "debian"}, target="b").stages[0].base == "debian"


# --- ARG scope ---------------------------------------------------------------------------

def test_arg_scope_defaults_build_args_and_global_values() -> None:
    text = ("ARG GLOBAL=g VERSION\nFROM busybox\nARG GLOBAL\nARG LOCAL=l-$GLOBAL NOVALUE\n"
            "ARG VERSION\nLABEL seen=\"$GLOBAL $LOCAL ${NOVALUE-unset} $VERSION\"\n")
    assert last(text).run["Labels"] == {"seen": "g l-g unset "}
    out = last(text, args={"GLOBAL": "G", "LOCAL": "L", "VERSION": "2"})
    assert out.run["Labels"] == {"seen": "G L unset 2"}


def test_global_args_need_redeclaring_in_a_stage() -> None:
    out = last("ARG G=g\nFROM busybox\nLABEL g=\"[$G]\"\n")
    assert out.run["Labels"] == {"g": "[]"}


def test_args_of_one_instruction_see_those_before_them() -> None:
    assert last("FROM busybox\nARG A=1 B=$A-2\nLABEL b=$B\n").run["Labels"] == {"b": "1-2"}


def test_env_wins_over_arg_and_args_never_reach_the_image() -> None:
    text = ("FROM busybox\nARG MODE=arg ONLY=arg\nENV MODE=env\nARG HOME=/arg\n"
            "LABEL mode=$MODE only=$ONLY home=$HOME\n")
    out = last(text, args={"MODE": "given"})
    assert out.run["Labels"] == {"mode": "env", "only": "arg", "home": "/root"}
    assert out.run_env() == ["PATH=/usr/bin:/bin", "HOME=/root", "MODE=env", "ONLY=arg"]
    assert out.image_run()["Env"] == ["PATH=/usr/bin:/bin", "HOME=/root", "MODE=env"]


def test_automatic_platform_args_only_once_declared_in_a_stage() -> None:
    text = ("FROM busybox\nLABEL before=\"[$TARGETARCH]\"\nARG TARGETARCH TARGETVARIANT "
            "BUILDOS TARGETPLATFORM=mine\nLABEL after=$TARGETARCH/$TARGETVARIANT/$BUILDOS "
            "p=$TARGETPLATFORM\n")
    out = last(text, platform=ARM64)
    assert out.run["Labels"] == {"before": "[]", "after": "arm64/v8/linux", "p": "mine"}


def test_a_stage_from_an_earlier_one_keeps_its_args() -> None:
    text = "FROM busybox AS a\nARG X=1\nENV E=e\nFROM a\nLABEL x=$X e=$E\n"
    assert last(text).run["Labels"] == {"x": "1", "e": "e"}


def test_build_args_no_stage_built_declares_are_not_consumed() -> None:
    text = ("ARG GLOBAL\nFROM busybox AS a\nARG USED\nFROM busybox AS b\nARG ONLY_B\n"
            "FROM a\n")
    given = {"GLOBAL": "1", "USED": "1", "ONLY_B": "1", "STRAY": "1", "TARGETARCH": "x"}
    assert make(text, args=given).unused_args == ("ONLY_B", "STRAY")


# --- SHELL, HEALTHCHECK, MAINTAINER ----------------------------------------------------

def test_shell_runs_the_text_forms_after_it() -> None:
    out = last('FROM busybox\nSHELL ["/bin/bash", "-eo", "pipefail", "-c"]\nCMD serve\n')
    assert out.run["Shell"] == ["/bin/bash", "-eo", "pipefail", "-c"]
    assert out.run["Cmd"] == ["/bin/bash", "-eo", "pipefail", "-c", "serve"]
    ins = out.stage.instructions[0]
    run = make("FROM busybox\nRUN make\n").stages[0].instructions[0]
    assert out.run_args(run).argv == ("/bin/bash", "-eo", "pipefail", "-c", "make")
    assert ins.keyword == "SHELL"


@pytest.mark.parametrize(("line", "expected"), [
    ("HEALTHCHECK NONE", {"Test": ["NONE"]}),
    ("HEALTHCHECK CMD curl -f http://localhost/ || exit 1",
     {"Test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"]}),
    ('HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=0 --start-interval=1.5s '
     '--retries=3 CMD ["/bin/check", "-q"]',
     {"Test": ["CMD", "/bin/check", "-q"], "Interval": 90 * 10**9, "Timeout": 5 * 10**8,
      "StartInterval": 15 * 10**8, "Retries": 3}),
    ("HEALTHCHECK --interval=1h2m3.5s --retries=0 cmd check",
     {"Test": ["CMD-SHELL", "check"], "Interval": (3723 * 10**9 + 5 * 10**8)}),
])
def test_healthcheck(line: str, expected: dict[str, Any]) -> None:
    assert last(f"FROM busybox\n{line}\n").run["Healthcheck"] == expected


def test_maintainer_sets_the_author_as_written() -> None:
    out = last("FROM busybox\nMAINTAINER Ann $NAME <ann@example.com>\n")
    assert out.author == "Ann $NAME <ann@example.com>"
    assert "author" not in out.image_run()


def test_build_only_instructions_are_not_commit_changes() -> None:
    added = BUILD_CONFIG_INSTRUCTIONS - CONFIG_INSTRUCTIONS
    assert added == {"ARG", "SHELL", "HEALTHCHECK", "MAINTAINER"}
    with pytest.raises(ImageError, match=r"changes\[0\]: ARG cannot be a commit change"):
        parse_changes(["ARG X=1"])


# --- RUN -----------------------------------------------------------------------------------

def run_args(text: str, **kwargs: Any) -> buildplan.RunArgs:
    config = last(text, **kwargs)
    return config.run_args(config.stage.instructions[-1])


def test_run_exec_and_shell_forms() -> None:
    assert run_args('FROM busybox\nRUN ["echo", "$HOME"]\n').argv == ("echo", "$HOME")
    args = run_args("FROM busybox\nRUN --network=none echo \"$HOME\" \\\n  && true\n")
    assert args.argv == ("/bin/sh", "-c", 'echo "$HOME"   && true')
    assert args.network == "none"
    assert run_args("FROM busybox\nRUN --network=default x\n").network == "default"


def test_run_heredocs() -> None:
    alone = run_args("FROM busybox\nRUN <<EOF\necho a\necho b\nEOF\n")
    assert alone.argv == ("/bin/sh", "-c", "echo a\necho b\n")
    chomped = run_args("FROM busybox\nRUN <<-EOF\n\techo a\n\tEOF\n")
    assert chomped.argv == ("/bin/sh", "-c", "echo a\n")
    fed = run_args("FROM busybox\nRUN python3 <<EOF > /out\nprint(1)\nEOF\n")
    assert fed.argv == ("/bin/sh", "-c", "python3 <<EOF > /out\nprint(1)\nEOF")
    two = run_args("FROM busybox\nRUN cat <<A <<B\na\nA\nb\nB\n")
    assert two.argv[-1] == "cat <<A <<B\na\nA\nb\nB"


# --- COPY and ADD --------------------------------------------------------------------------

def copy_args(text: str, **kwargs: Any) -> buildplan.CopyArgs:
    config = last(text, **kwargs)
    return config.copy_args(config.stage.instructions[-1])


def test_copy_expands_sources_dest_and_flags() -> None:
    c = copy_args("FROM busybox\nARG D=/srv U=app\nENV F=main.py\n"
                  "COPY --chown=$U:staff --chmod=0755 --link $F lib/*.py ${D}/\n")
    assert (c.sources, c.dest, c.chown, c.chmod, c.link) == (
        ("main.py", "lib/*.py"), "/srv/", "app:staff", 0o755, True)
    assert (c.from_, c.from_stage, c.inline) == (None, None, ())
    plain = copy_args("FROM busybox\nADD --link=false app.tar.gz /\n")
    assert (plain.sources, plain.dest, plain.chown, plain.chmod, plain.link) == (
        ("app.tar.gz",), "/", None, None, False)


def test_copy_takes_paths_that_only_look_like_git_sources() -> None:
    c = copy_args("FROM busybox\nCOPY github.com/org/app git@x /src/\n")
    assert c.sources == ("github.com/org/app", "git@x")


def test_copy_json_form() -> None:
    c = copy_args('FROM busybox\nENV D=/data\nCOPY ["my file", "b", "$D/"]\n')
    assert (c.sources, c.dest) == (("my file", "b"), "/data/")


def test_copy_heredocs_become_inline_files() -> None:
    c = copy_args("FROM busybox\nARG WHO=you\n"
                  "COPY <<EOF <<'RAW' <<-TABS /etc/\nhi \"$WHO\" \\$x\nEOF\nkeep $WHO\nRAW\n"
                  "\tindented $WHO\n\tTABS\n")
    assert c.inline == (("EOF", 'hi "you" $x\n'), ("RAW", "keep $WHO\n"),
                        ("TABS", "indented you\n"))
    assert c.sources == () and c.dest == "/etc/"


@pytest.mark.parametrize(("line", "fragment"), [
    ("COPY a b /dest", "copies several sources, so the destination '/dest' must be a "
                       "directory ending in '/', as /dest/"),
    ("COPY <<EOF a /f\nx\nEOF", "copies several sources"),
    ("COPY onlyone", "needs a source and a destination, such as COPY app.py /app/"),
    ("ADD https://example.com/x.tgz /x", "https://example.com/x.tgz is a remote source, "
                                         "which needs the network"),
    ("ADD git@github.com:a/b.git /src", "is a remote source"),
    ("ADD github.com/moby/moby /src", "is a remote source"),
    ("COPY http://example.com/x /x", "cannot fetch http://example.com/x: COPY copies"),
    ("ADD --from=build a b", "ADD: takes no --from; use COPY --from"),
    ("ADD --checksum=sha256:00 a b", "--checksum is for remote sources"),
    ("ADD --keep-git-dir a b", "--keep-git-dir is for git sources"),
    ("COPY --parents a/b /c/", "--parents is not supported by this builder yet"),
    ("COPY --exclude=*.md . /c/", "--exclude is not supported by this builder yet"),
    ("COPY --chmod=u+x a b", "--chmod=u+x is not a mode; write octal"),
    ("COPY --chmod=17777 a b", "--chmod=17777 is not a mode"),
    ("COPY --link=maybe a b", "--link=maybe is not true or false"),
    ("COPY --from a b", "the flag --from needs a value"),
    ("COPY --chown=1 --chown=2 a b", "the flag --chown is given twice"),
    ("COPY --own=1 a b", "unknown flag '--own': COPY takes --from, --chown, --chmod, "
                         "--exclude, --link, --parents"),
    ('COPY "my file" /dest/', "a double quote is not closed"),
    ('COPY "my file" /dest/', 'write the JSON form, as COPY ["my file", "/dest/"]'),
    ("COPY $UNSET /dest/", "the source '$UNSET' is empty once expanded"),
    ("COPY a $UNSET", "the destination '$UNSET' is empty once expanded"),
    ("COPY --from=$UNSET a b", "--from=$UNSET is empty once expanded"),
    ("COPY --from=Bad:Ref a b", "--from=Bad:Ref names no stage, and"),
])
def test_copy_and_add_errors(line: str, fragment: str) -> None:
    message = refused(f"FROM busybox AS first\n{line}\n")
    assert message.startswith(f"Dockerfile:2: {line.split()[0]}: ")
    assert fragment in message


# --- ONBUILD triggers -------------------------------------------------------------------

def test_onbuild_triggers_of_a_base_image_run_first_at_the_from_line() -> None:
    run = {**BASE, "OnBuild": ["ENV FROM_TRIGGER=1", "COPY --chown=1:1 . /app"]}
    p = make("FROM busybox\nRUN x\n")
    config = p.stages[0].config(run)
    found = config.triggers()
    assert [(i.keyword, i.node.start_line) for i in found] == [("ENV", 1), ("COPY", 1)]
    assert found[1].where == "Dockerfile:1: ONBUILD trigger 2 of the base image"
    assert "OnBuild" not in config.run  # consumed: the new image does not pass them on
    assert config.copy_args(found[1]).chown == "1:1"


def test_a_stage_from_a_stage_runs_its_onbuild_instructions() -> None:
    done = walk("FROM busybox AS base\nONBUILD ENV LATE=1\nFROM base\n")
    assert done[0].run["OnBuild"] == ["ENV LATE=1"]
    assert "LATE=1" in done[1].run["Env"] and "OnBuild" not in done[1].run


@pytest.mark.parametrize(("triggers", "fragment"), [
    (["FROM busybox"], "ONBUILD trigger 1 of the base image: FROM is not allowed"),
    (["ENV A=1", "MAINTAINER me"], "ONBUILD trigger 2 of the base image: MAINTAINER"),
    (["RUN a\nRUN b"], "holds 2 instructions, not one"),
    ("RUN x", "not a list of instructions"),
])
def test_bad_triggers(triggers: Any, fragment: str) -> None:
    message = refused("FROM busybox\n", run={**BASE, "OnBuild": triggers})
    assert message.startswith("Dockerfile:1") and fragment in message


# --- the config a stage starts from --------------------------------------------------------

def test_a_stage_on_scratch_or_an_image_without_path_gets_path() -> None:
    p = make("FROM scratch\n")
    assert p.stages[0].config(None).run == {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    base = {"Env": ["A=1"]}
    assert p.stages[0].config(base).run["Env"][0] == "A=1" and base == {"Env": ["A=1"]}


def test_image_run_is_a_copy() -> None:
    config = last("FROM busybox\nENV A=1\n")
    snapshot = config.image_run()
    config.apply(make("FROM busybox\nENV A=2\n").stages[0].instructions[0])
    assert "A=1" in snapshot["Env"] and "A=2" in config.run["Env"]


# --- directives, continuations, comments -------------------------------------------------

def test_escape_directive_continuations_and_comments() -> None:
    text = ("# syntax=docker/dockerfile:1.7\n# escape=`\n\nFROM busybox\n# a comment\n"
            "ENV W=C:\\dir `\n  # a comment inside\n  X=1\nRUN echo `\n  two\n")
    p = make(text)
    assert p.warnings == ()
    config = last(text)
    assert env_of(config)["W"] == "C:\\dir" and env_of(config)["X"] == "1"
    run = config.stage.instructions[-1]
    assert run.where == "Dockerfile:9"
    assert config.run_args(run).argv == ("/bin/sh", "-c", "echo   two")


def test_a_foreign_syntax_frontend_is_warned_about() -> None:
    assert make("# syntax=example.com/my/frontend:2\nFROM busybox\n").warnings == (
        "Dockerfile: the syntax directive asks for the frontend "
        "'example.com/my/frontend:2', which this builder does not run: it reads the "
        "Dockerfile as docker/dockerfile:1 does",)
    assert make("# syntax=docker.io/docker/dockerfile:1@sha256:" + "a" * 64 +
                "\nFROM busybox\n").warnings == ()


# --- normal forms (cache keys) -----------------------------------------------------------

def forms(text: str, **kwargs: Any) -> list[str]:
    """The normal form of each instruction of the last stage, taken before it applies."""
    p = make(text, **kwargs)
    config = p.stages[-1].config(BASE)
    out = []
    for ins in p.stages[-1].instructions:
        out.append(config.normal_form(ins))
        if ins.keyword not in ("RUN", "COPY", "ADD"):
            config.apply(ins)
    return out


def test_normal_forms() -> None:
    text = ("FROM busybox\nARG V=1 W\nENV E=\"a b\" F=$V\nRUN echo $V\n"
            "RUN --network=none [\"echo\", \"$V\"]\nCOPY --chmod=755 <<EOF x $E/\nhi\nEOF\n"
            "CMD serve --port 80\nHEALTHCHECK --retries=2 CMD [\"check\"]\n")
    assert forms(text) == [
        "ARG V=1 W",
        'ENV E="a b" F=1',
        'RUN |1 V=1 ["/bin/sh", "-c", "echo $V"]',
        'RUN --network=none |1 V=1 ["echo", "$V"]',
        "COPY --chmod=0755 x <<EOF@sha256:"
        "98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4 \"a b/\"",
        'CMD "serve --port 80"',
        'HEALTHCHECK --retries=2 ["CMD", "check"]',
    ]
    changed = forms(text, args={"V": "2"})
    assert changed[2] == 'RUN |1 V=2 ["/bin/sh", "-c", "echo $V"]'
    # An ENV of the same name hides the ARG: the Env is in the parent's config already.
    assert forms("FROM busybox\nARG HOME=/x\nRUN y\n")[-1] == 'RUN ["/bin/sh", "-c", "y"]'


def test_normal_forms_tell_exec_and_text_forms_apart() -> None:
    cmd = forms('FROM busybox\nCMD ["a b"]\nCMD a b\nENTRYPOINT ["x"]\nENTRYPOINT x\n')
    assert len(set(cmd)) == 4
    run = forms('FROM busybox\nRUN ["a b"]\nRUN ["a", "b"]\n')
    assert run == ['RUN ["a b"]', 'RUN ["a", "b"]']


# --- errors name the line and the instruction --------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("", "Dockerfile: file with no instructions"),
    ("# just a comment\n", "Dockerfile: file with no instructions"),
    ("ARG A=1\n", "Dockerfile: has no FROM; a Dockerfile needs at least one stage"),
    ("ARG A=1\nENV B=2\nFROM busybox\n", "Dockerfile:2: ENV comes before the first FROM"),
    ("FROM busybox\n\nENV A\n", "Dockerfile:3: ENV must have two arguments"),
    ("FROM busybox\nLABEL a=1 \\\n  b\nRUN x\n", "Dockerfile:3: Syntax error"),
    ("FROM busybox\nRUN <<EOF\necho\nEOF\nRUN <<END\nnever ends\n",
     "Dockerfile:5: unterminated heredoc"),
    ("# escape=x\nFROM busybox\n", "Dockerfile:1: invalid escape token"),
    ("FROM busybox\nGARBAGE in\n", "Dockerfile:2: 'GARBAGE' is not a Dockerfile instruction; "),
    (f"FROM busybox\nLABEL a={'x' * 70000}\n", "Dockerfile:2 is 70008 bytes, over the parser"),
    ("FROM busybox AS 1st\n", "Dockerfile:1: FROM: '1st' is not a stage name"),
    ("FROM busybox AS a\nFROM alpine AS A\n",
     "Dockerfile:2: FROM: the stage name 'a' is taken by the stage at line 1"),
    ("FROM busybox AS\n", "Dockerfile:1: FROM: takes an image and an optional name"),
    ("FROM a b c d\n", "Dockerfile:1: FROM: takes an image"),
    ("FROM $UNSET\n", "Dockerfile:1: FROM: the image '$UNSET' is empty once expanded"),
    ("FROM Busy:Box\n", "Dockerfile:1: FROM: invalid image reference 'Busy:Box'"),
    ("FROM --platform=linux busybox\n", "Dockerfile:1: FROM: --platform: platform 'linux'"),
    ("FROM --plat=x busybox\n", "Dockerfile:1: FROM: unknown flag '--plat': FROM takes "
                                "--platform"),
    ("FROM busybox\nCOPY --from=1 a b\n",
     "Dockerfile:2: COPY: --from=1: there is no stage 1"),
    ("FROM busybox AS me\nCOPY --from=me a b\n", "Dockerfile:2: COPY: --from=me names this "
                                                 "stage"),
    ("FROM busybox\nRUN --mount=type=cache,target=/c make\n",
     "Dockerfile:2: RUN: --mount is not supported by this builder yet; copy the files in "
     "with COPY"),
    ("FROM busybox\nRUN --network=host make\n", "Dockerfile:2: RUN: --network=host is not"),
    ("FROM busybox\nRUN --security=insecure make\n", "Dockerfile:2: RUN: --security is not"),
    ("FROM busybox\nRUN []\n", "Dockerfile:2: RUN: has no command"),
    ("FROM busybox\nRUN\n", "Dockerfile:2: RUN: needs a command"),
    ("FROM busybox\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\n",
     "Dockerfile:2: RUN: a heredoc starting with #! runs as a script file"),
    ("FROM busybox\nARG\n", "Dockerfile:2: ARG: needs a name"),
    ("FROM busybox\nARG =x\n", "Dockerfile:2: ARG: '=x' has no name"),
    ("ARG V=${NOPE:?set NOPE}\nFROM busybox\n", "Dockerfile:1: ARG: cannot expand"),
    ("FROM busybox\nSHELL /bin/bash -c\n", "Dockerfile:2: SHELL: takes the JSON form only"),
    ("FROM busybox\nSHELL []\n", "Dockerfile:2: SHELL: needs the shell at least"),
    ("FROM busybox\nMAINTAINER\n", "Dockerfile:2: MAINTAINER: needs the author"),
    ("FROM busybox\nHEALTHCHECK\n", "Dockerfile:2: HEALTHCHECK: needs CMD and a command"),
    ("FROM busybox\nHEALTHCHECK RUN x\n", "Dockerfile:2: HEALTHCHECK: needs CMD"),
    ("FROM busybox\nHEALTHCHECK CMD\n", "Dockerfile:2: HEALTHCHECK: needs a command after"),
    ("FROM busybox\nHEALTHCHECK NONE x\n", "Dockerfile:2: HEALTHCHECK: NONE takes no"),
    ("FROM busybox\nHEALTHCHECK --interval=5s NONE\n", "NONE takes no arguments or flags"),
    ("FROM busybox\nHEALTHCHECK --interval=5 CMD x\n",
     "Dockerfile:2: HEALTHCHECK: --interval='5' is not a duration; write e.g. 30s"),
    ("FROM busybox\nHEALTHCHECK --timeout=1us CMD x\n", "--timeout=1us is out of range"),
    ("FROM busybox\nHEALTHCHECK --timeout=-1s CMD x\n", "--timeout=-1s is out of range"),
    ("FROM busybox\nHEALTHCHECK --retries=-1 CMD x\n", "--retries cannot be negative (-1)"),
    ("FROM busybox\nHEALTHCHECK --retries=x CMD x\n", "--retries='x' is not a count"),
    ("FROM busybox\nHEALTHCHECK --every=1s CMD x\n", "unknown flag '--every': HEALTHCHECK "
                                                     "takes --interval, --timeout"),
    ("FROM busybox\nENV --x=1 A=1\n", "Dockerfile:2: ENV takes no flags"),
    ("FROM busybox\nWORKDIR $UNSET\n", "Dockerfile:2: WORKDIR: the directory is empty"),
])
def test_errors_name_the_line_and_the_instruction(text: str, message: str) -> None:
    assert message in refused(text)


def test_a_long_dockerfile_keeps_the_parser_error_without_its_line() -> None:
    text = "FROM busybox\n" + "RUN true\n" * 8000 + "ENV A\n"
    assert refused(text) == "Dockerfile: ENV must have two arguments"


def test_copy_from_a_later_stage() -> None:
    text = "FROM busybox\nCOPY --from=later a b\nFROM busybox AS later\n"
    assert refused(text, target="0").startswith(
        "Dockerfile:2: COPY: --from=later names the stage at line 3; a stage copies only "
        "from the stages above it (or from an image)")


def test_a_target_of_an_unneeded_bad_stage_still_fails_only_when_built() -> None:
    text = "FROM busybox AS bad\nRUN --mount=x y\nFROM busybox\nRUN ok\n"
    assert [s.index for s in make(text).stages] == [1]
    with pytest.raises(ImageError, match="Dockerfile:2: RUN: --mount"):
        make(text, target="bad")


def test_the_parser_is_loaded_only_when_a_dockerfile_is_read() -> None:
    import subprocess
    import sys
    code = ("import sys; from sandbox.images import buildplan; "
            "print('dockerfile' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
