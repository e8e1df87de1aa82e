"""A Dockerfile as a build plan, and what each of its instructions asks of the builder.

`plan` reads the text once (BuildKit's parser, through instructions.parse): the parser
directives, the global ARGs before the first FROM, the stages, the target and the stages
it needs (its FROM chain and COPY --from), each after those it needs, and the step count
(FROM is a step, as in Docker's numbering). The builder (sandbox/engine/builder.py) walks
`plan.stages`. A stage's `StageConfig` (`stage.config(...)` on an image or scratch,
`parent.copy_for(stage)` on an earlier stage) holds the config object, ARGs and author as
instructions change them, and says what a RUN runs (`run_args`), what a COPY or ADD
copies (`copy_args`), which ONBUILD triggers of the base run first (`triggers`) and each
step's normal form (`normal_form`: its cache key and history text).

As Docker documents and BuildKit does: ARGs are scoped to their stage, and a stage FROM an
earlier one starts with that one's ARGs; the automatic platform ARGs are global, and a
stage sees them once it declares them. Beyond BuildKit, `COPY --from` expands the stage's
ARG values, as buildah does. Errors name the line ("Dockerfile:7") and the instruction.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sandbox.errors import ImageError, InvalidReference
from sandbox.images import reference, shellwords
from sandbox.images.instructions import (
    DEFAULT_SHELL,
    ArgScope,
    ConfigState,
    Instruction,
    directives,
    flag_values,
    parse,
)
from sandbox.images.manifest import Platform

_STAGE_NAME = re.compile(r"[a-z][a-z0-9-_.]*")
_FRONTEND = re.compile(r"(?:docker\.io/)?docker/dockerfile(?:-upstream)?(?::[\w.-]+)?"
                       r"(?:@sha256:[0-9a-f]{64})?")
_HEREDOC = re.compile(r"[0-9]*<<(?P<chomp>-?)\s*(?P<quote>['\"]?)(?P<name>[^\s'\"<]+)"
                      r"(?P=quote)")
_LEADING_TABS = re.compile(r"^\t+", re.MULTILINE)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_GIT = re.compile(r"git@|github\.com/")   # what ADD, as Docker, also takes for a git source
_PLAIN = re.compile(r"[\w./:@%+,~^-]+")
_JSON_HINT = '; to name a path with spaces, write the JSON form, as {} ["my file", "/dest/"]'
_DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_EXPANDED = frozenset({"ENV", "LABEL", "EXPOSE", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"})
# The flags each instruction takes (valued, then switches), and those refused, saying why.
_FLAGS = {"RUN": (("network", "mount", "security"), ()),
          "COPY": (("from", "chown", "chmod", "exclude"), ("link", "parents")),
          "ADD": (("chown", "chmod", "from", "exclude", "checksum"), ("link", "keep-git-dir"))}
_NOT_YET = "is not supported by this builder yet; "
_OFFLINE = "sources, which need the network this builder does not have; put the file"
_REFUSED = {
    "mount": f"--mount {_NOT_YET}copy the files in with COPY",
    "security": "--security is not supported: a build's RUN has the build policy's "
                "privileges, no more",
    "parents": f"--parents {_NOT_YET}copy each directory with a COPY of its own",
    "exclude": f"--exclude {_NOT_YET}leave the files out with .dockerignore, or name only "
               "those to copy",
    "checksum": f"--checksum is for remote {_OFFLINE} in the build context",
    "keep-git-dir": f"--keep-git-dir is for git {_OFFLINE}s in the build context",
    "from": "takes no --from; use COPY --from=<stage or image> to copy from one",
}
_REFUSED_BY = {"RUN": ("mount", "security"), "COPY": ("parents", "exclude"),
               "ADD": ("exclude", "checksum", "keep-git-dir", "from")}


def automatic_args(target: Platform, build: Platform) -> dict[str, str]:
    """BuildKit's automatic platform ARGs: TARGETPLATFORM, TARGETOS, ... BUILDVARIANT."""
    out = {}
    for prefix, platform in (("TARGET", target), ("BUILD", build)):
        out.update({f"{prefix}PLATFORM": str(platform), f"{prefix}OS": platform.os,
                    f"{prefix}ARCH": platform.architecture,
                    f"{prefix}VARIANT": platform.variant or ""})
    return out


