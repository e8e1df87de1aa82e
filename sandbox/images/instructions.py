"""Dockerfile instructions: parsed by BuildKit's own parser (the `dockerfile` package), and
the ones that only change the image config applied to it as Docker dispatches them.

`parse` gives `Instruction`s (continuations joined, the `escape` directive honoured, JSON
forms decoded, heredocs read). `ConfigState.apply` carries out CMD, ENTRYPOINT, ENV, EXPOSE,
LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME and WORKDIR on an image's "config" object: the
arguments are expanded against the Env of that moment (shellwords.py) where Docker does
(not CMD, ENTRYPOINT, ONBUILD), every argument of one instruction against the same Env. A
commit's changes (changes.py) use these; so will a build, with its own steps beside them.
"""

from __future__ import annotations

import copy
import functools
import posixpath
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from sandbox.errors import ImageError
from sandbox.images import shellwords
from sandbox.images.imageconfig import edit_run

if TYPE_CHECKING:
    import dockerfile

# The shell of CMD and ENTRYPOINT written as text, unless the config names one (SHELL).
DEFAULT_SHELL = ("/bin/sh", "-c")
MAX_LINE_BYTES = 65535  # BuildKit reads a Dockerfile with Go's default line scanner
_DIRECTIVE = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*")
_DIRECTIVES = frozenset({"syntax", "escape", "check"})
_ONBUILD = re.compile(r"^\s*ONBUILD\s*", re.IGNORECASE)
_PORT = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?(?:/([A-Za-z]*))?")
_PROTOCOLS = ("tcp", "udp", "sctp")
_SIGNALS = frozenset(
    [name.removeprefix("SIG") for name in signal.Signals.__members__]
    + [f"RTMIN+{i}" for i in range(1, 16)] + [f"RTMAX-{i}" for i in range(1, 15)])
_MAX_SIGNAL = 64
T = TypeVar("T", list[str], dict[str, Any])


def _parser() -> ModuleType:
    """BuildKit's parser, loaded on first use: it starts a Go runtime (five threads) in the
    process, which a service that never parses a Dockerfile line need not carry."""
    import dockerfile

    return dockerfile


@functools.cache
def _known() -> frozenset[str]:
    """Every instruction BuildKit knows, upper case."""
    return frozenset(c.upper() for c in _parser().all_cmds())


@dataclass(frozen=True)
class Instruction:
    keyword: str                # upper case: "CMD", "ENV", ...
    node: dockerfile.Command    # as BuildKit's parser gives it (values still quoted)
    escape: str                 # the escape character in force: \ or the directive's `
    where: str                  # how errors name it: "changes[2]" (a build: "Dockerfile:7")


def parse(source: str, where: str) -> tuple[Instruction, ...]:
    """The instructions of a Dockerfile text. Errors name `where` and say what to write.

    The parser holds the GIL (about 2.5 µs a byte on a 2-core host): callers bound the
    text they pass, or parse off the event loop in a process of its own."""
    escape = _escape_of(source)
    for number, line in enumerate(source.split("\n"), 1):
        size = len(line.encode("utf-8", "surrogatepass"))
        if size > MAX_LINE_BYTES:
            # The parser would drop the rest of the text without a word (Go's line scanner).
            raise ImageError(f"{where}: line {number} is {size} bytes, over the parser's "
                             f"limit of {MAX_LINE_BYTES}; split it with a trailing {escape}")
    parser = _parser()
    try:
        nodes = parser.parse_string(source)
    except parser.GoParseError as e:
        raise ImageError(f"{where}: {e}") from None
    out = []
    for node in nodes:
        keyword = node.cmd.upper()
        if keyword not in _known():
            line = f" (line {node.start_line})" if node.start_line > 1 else ""
            raise ImageError(f"{where}: {node.cmd!r} is not a Dockerfile instruction{line}; "
                             "write an instruction such as 'CMD [\"sh\"]' or 'ENV KEY=value'")
        out.append(Instruction(keyword, node, escape, where))
    return tuple(out)


