"""Dockerfile instructions: parsed by BuildKit's own parser (the `dockerfile` package), and
the ones that only change the image config applied to it as Docker dispatches them.

`parse` gives `Instruction`s (continuations joined, the `escape` directive honoured, JSON
forms decoded, heredocs read). `ConfigState.apply` carries out CMD, ENTRYPOINT, ENV, EXPOSE,
LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME and WORKDIR on an image's "config" object: the
arguments are expanded against the Env of that moment (shellwords.py) where Docker does
(not CMD, ENTRYPOINT, ONBUILD), every argument of one instruction against the same Env. A
commit's changes (changes.py) use these. A build (buildplan.py) also applies ARG, SHELL,
HEALTHCHECK and MAINTAINER, which a commit does not take: its ARGs in scope are expanded
with the Env (an ENV of the same name wins) and given to RUN, never written to the image.
"""

from __future__ import annotations

import copy
import functools
import posixpath
import re
import signal
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
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
# Finding a parse error's line parses prefixes of the text (log2 of its lines of them): a
# longer text keeps only the parser's word, so an error costs at most ~0.5 s of GIL.
_LOCATE_MAX_BYTES = 64 << 10
_DIRECTIVE = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*")
_DIRECTIVES = frozenset({"syntax", "escape", "check"})
_ONBUILD = re.compile(r"^\s*ONBUILD\s*", re.IGNORECASE)
_PORT = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?(?:/([A-Za-z]*))?")
_PROTOCOLS = ("tcp", "udp", "sctp")
_SIGNALS = frozenset(
    [name.removeprefix("SIG") for name in signal.Signals.__members__]
    + [f"RTMIN+{i}" for i in range(1, 16)] + [f"RTMAX-{i}" for i in range(1, 15)])
_MAX_SIGNAL = 64
_HEREDOC_OPENER = re.compile(r"<<-?\s*(['\"]?)([^\s'\"<>|&;]+)\1")
# HEALTHCHECK's duration flags (Go durations, in nanoseconds in the config) and their keys.
_HEALTH_DURATIONS = {"interval": "Interval", "timeout": "Timeout",
                     "start-period": "StartPeriod", "start-interval": "StartInterval"}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION = re.compile(rf"([+-]?)((?:{_DURATION_PART.pattern})+|0)")
_NANOSECONDS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
                "m": 60 * 10**9, "h": 3600 * 10**9}
_MIN_INTERVAL = 10**6   # Docker's least health check duration: 1 ms
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


def parse(source: str, where: str, *, numbered: bool = False) -> tuple[Instruction, ...]:
    """The instructions of a Dockerfile text. Errors name `where` and say what to write;
    `numbered` (a whole Dockerfile) puts the line after it, "Dockerfile:7", in errors and in
    each instruction's `where`.

    The parser holds the GIL (about 2.5 µs a byte on a 2-core host): callers bound the
    text they pass, or parse off the event loop in a process of its own."""
    def at(line: int | None) -> str:
        return f"{where}:{line}" if numbered and line else where

    escape = directives(source).get("escape", "\\")
    for number, line in enumerate(source.split("\n"), 1):
        size = len(line.encode("utf-8", "surrogatepass"))
        if size > MAX_LINE_BYTES:
            # The parser would drop the rest of the text without a word (Go's line scanner).
            place = at(number) if numbered else f"{where}: line {number}"
            raise ImageError(f"{place} is {size} bytes, over the parser's limit of "
                             f"{MAX_LINE_BYTES}; split it with a trailing {escape}")
    parser = _parser()
    try:
        nodes = parser.parse_string(source)
    except parser.GoParseError as e:
        raise ImageError(f"{at(_error_line(source, str(e)) if numbered else None)}: "
                         f"{e}") from None
    out = []
    for node in nodes:
        keyword = node.cmd.upper()
        if keyword not in _known():
            line = f" (line {node.start_line})" if node.start_line > 1 and not numbered else ""
            raise ImageError(f"{at(node.start_line)}: {node.cmd!r} is not a Dockerfile "
                             f"instruction{line}; write an instruction such as "
                             "'CMD [\"sh\"]' or 'ENV KEY=value'")
        out.append(Instruction(keyword, node, escape, at(node.start_line)))
    return tuple(out)