@dataclass
class _Build:
    """What the stages of one build share: the ARG scope, each stage's FROM line, the
    stage names, and which stages the target needs (known once every stage is read)."""

    scope: ArgScope
    lines: list[int] = field(default_factory=list)
    names: dict[str, int] = field(default_factory=dict)
    needed: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Stage:
    index: int                       # its place in the Dockerfile: what COPY --from=N names
    name: str | None                 # lower case
    base: str                        # an image reference, "scratch", or an earlier stage
    base_stage: int | None           # FROM an earlier stage: its index
    platform: Platform | None        # FROM --platform, expanded (None: the build's)
    line: int                        # FROM's line
    where: str                       # FROM's place in errors: "Dockerfile:3"
    text: str                        # FROM as written
    instructions: tuple[Instruction, ...]   # those after FROM
    build: _Build = field(repr=False, compare=False)

    def config(self, run: Mapping[str, Any] | None) -> StageConfig:
        """The config of this stage on an image: that image's config object (None:
        scratch), with PATH set if it has none, as BuildKit does."""
        state = ConfigState(copy.deepcopy(dict(run or {})), scope=self.build.scope)
        env = state.run["Env"] = list(state.run.get("Env") or ())
        if not any(entry.startswith("PATH=") for entry in env):
            env.append(_DEFAULT_PATH)
        return StageConfig(self, state, state.run.pop("OnBuild", None))


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]        # those the target needs, each after those it needs
    target: int                      # the target's index (the last of `stages`)
    steps: int                       # FROM and each instruction of the stages built
    unused_args: tuple[str, ...]     # build args no ARG of them (nor a global ARG) declares
    warnings: tuple[str, ...]        # e.g. a syntax directive naming another frontend


@dataclass(frozen=True)
class RunArgs:
    argv: tuple[str, ...]            # to exec: the exec form, or SHELL + the text
    network: str                     # "none" (asked for) or "default" (the build policy's)


@dataclass(frozen=True)
class CopyArgs:
    sources: tuple[str, ...]         # expanded; wildcards are the builder's to match
    dest: str                        # expanded; relative to WorkingDir
    from_: str | None                # --from as expanded (None: the build context)
    from_stage: int | None           # the stage it names (None: an image to pull)
    chown: str | None                # user[:group], resolved in the image by the builder
    chmod: int | None
    link: bool                       # accepted, no effect: every copy makes its own layer
    inline: tuple[tuple[str, str], ...]     # heredoc sources: (file name, content)


def plan(source: str, *, build_args: Mapping[str, str], target: str | None,
         platform: Platform, build_platform: Platform, where: str = "Dockerfile") -> Plan:
    """The stages to build for `target` (a stage name or index; None: the last stage)."""
    found = parse(source, where, numbered=True)
    automatic = {k: build_args.get(k, v)
                 for k, v in automatic_args(platform, build_platform).items()}
    build_args = dict(build_args)
    head = ConfigState({}, args=dict(automatic), scope=ArgScope(build_args, automatic))
    drafts: list[tuple[Instruction, list[Instruction]]] = []
    declared = set(automatic)
    for ins in found:
        if ins.keyword == "FROM":
            drafts.append((ins, []))
        elif drafts:
            drafts[-1][1].append(ins)
        elif ins.keyword == "ARG":
            head.apply(ins)
            declared.update(_arg_names(ins))
        else:
            raise ImageError(f"{ins.where}: {ins.keyword} comes before the first FROM, where "
                             "only ARG may (a build arg for FROM lines); move it into a stage")
    if not drafts:
        raise ImageError(f"{where}: has no FROM; a Dockerfile needs at least one stage, "
                         "such as 'FROM busybox'")
    build = _Build(ArgScope(build_args, dict(head.args)))
    stages = [_stage(ins, body, head.args, build) for ins, body in drafts]
    chosen = _target(target, build.names, len(stages))
    build.needed = _needed(stages, chosen)
    needed = [s for s in stages if s.index in build.needed]
    declared.update(name for stage in needed for ins in stage.instructions
                    if ins.keyword == "ARG" for name in _arg_names(ins))
    return Plan(tuple(needed), chosen, sum(1 + len(s.instructions) for s in needed),
                tuple(sorted(set(build_args) - declared)), _syntax_warnings(source, where))