def _escape_of(source: str) -> str:
    """The `# escape=` parser directive, read as BuildKit does: only among the comment lines
    that open the text, each directive at most once (the parser has checked the value)."""
    for line in source.removeprefix("\ufeff").splitlines():
        text = line.lstrip()
        if not text.startswith("#"):
            break
        found = _DIRECTIVE.fullmatch(text[1:].lstrip())
        if found is None or found[1].lower() not in _DIRECTIVES:
            break
        if found[1].lower() == "escape":
            return found[2]
    return "\\"


@dataclass
class ConfigState:
    """An image's "config" object (Docker's keys: Cmd, Env, Labels, ...) as instructions
    change it. `cmd_set`: a CMD has been given, so an ENTRYPOINT after it keeps it."""

    run: dict[str, Any]
    cmd_set: bool = False

    @classmethod
    def of(cls, run: Mapping[str, Any] | None) -> ConfigState:
        return cls(copy.deepcopy(dict(run or {})))

    def env(self) -> dict[str, str]:
        """The variables instructions expand: Env as a process would see it (a later entry
        wins; one without '=' is set and empty, as BuildKit reads it)."""
        out = {}
        for entry in self.run.get("Env") or ():
            key, _, value = entry.partition("=")
            out[key] = value
        return out

    def apply(self, ins: Instruction) -> None:
        handler = _HANDLERS.get(ins.keyword)
        if handler is None:
            raise ImageError(f"{ins.where}: {ins.keyword} does not change the image config; "
                             f"use one of {', '.join(sorted(_HANDLERS))}")
        node = ins.node
        if node.flags:
            raise ImageError(f"{ins.where}: {ins.keyword} takes no flags such as "
                             f"{node.flags[0]!r}")
        try:
            handler(self, _Args(ins, self.env()))
        except ImageError as e:
            raise ImageError(f"{ins.where}: {ins.keyword}: {e}") from None


@dataclass(frozen=True)
class _Args:
    ins: Instruction
    env: dict[str, str]  # as it was before the instruction: all its words see the same

    @property
    def values(self) -> tuple[str, ...]:
        return self.ins.node.value

    def word(self, text: str) -> str:
        return shellwords.word(text, self.env, self.ins.escape)

    def words(self, text: str) -> list[str]:
        return shellwords.words(text, self.env, self.ins.escape)

    def one(self, what: str) -> str:
        if len(self.values) != 1 or not self.values[0]:
            raise ImageError(f"needs exactly one argument, {what}")
        return self.word(self.values[0])

    def pairs(self, example: str) -> list[tuple[str, str]]:
        if not self.values:
            raise ImageError(f"needs at least one {example}")
        names, values = self.values[0::2], self.values[1::2]
        return [(self.word(k), self.word(v)) for k, v in zip(names, values, strict=True)]

    def argv(self, state: ConfigState) -> list[str]:
        """The exec form as written; the text form run by the shell (the config's SHELL)."""
        if self.ins.node.json or not self.values:
            return list(self.values)
        shell = state.run.get("Shell") or DEFAULT_SHELL
        return [*shell, self.values[0]]


def _entry(state: ConfigState, key: str, kind: type[T]) -> T:
    """A list or object of the config to add to: a base that has none there (or something
    else, which Docker's types could not hold either) starts it empty."""
    value = state.run.get(key)
    return value if isinstance(value, kind) else kind()


def _cmd(state: ConfigState, a: _Args) -> None:
    argv = a.argv(state)
    edit_run(state.run, cmd=argv)
    state.cmd_set = state.cmd_set or bool(argv)


def _entrypoint(state: ConfigState, a: _Args) -> None:
    edit_run(state.run, entrypoint=a.argv(state), keep_cmd=state.cmd_set)


def _env(state: ConfigState, a: _Args) -> None:
    # One edit per pair, in order: `ENV A=1 A=2` leaves A=2, as Docker does.
    for key, value in a.pairs("NAME=value pair"):
        edit_run(state.run, env={key: value})


def _label(state: ConfigState, a: _Args) -> None:
    labels = _entry(state, "Labels", dict)
    for key, value in a.pairs("key=value pair"):
        if not key:
            raise ImageError("a label needs a name; write LABEL key=value")
        labels[key] = value
    state.run["Labels"] = labels