def _error_line(source: str, message: str) -> int | None:
    """The line of a parse error, which the parser does not give: the first line the text
    up to which fails the same way; for a heredoc that never ends, the line opening it."""
    lines = source.split("\n")
    if message == "file with no instructions" or len(source) > _LOCATE_MAX_BYTES:
        return None
    if message == "unterminated heredoc":
        return _unterminated_heredoc(lines)
    parser = _parser()

    def fails(count: int) -> bool:
        try:
            parser.parse_string("\n".join(lines[:count]))
        except parser.GoParseError as e:
            return str(e) == message
        return False

    low, high = 1, len(lines)
    if not fails(high):
        return None
    while low < high:  # a few parses: log2 of the line count
        middle = (low + high) // 2
        if fails(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _unterminated_heredoc(lines: list[str]) -> int | None:
    """The line whose heredoc (`<<EOF`, `<<-EOF`, `<<'EOF'`) no later line ends."""
    pending: list[tuple[str, bool]] = []
    opened = None
    for number, line in enumerate(lines, 1):
        if pending:
            name, chomp = pending[0]
            if (line.lstrip("\t") if chomp else line).rstrip("\r") == name:
                pending.pop(0)
        elif not line.lstrip().startswith("#") and (found := list(
                _HEREDOC_OPENER.finditer(line))):
            pending = [(m[2], m[0].startswith("<<-")) for m in found]
            opened = number
    return opened if pending else None


def directives(source: str) -> dict[str, str]:
    """The parser directives (`syntax`, `escape`, `check`) by lower-case name, read as
    BuildKit does: only among the comment lines that open the text, each at most once (the
    parser has checked the escape character)."""
    found: dict[str, str] = {}
    for line in source.removeprefix("\ufeff").splitlines():
        text = line.lstrip()
        if not text.startswith("#"):
            break
        directive = _DIRECTIVE.fullmatch(text[1:].lstrip())
        if directive is None or directive[1].lower() not in _DIRECTIVES:
            break
        found.setdefault(directive[1].lower(), directive[2])
    return found


def flag_values(ins: Instruction, names: Collection[str],
                switches: Collection[str] = ()) -> dict[str, str | None]:
    """An instruction's flags by name: `--name=value`, or a switch alone (`--link`: None).
    A flag it does not take, one given twice or one without its value is an error."""
    out: dict[str, str | None] = {}
    for flag in ins.node.flags:
        name, eq, value = flag.removeprefix("--").partition("=")
        if name not in names and name not in switches:
            takes = ", ".join(f"--{n}" for n in (*names, *switches)) or "no flags"
            raise ImageError(f"unknown flag {flag.partition('=')[0]!r}: {ins.keyword} takes "
                             f"{takes}")
        if name in out:
            raise ImageError(f"the flag --{name} is given twice; give it once")
        if not eq and name not in switches:
            raise ImageError(f"the flag --{name} needs a value, as --{name}=...")
        out[name] = value if eq else None
    return out


@dataclass(frozen=True)
class ArgScope:
    """What a build's ARG instructions read: the build args given, and the values of the
    global ARGs (those before the first FROM, with the automatic platform args), which an
    ARG without a default in a stage takes when no build arg names it."""

    given: Mapping[str, str] = field(default_factory=dict)
    globals: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ConfigState:
    """An image's "config" object (Docker's keys: Cmd, Env, Labels, ...) as instructions
    change it. `cmd_set`: a CMD has been given, so an ENTRYPOINT after it keeps it. A build
    also keeps the ARGs in scope that have a value (`args`, never written to the image), the
    image's author (MAINTAINER) and the build's `scope`."""

    run: dict[str, Any]
    cmd_set: bool = False
    args: dict[str, str] = field(default_factory=dict)
    author: str | None = None
    scope: ArgScope = field(default_factory=ArgScope)

    @classmethod
    def of(cls, run: Mapping[str, Any] | None) -> ConfigState:
        return cls(copy.deepcopy(dict(run or {})))

    def env(self) -> dict[str, str]:
        """The variables instructions expand: the ARGs in scope, then Env over them as a
        process would see it (a later entry wins; one without '=' is set and empty, as
        BuildKit reads it)."""
        out = dict(self.args)
        for entry in self.run.get("Env") or ():
            key, _, value = entry.partition("=")
            out[key] = value
        return out

    def run_env(self) -> list[str]:
        """The environment of a build's RUN: Env, then each ARG in scope that Env does not
        name (an ENV of the same name wins, as Docker documents)."""
        env = list(self.run.get("Env") or ())
        names = {entry.partition("=")[0] for entry in env}
        return env + [f"{k}={v}" for k, v in self.args.items() if k not in names]

    def apply(self, ins: Instruction) -> None:
        handler = _HANDLERS.get(ins.keyword) or _BUILD_HANDLERS.get(ins.keyword)
        if handler is None:
            raise ImageError(f"{ins.where}: {ins.keyword} does not change the image config; "
                             f"use one of {', '.join(sorted(BUILD_CONFIG_INSTRUCTIONS))}")
        node = ins.node
        if node.flags and ins.keyword != "HEALTHCHECK":  # which reads its own flags
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


def _arg(state: ConfigState, a: _Args) -> None:
    if not a.values:
        raise ImageError("needs a name, such as 'ARG VERSION' or 'ARG VERSION=1.0'")
    for text in a.values:
        name, eq, default = text.partition("=")
        if not name:
            raise ImageError(f"{text!r} has no name; write NAME or NAME=default")
        value: str | None
        if name in state.scope.given:
            value = state.scope.given[name]
        elif eq:
            # Each default sees the ARGs before it, in this instruction too, as in BuildKit.
            value = shellwords.word(default, state.env(), a.ins.escape)
        else:
            value = state.scope.globals.get(name)
        if value is not None:  # declared without any value: unset, as `${NAME-x}` tells
            state.args[name] = value


def _shell(state: ConfigState, a: _Args) -> None:
    if not a.ins.node.json:
        raise ImageError("takes the JSON form only, such as SHELL [\"/bin/bash\", \"-c\"]")
    if not a.values:
        raise ImageError("needs the shell at least, such as SHELL [\"/bin/bash\", \"-c\"]")
    state.run["Shell"] = list(a.values)


def _maintainer(state: ConfigState, a: _Args) -> None:
    if len(a.values) != 1 or not a.values[0]:
        raise ImageError("needs the author, such as 'MAINTAINER Ann <ann@example.com>' "
                         "(or, better, LABEL org.opencontainers.image.authors=...)")
    state.author = a.values[0]  # as written: Docker does not expand it


def _healthcheck(state: ConfigState, a: _Args) -> None:
    node = a.ins.node
    kind = a.values[0].upper() if a.values else ""
    if kind == "NONE":
        if len(a.values) > 1 or node.flags:
            raise ImageError("NONE takes no arguments or flags: it turns off the base "
                             "image's check")
        state.run["Healthcheck"] = {"Test": ["NONE"]}
        return
    if kind != "CMD":
        raise ImageError("needs CMD and a command, such as 'HEALTHCHECK --interval=30s CMD "
                         "curl -f http://localhost/', or NONE")
    if len(a.values) < 2 or not a.values[1]:
        raise ImageError("needs a command after CMD, such as 'HEALTHCHECK CMD curl -f "
                         "http://localhost/'")
    flags = flag_values(a.ins, [*_HEALTH_DURATIONS, "retries"])
    check: dict[str, Any] = {
        "Test": ["CMD", *a.values[1:]] if node.json else ["CMD-SHELL", a.values[1]]}
    for flag, key in _HEALTH_DURATIONS.items():
        text = flags.get(flag)
        if text is not None and (nanoseconds := _duration(flag, text)):
            check[key] = nanoseconds
    retries = flags.get("retries")
    if retries is not None:
        if not re.fullmatch(r"[+-]?[0-9]{1,10}", retries) or int(retries) >= 2**31:
            raise ImageError(f"--retries={retries!r} is not a count; write e.g. --retries=3")
        if int(retries) < 0:
            raise ImageError(f"--retries cannot be negative ({retries})")
        if int(retries):
            check["Retries"] = int(retries)
    state.run["Healthcheck"] = check


def _duration(flag: str, text: str) -> int:
    """--flag's Go duration (30s, 1m30s, 500ms) in nanoseconds; 0 keeps Docker's default."""
    found = _DURATION.fullmatch(text)
    if found is None:
        raise ImageError(f"--{flag}={text!r} is not a duration; write e.g. 30s, 1m30s or "
                         "500ms")
    total = sum(Decimal(n) * _NANOSECONDS[unit] for n, unit in _DURATION_PART.findall(text))
    nanoseconds = int(total) * (-1 if found[1] == "-" else 1)
    if nanoseconds and not _MIN_INTERVAL <= nanoseconds < 2**63:
        raise ImageError(f"--{flag}={text} is out of range: write 0 (the default) or from "
                         "1ms to about 292 years")
    return nanoseconds


_HANDLERS: dict[str, Callable[[ConfigState, _Args], None]] = {
    "CMD": _cmd, "ENTRYPOINT": _entrypoint, "ENV": _env, "EXPOSE": _expose, "LABEL": _label,
    "ONBUILD": _onbuild, "STOPSIGNAL": _stopsignal, "USER": _user, "VOLUME": _volume,
    "WORKDIR": _workdir,
}
CONFIG_INSTRUCTIONS = frozenset(_HANDLERS)
_BUILD_HANDLERS: dict[str, Callable[[ConfigState, _Args], None]] = {
    "ARG": _arg, "HEALTHCHECK": _healthcheck, "MAINTAINER": _maintainer, "SHELL": _shell,
}
# What a build's steps apply to the config alone (no layer): a commit's and these four.
BUILD_CONFIG_INSTRUCTIONS = CONFIG_INSTRUCTIONS | frozenset(_BUILD_HANDLERS)