def _arg_names(ins: Instruction) -> list[str]:
    return [text.partition("=")[0] for text in ins.node.value]


def _stage(ins: Instruction, body: list[Instruction], head: Mapping[str, str],
           build: _Build) -> Stage:
    """The stage FROM `ins` opens, its name and base (with the global ARGs) checked."""
    index = len(build.lines)
    flags = _flags(ins, ("platform",))
    values = ins.node.value
    name = None
    if len(values) == 3 and values[1].lower() == "as":
        name = values[2].lower()
        if not _STAGE_NAME.fullmatch(name):
            raise _fail(ins, f"{values[2]!r} is not a stage name: it starts with a letter, "
                             "then letters, digits, '-', '_' or '.'")
        if name in build.names:
            raise _fail(ins, f"the stage name {name!r} is taken by the stage at line "
                             f"{build.lines[build.names[name]]}; give each its own name")
    elif len(values) != 1:
        raise _fail(ins, "takes an image and an optional name: FROM [--platform=...] image "
                         "[AS name]")
    image = _word(ins, values[0], head)
    if not image:
        raise _fail(ins, f"the image {values[0]!r} is empty once expanded: give its ARG a "
                         "default or pass the build arg")
    base_stage = build.names.get(image.lower())
    if base_stage is None and image != "scratch":
        _check_reference(ins, image, "")
    platform = None
    if "platform" in flags:
        try:
            platform = Platform.parse(_word(ins, flags["platform"] or "", head))
        except ImageError as e:
            raise _fail(ins, f"--platform: {e}") from None
    build.lines.append(ins.node.start_line)
    if name is not None:
        build.names[name] = index
    return Stage(index, name, image, base_stage, platform, ins.node.start_line, ins.where,
                 ins.node.original, tuple(body), build)


def _target(target: str | None, names: Mapping[str, int], count: int) -> int:
    if target is None:
        return count - 1
    if target.lower() in names:
        return names[target.lower()]
    if target.isascii() and target.isdigit() and int(target) < count:
        return int(target)
    listed = ", ".join(names) or "none: no stage has a name"
    raise ImageError(f"target {target!r} is not a stage of the Dockerfile; its stage names "
                     f"are {listed} (or give an index from 0 to {count - 1})")


def _needed(stages: list[Stage], chosen: int) -> frozenset[int]:
    """The target and every stage it needs through FROM and COPY --from (the RUN, COPY and
    ADD of these checked on the way, so a bad flag fails before any step runs)."""
    needed: set[int] = set()
    finals: dict[int, dict[str, str]] = {}
    todo = [chosen]
    while todo:
        index = todo.pop()
        if index in needed:
            continue
        needed.add(index)
        stage = stages[index]
        if stage.base_stage is not None:
            todo.append(stage.base_stage)
        for position, ins in enumerate(stage.instructions):
            if ins.keyword == "RUN":
                _run_flags(ins)
            elif ins.keyword in ("COPY", "ADD") and (
                    text := _copy_flags(ins).get("from")) is not None:
                args = _plan_args(stages, index, position, finals) if "$" in text else {}
                source = _source(ins, _from_text(ins, text, args), stage)
                if isinstance(source, int):
                    todo.append(source)
    return frozenset(needed)


def _plan_args(stages: list[Stage], index: int, upto: int,
               finals: dict[int, dict[str, str]]) -> dict[str, str]:
    """A stage's ARG values before its instruction `upto`, as the build will have them (the
    ARGs the stage it is FROM ended with, then its own), for a COPY --from to expand.
    `finals` keeps each stage's last values: a long FROM chain is walked once."""
    chain = []
    parent = stages[index].base_stage
    while parent is not None and parent not in finals:
        chain.append(parent)
        parent = stages[parent].base_stage
    for above in reversed(chain):
        finals[above] = _stage_args(stages, above, len(stages[above].instructions), finals)
    return _stage_args(stages, index, upto, finals)


def _stage_args(stages: list[Stage], index: int, upto: int,
                finals: Mapping[int, dict[str, str]]) -> dict[str, str]:
    stage = stages[index]
    state = ConfigState({}, scope=stage.build.scope, args={} if stage.base_stage is None
                        else dict(finals[stage.base_stage]))
    for ins in stage.instructions[:upto]:
        if ins.keyword == "ARG":
            state.apply(ins)
    return state.args