def _expose(state: ConfigState, a: _Args) -> None:
    if not a.values:
        raise ImageError("needs at least one port, such as 80 or 53/udp")
    ports = _entry(state, "ExposedPorts", dict)
    for value in a.values:
        for spec in a.words(value):  # `EXPOSE $PORTS` may name several, as in Docker
            ports.update({port: {} for port in _ports(spec)})
    state.run["ExposedPorts"] = ports


def _ports(spec: str) -> list[str]:
    if ":" in spec:
        raise ImageError(f"{spec!r} maps a host port; an image exposes only its own ports "
                         "(80, 53/udp, 8000-8010/tcp): publishing is the run's business")
    found = _PORT.fullmatch(spec)
    if found is None:
        raise ImageError(f"{spec!r} is not a port; write 80, 53/udp or 8000-8010/tcp")
    first = int(found[1])
    last = int(found[2]) if found[2] else first
    protocol = (found[3] or "tcp").lower()
    if protocol not in _PROTOCOLS:
        raise ImageError(f"{spec!r}: the protocol must be tcp, udp or sctp")
    if not 1 <= first <= last <= 65535:
        raise ImageError(f"{spec!r}: ports are 1 to 65535, a range low-high")
    return [f"{port}/{protocol}" for port in range(first, last + 1)]


def _onbuild(state: ConfigState, a: _Args) -> None:
    node = a.ins.node
    trigger = (node.sub_cmd or "").upper()
    if not trigger:
        raise ImageError("needs the instruction to run in a later build, such as "
                         "'ONBUILD COPY . /app'")
    if trigger == "ONBUILD":
        raise ImageError("chaining ONBUILD ONBUILD is not allowed")
    if trigger in ("FROM", "MAINTAINER"):
        raise ImageError(f"{trigger} is not allowed as an ONBUILD trigger")
    if trigger not in _known():
        raise ImageError(f"{node.sub_cmd!r} is not a Dockerfile instruction")
    expression = _ONBUILD.sub("", node.original, count=1)
    # The trigger is stored as text and parsed when a build inherits it: it must parse
    # alone (a heredoc's body is not kept by the parser, so such a trigger would not).
    parser = _parser()
    try:
        parser.parse_string(expression)
    except parser.GoParseError as e:
        raise ImageError(f"the trigger {expression!r} does not parse alone ({e}); write it "
                         "on one line, without a heredoc") from None
    state.run["OnBuild"] = [*_entry(state, "OnBuild", list), expression]


def _stopsignal(state: ConfigState, a: _Args) -> None:
    value = a.one("a signal such as SIGTERM, TERM or 15")
    name = value.upper().removeprefix("SIG")
    number_ok = (value.isascii() and value.isdigit() and len(value) <= 5
                 and 0 < int(value) <= _MAX_SIGNAL)
    if not (number_ok or name in _SIGNALS):
        raise ImageError(f"{value!r} is not a signal; write a name such as SIGTERM or "
                         f"SIGRTMIN+3, or a number from 1 to {_MAX_SIGNAL}")
    state.run["StopSignal"] = value


def _user(state: ConfigState, a: _Args) -> None:
    edit_run(state.run, user=a.one("a user such as 'app', '1000' or '1000:1000'"))


def _volume(state: ConfigState, a: _Args) -> None:
    if not a.values:
        raise ImageError("needs at least one path, such as /data")
    volumes = _entry(state, "Volumes", dict)
    for value in a.values:
        path = a.word(value)
        if not path:
            raise ImageError("a volume cannot be an empty path")
        volumes[path] = {}
    state.run["Volumes"] = volumes


def _workdir(state: ConfigState, a: _Args) -> None:
    path = a.one("a directory such as /app")
    if not path:
        raise ImageError("the directory is empty")
    # A relative path goes on from the current one, as each WORKDIR does in Docker.
    current = state.run.get("WorkingDir") or ""
    edit_run(state.run, working_dir=posixpath.join("/", current, path))


_HANDLERS: dict[str, Callable[[ConfigState, _Args], None]] = {
    "CMD": _cmd, "ENTRYPOINT": _entrypoint, "ENV": _env, "EXPOSE": _expose, "LABEL": _label,
    "ONBUILD": _onbuild, "STOPSIGNAL": _stopsignal, "USER": _user, "VOLUME": _volume,
    "WORKDIR": _workdir,
}
CONFIG_INSTRUCTIONS = frozenset(_HANDLERS)