def _from_text(ins: Instruction, text: str, args: Mapping[str, str]) -> str:
    value = _word(ins, text, args)
    if not value:
        raise _fail(ins, f"--from={text} is empty once expanded; name a stage or an image")
    return value


def _source(ins: Instruction, text: str, stage: Stage) -> int | str:
    """What COPY --from names: an earlier stage's index (by name or number), or an image."""
    lines = stage.build.lines
    index = int(text) if text.isascii() and text.isdigit() else stage.build.names.get(
        text.lower())
    if index is None:
        _check_reference(ins, text, f"--from={text} names no stage, and ")
        return text
    if index >= len(lines):
        raise _fail(ins, f"--from={text}: there is no stage {index}; the Dockerfile's are "
                         f"0 to {len(lines) - 1}")
    if index >= stage.index:
        what = "this stage" if index == stage.index else f"the stage at line {lines[index]}"
        raise _fail(ins, f"--from={text} names {what}; a stage copies only from the stages "
                         "above it (or from an image)")
    return index


def _check_reference(ins: Instruction, text: str, prefix: str) -> None:
    try:
        reference.parse(text)
    except InvalidReference as e:
        raise _fail(ins, f"{prefix}{e}") from None


def _syntax_warnings(source: str, where: str) -> tuple[str, ...]:
    syntax = directives(source).get("syntax")
    if syntax is None or _FRONTEND.fullmatch(syntax):
        return ()
    return (f"{where}: the syntax directive asks for the frontend {syntax!r}, which this "
            "builder does not run: it reads the Dockerfile as docker/dockerfile:1 does",)


@dataclass
class StageConfig:
    """A stage's config as its instructions change it (instructions.ConfigState: the config
    object, the ARGs in scope, the author), and what the builder asks of each instruction."""

    stage: Stage
    state: ConfigState
    onbuild: Any                     # the base's ONBUILD triggers (its config's OnBuild)

    @property
    def run(self) -> dict[str, Any]:
        return self.state.run

    @property
    def author(self) -> str | None:
        return self.state.author

    def apply(self, ins: Instruction) -> None:
        """One of instructions.BUILD_CONFIG_INSTRUCTIONS, applied."""
        self.state.apply(ins)

    def run_env(self) -> list[str]:
        return self.state.run_env()

    def image_run(self) -> dict[str, Any]:
        """The config object to write into an image (a copy: later steps go on)."""
        return copy.deepcopy(self.state.run)

    def copy_for(self, stage: Stage) -> StageConfig:
        """The config of `stage`, FROM this one: this one's as it ended, ARGs and author
        too (as BuildKit carries them); this one's ONBUILD instructions are its triggers."""
        state = ConfigState(copy.deepcopy(self.state.run), args=dict(self.state.args),
                            author=self.state.author, scope=self.state.scope)
        return StageConfig(stage, state, state.run.pop("OnBuild", None))

    def triggers(self) -> tuple[Instruction, ...]:
        """The base's ONBUILD triggers (its config's OnBuild), to run before the stage's own
        instructions: each at the FROM's line, its errors naming the FROM and the trigger."""
        texts, where = self.onbuild, self.stage.where
        if not texts:
            return ()
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ImageError(f"{where}: FROM: the base image's ONBUILD triggers are not a "
                             "list of instructions; rebuild the base image")
        out = []
        for number, text in enumerate(texts, 1):
            at = f"{where}: ONBUILD trigger {number} of the base image"
            found = parse(text, at)
            if len(found) != 1:
                raise ImageError(f"{at}: holds {len(found)} instructions, not one")
            if found[0].keyword in ("FROM", "ONBUILD", "MAINTAINER"):
                raise ImageError(f"{at}: {found[0].keyword} is not allowed as an ONBUILD "
                                 "trigger")
            line = self.stage.line
            out.append(dataclasses.replace(found[0], node=found[0].node._replace(
                start_line=line, end_line=line)))
        return tuple(out)

    def run_args(self, ins: Instruction) -> RunArgs:
        network = _run_flags(ins)
        node = ins.node
        if node.json:
            if not node.value:
                raise _fail(ins, 'has no command; write RUN ["executable", "arg"] or RUN '
                                 "command")
            return RunArgs(tuple(node.value), network)
        text = node.value[0] if node.value else ""
        if node.heredocs:
            text = _run_heredoc(ins, text)
        if not text.strip():
            raise _fail(ins, "needs a command, such as RUN make")
        return RunArgs((*(self.state.run.get("Shell") or DEFAULT_SHELL), text), network)

    def copy_args(self, ins: Instruction) -> CopyArgs:
        flags = _copy_flags(ins)
        node = ins.node
        env = self.state.env()
        docs = {doc.name: doc.content for doc in node.heredocs}
        sources, inline = [], []
        for text in node.value[:-1]:
            heredoc = None if node.json else _HEREDOC.fullmatch(text)
            if heredoc is not None and heredoc["name"] in docs:
                inline.append((heredoc["name"], _heredoc(ins, heredoc, docs, env)))
                continue
            src = _word(ins, text, env, hint=_JSON_HINT.format(ins.keyword))
            if not src:
                raise _fail(ins, f"the source {text!r} is empty once expanded")
            if _URL.match(src) or (ins.keyword == "ADD" and _GIT.match(src)):
                raise _fail(ins, f"{src} is a remote source, which needs the network this "
                                 "builder does not have; put the file in the build context"
                            if ins.keyword == "ADD" else
                            f"cannot fetch {src}: COPY copies from the build context, a "
                            "stage or an image; put the file in the build context")
            sources.append(src)
        if not node.json and docs and _HEREDOC.fullmatch(node.value[-1]):
            raise _fail(ins, "the destination cannot be a heredoc; name a path")
        dest = _word(ins, node.value[-1], env, hint=_JSON_HINT.format(ins.keyword))
        if not dest:
            raise _fail(ins, f"the destination {node.value[-1]!r} is empty once expanded")
        if len(sources) + len(inline) > 1 and not dest.endswith("/"):
            raise _fail(ins, f"copies several sources, so the destination {dest!r} must be a "
                             f"directory ending in '/', as {dest}/")
        from_ = from_stage = None
        if (written := flags.get("from")) is not None:
            from_ = _from_text(ins, written, self.state.args)
            source = _source(ins, from_, self.stage)
            if isinstance(source, int):
                if source not in self.stage.build.needed:
                    raise _fail(ins, f"--from={from_} names a stage this build does not "
                                     "build (an ONBUILD trigger asks for it); build a target "
                                     "that needs that stage")
                from_stage = source
        chown = _word(ins, flags["chown"] or "", env) if "chown" in flags else ""
        chmod = _chmod(ins, _word(ins, flags["chmod"] or "", env)) if "chmod" in flags else None
        return CopyArgs(tuple(sources), dest, from_, from_stage, chown or None, chmod,
                        "link" in flags and (flags["link"] or "true").lower() == "true",
                        tuple(inline))

    def normal_form(self, ins: Instruction) -> str:
        """The step as its cache key and history text: keyword, flags and arguments as
        expanded (`RUN echo $X` differs with X), and for a RUN the ARG values it sees, as
        Docker keys it. Take it before applying the instruction."""
        node = ins.node
        if ins.keyword == "RUN":
            run = self.run_args(ins)
            env = {entry.partition("=")[0] for entry in self.state.run.get("Env") or ()}
            seen = [f"{k}={_token(v)}" for k, v in self.state.args.items() if k not in env]
            return "".join(["RUN", " --network=none" if run.network == "none" else "",
                            f" |{len(seen)} {' '.join(seen)}" if seen else "",
                            " ", json.dumps(run.argv, ensure_ascii=False)])
        if ins.keyword in ("COPY", "ADD"):
            c = self.copy_args(ins)
            flags = [f"--from={_token(c.from_)}" if c.from_ else "",
                     f"--chown={_token(c.chown)}" if c.chown else "",
                     f"--chmod={c.chmod:04o}" if c.chmod is not None else ""]
            words = [*map(_token, c.sources), *(
                f"<<{_token(name)}@sha256:{hashlib.sha256(content.encode()).hexdigest()}"
                for name, content in c.inline), _token(c.dest)]
            return " ".join([ins.keyword, *filter(None, flags), *words])
        if ins.keyword == "ARG":
            probe = ConfigState(self.state.run, args=dict(self.state.args),
                                scope=self.state.scope)
            probe.apply(ins)
            return " ".join(["ARG", *(f"{n}={_token(probe.args[n])}" if n in probe.args
                                      else n for n in _arg_names(ins))])
        if ins.keyword == "ONBUILD":
            return node.original  # kept as written, as it is stored
        values = node.value
        if ins.keyword in _EXPANDED:
            env = self.state.env()
            values = tuple(_word(ins, value, env) for value in values)
        if ins.keyword in ("ENV", "LABEL"):
            body = [f"{_token(k)}={_token(v)}" for k, v in zip(values[::2], values[1::2],
                                                               strict=True)]
        else:
            body = [json.dumps(values, ensure_ascii=False)] if node.json else [
                _token(value) for value in values]
        return " ".join([ins.keyword, *sorted(node.flags), *body])


def _fail(ins: Instruction, message: str) -> ImageError:
    return ImageError(f"{ins.where}: {ins.keyword}: {message}")


def _flags(ins: Instruction, names: tuple[str, ...],
           switches: tuple[str, ...] = ()) -> dict[str, str | None]:
    try:
        flags = flag_values(ins, names, switches)
    except ImageError as e:
        raise _fail(ins, str(e)) from None
    for name in _REFUSED_BY.get(ins.keyword, ()):
        if name in flags:
            raise _fail(ins, _REFUSED[name])
    return flags


def _run_flags(ins: Instruction) -> str:
    """RUN's network: "none" or "default" (other flags refused, saying why)."""
    network = _flags(ins, *_FLAGS["RUN"]).get("network") or "default"
    if network not in ("none", "default"):
        raise _fail(ins, f"--network={network} is not available: a build's RUN gets the "
                         "build policy's network at most; write --network=none or leave it "
                         "out")
    return network


def _copy_flags(ins: Instruction) -> dict[str, str | None]:
    """COPY's or ADD's flags, checked, and that it names a source and a destination."""
    flags = _flags(ins, *_FLAGS[ins.keyword])
    if (flags.get("link") or "true").lower() not in ("true", "false"):
        raise _fail(ins, f"--link={flags['link']} is not true or false")
    if len(ins.node.value) < 2:
        raise _fail(ins, f"needs a source and a destination, such as {ins.keyword} app.py "
                         "/app/")
    return flags


def _word(ins: Instruction, text: str, env: Mapping[str, str], escape: str = "",
          hint: str = "") -> str:
    try:
        return shellwords.word(text, env, escape or ins.escape)
    except ImageError as e:
        raise _fail(ins, f"{e}{hint}") from None


def _chmod(ins: Instruction, text: str) -> int:
    if not re.fullmatch(r"[0-7]{1,4}", text):
        raise _fail(ins, f"--chmod={text} is not a mode; write octal permission bits from 0 "
                         "to 7777, such as 644 or 0755")
    return int(text, 8)


def _heredoc(ins: Instruction, heredoc: re.Match[str], docs: Mapping[str, str],
             env: Mapping[str, str]) -> str:
    """A heredoc's content as BuildKit takes it: `<<-` strips leading tabs, and an unquoted
    name expands variables but keeps quotes, which are the file's, not the Dockerfile's."""
    content = docs[heredoc["name"]]
    if heredoc["chomp"]:
        content = _LEADING_TABS.sub("", content)
    if heredoc["quote"]:
        return content
    kept = re.sub(r"\\.|['\"]", lambda m: m[0] if len(m[0]) == 2 else "\\" + m[0], content,
                  flags=re.DOTALL)
    return _word(ins, kept, env, "\\")


def _run_heredoc(ins: Instruction, line: str) -> str:
    """The shell text of a RUN with heredocs: `RUN <<EOF` alone runs the body; otherwise
    the command and the bodies go to the shell, which reads the heredocs itself."""
    docs = ins.node.heredocs
    alone = _HEREDOC.fullmatch(line.strip())
    if alone is None or len(docs) != 1:
        return line + "".join(f"\n{doc.content}{doc.name}" for doc in docs)
    body = _LEADING_TABS.sub("", docs[0].content) if alone["chomp"] else docs[0].content
    if body.startswith("#!"):
        raise _fail(ins, "a heredoc starting with #! runs as a script file, which this "
                         "builder does not support yet; name the interpreter instead, as "
                         "RUN python3 <<EOF")
    return body


def _token(text: str) -> str:
    """A word of a normal form: as it is if plain, else quoted (JSON), so none is ambiguous."""
    return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=False)
