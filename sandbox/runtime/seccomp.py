"""Seccomp profiles as data: load and validate, compile once to BPF.

Profiles use the OCI/Docker JSON format (policies/seccomp/*.json, or Docker's own default.json).
compile_profile() resolves Docker's conditional rules for this host and has libseccomp generate
the BPF program once per policy. The runtime's exec child (native/child.c) hands those bytes to the
kernel right before execve; install() does the same for the calling process (tests, tools).
"""

from __future__ import annotations

import ctypes
import errno
import importlib.resources
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sandbox.errors import PolicyError
from sandbox.runtime import bpf

try:
    import seccomp  # Debian's python3-seccomp, when this interpreter can see it
except ImportError:
    import pyseccomp as seccomp

__all__ = [
    "ArgCondition",
    "RuleFilter",
    "SeccompProfile",
    "SeccompProgram",
    "SyscallRule",
    "builtin_profile_names",
    "builtin_profile_path",
    "compile_profile",
    "install",
    "load_profile",
]

ACTIONS = (
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
)
OPERATORS = {
    "SCMP_CMP_NE": seccomp.NE,
    "SCMP_CMP_LT": seccomp.LT,
    "SCMP_CMP_LE": seccomp.LE,
    "SCMP_CMP_EQ": seccomp.EQ,
    "SCMP_CMP_GE": seccomp.GE,
    "SCMP_CMP_GT": seccomp.GT,
    "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
}
# The runtime-spec list; the ones this libseccomp lacks fail at compile time, and only if used.
ARCHITECTURES = (
    "SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390", "SCMP_ARCH_S390X", "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64", "SCMP_ARCH_M68K",
    "SCMP_ARCH_SH", "SCMP_ARCH_SHEB",
)  # fmt: skip
FLAGS = (
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
)
# Docker matches includes/excludes "arches" against Go's GOARCH of the host.
_GOARCH = {
    "SCMP_ARCH_X86": "386", "SCMP_ARCH_X86_64": "amd64", "SCMP_ARCH_ARM": "arm",
    "SCMP_ARCH_AARCH64": "arm64", "SCMP_ARCH_MIPS": "mips", "SCMP_ARCH_MIPSEL": "mipsle",
    "SCMP_ARCH_MIPS64": "mips64", "SCMP_ARCH_MIPSEL64": "mips64le", "SCMP_ARCH_PPC64": "ppc64",
    "SCMP_ARCH_PPC64LE": "ppc64le", "SCMP_ARCH_S390": "s390", "SCMP_ARCH_S390X": "s390x",
    "SCMP_ARCH_RISCV64": "riscv64", "SCMP_ARCH_LOONGARCH64": "loong64",
}  # fmt: skip

_PROFILE_KEYS = frozenset(
    {"defaultAction", "defaultErrnoRet", "architectures", "archMap", "flags", "listenerPath",
     "listenerMetadata", "syscalls"}
)  # fmt: skip
_RULE_KEYS = frozenset(
    {"names", "name", "action", "errnoRet", "args", "comment", "includes", "excludes"}
)
_ARG_KEYS = frozenset({"index", "value", "valueTwo", "op"})
_FILTER_KEYS = frozenset({"caps", "arches", "minKernel"})
_ARCHMAP_KEYS = frozenset({"architecture", "subArchitectures"})

_SYSCALL_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_CAP_NAME = re.compile(r"CAP_[A-Z0-9_]+")
_GOARCH_NAME = re.compile(r"[a-z0-9_]+")
_KERNEL_VERSION = re.compile(r"(\d+)\.(\d+)")
_PROFILE_NAME = re.compile(r"[a-z0-9_-]+")
_U64_MAX = (1 << 64) - 1
_MAX_ERRNO = 4095  # the kernel clamps larger SCMP_ACT_ERRNO data to this
_SECCOMP_DATA_MAX = 0xFFFF
_ARG_COUNT = 6


@dataclass(frozen=True)
class ArgCondition:
    index: int
    value: int
    value_two: int
    op: str


@dataclass(frozen=True)
class RuleFilter:
    """Docker's includes/excludes: facts about the host, resolved when the profile is compiled."""

    caps: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class SyscallRule:
    names: tuple[str, ...]
    action: str
    errno_ret: int | None = None
    args: tuple[ArgCondition, ...] = ()
    includes: RuleFilter = RuleFilter()
    excludes: RuleFilter = RuleFilter()
    comment: str = ""


@dataclass(frozen=True)
class SeccompProfile:
    """A validated OCI/Docker seccomp profile. `raw` is the mapping it was parsed from."""

    name: str
    default_action: str
    default_errno_ret: int | None
    architectures: tuple[str, ...]
    arch_map: tuple[tuple[str, tuple[str, ...]], ...]
    syscalls: tuple[SyscallRule, ...]
    flags: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class SeccompProgram:
    """A compiled profile: the struct sock_filter array to hand to install()."""

    name: str
    bpf: bytes
    skipped_syscalls: tuple[str, ...]


# --------------------------------------------------------------------------- loading


def _builtin_folder() -> Any:
    return importlib.resources.files("policies").joinpath("seccomp")


def builtin_profile_names() -> list[str]:
    """The seccomp profiles shipped with sandboxd (policies/seccomp/*.json), by name."""
    return sorted(p.name.removesuffix(".json") for p in _builtin_folder().iterdir()
                  if p.name.endswith(".json"))


def builtin_profile_path(name: str) -> Path:
    """Path of policies/seccomp/<name>.json shipped with sandboxd."""
    if not _PROFILE_NAME.fullmatch(name):
        raise PolicyError(
            f"invalid seccomp profile name {name!r}; use lowercase letters, digits, '_' and '-'"
        )
    path = Path(str(_builtin_folder().joinpath(f"{name}.json")))
    if not path.is_file():
        known = builtin_profile_names()
        raise PolicyError(
            f"unknown seccomp profile {name!r}; built-in profiles: {', '.join(known) or 'none'}"
        )
    return path


def load_profile(
    source: str | os.PathLike[str] | Mapping[str, Any], *, name: str | None = None
) -> SeccompProfile:
    """Parse and validate a profile from a JSON file or an already-parsed mapping."""
    if isinstance(source, Mapping):
        label = name or "<inline>"
        raw: Any = source
    else:
        path = Path(source)
        label = name or path.stem
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PolicyError(f"seccomp profile {label!r}: cannot read {path}: {exc}") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PolicyError(f"seccomp profile {label!r}: {path} is not JSON: {exc}") from exc
    try:
        return _parse_profile(raw, label)
    except PolicyError as exc:
        raise PolicyError(f"seccomp profile {label!r}: {exc}") from None


def _parse_profile(raw: Any, name: str) -> SeccompProfile:
    obj = _object(raw, "", _PROFILE_KEYS, required=("defaultAction",))
    default_action = _choice(obj["defaultAction"], "defaultAction", "action", ACTIONS)
    default_errno = _errno_ret(obj.get("defaultErrnoRet"), "defaultErrnoRet", default_action)
    architectures = tuple(
        _choice(a, f"architectures[{i}]", "architecture", ARCHITECTURES)
        for i, a in enumerate(_list(obj.get("architectures"), "architectures"))
    )
    arch_map = tuple(
        _parse_arch_map_entry(e, f"archMap[{i}]")
        for i, e in enumerate(_list(obj.get("archMap"), "archMap"))
    )
    flags = tuple(
        _choice(f, f"flags[{i}]", "flag", FLAGS)
        for i, f in enumerate(_list(obj.get("flags"), "flags"))
    )
    for key in ("listenerPath", "listenerMetadata"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise PolicyError(f"{key}: expected a string, got {_kind(obj[key])}")
    syscalls = tuple(
        _parse_rule(r, f"syscalls[{i}]")
        for i, r in enumerate(_list(obj.get("syscalls"), "syscalls"))
    )
    return SeccompProfile(
        name=name,
        default_action=default_action,
        default_errno_ret=default_errno,
        architectures=architectures,
        arch_map=arch_map,
        syscalls=syscalls,
        flags=flags,
        raw=obj,
    )


def _parse_arch_map_entry(raw: Any, where: str) -> tuple[str, tuple[str, ...]]:
    obj = _object(raw, where, _ARCHMAP_KEYS, required=("architecture",))
    arch = _choice(obj["architecture"], f"{where}.architecture", "architecture", ARCHITECTURES)
    subs = _list(obj.get("subArchitectures"), f"{where}.subArchitectures")
    return arch, tuple(
        _choice(s, f"{where}.subArchitectures[{i}]", "architecture", ARCHITECTURES)
        for i, s in enumerate(subs)
    )


def _parse_rule(raw: Any, where: str) -> SyscallRule:
    obj = _object(raw, where, _RULE_KEYS, required=("action",))
    names = list(_list(obj.get("names"), f"{where}.names"))
    if obj.get("name") is not None:  # Docker's older single-name form
        names.insert(0, obj["name"])
    if not names:
        raise PolicyError(f"{where}.names: missing; give a non-empty list of syscall names")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not _SYSCALL_NAME.fullmatch(n):
            raise PolicyError(f"{where}.names[{i}]: {n!r} is not a syscall name")
    action = _choice(obj["action"], f"{where}.action", "action", ACTIONS)
    comment = "" if obj.get("comment") is None else obj["comment"]
    if not isinstance(comment, str):
        raise PolicyError(f"{where}.comment: expected a string, got {_kind(comment)}")
    raw_args = _list(obj.get("args"), f"{where}.args")
    args = tuple(_parse_arg(a, f"{where}.args[{i}]") for i, a in enumerate(raw_args))
    return SyscallRule(
        names=tuple(names),
        action=action,
        errno_ret=_errno_ret(obj.get("errnoRet"), f"{where}.errnoRet", action),
        args=args,
        includes=_parse_filter(obj.get("includes"), f"{where}.includes"),
        excludes=_parse_filter(obj.get("excludes"), f"{where}.excludes"),
        comment=comment,
    )


def _parse_arg(raw: Any, where: str) -> ArgCondition:
    obj = _object(raw, where, _ARG_KEYS, required=("index", "value", "op"))
    index = _uint(obj["index"], f"{where}.index", _ARG_COUNT - 1)
    value = _uint(obj["value"], f"{where}.value", _U64_MAX)
    raw_two = obj.get("valueTwo")
    value_two = _uint(0 if raw_two is None else raw_two, f"{where}.valueTwo", _U64_MAX)
    op = _choice(obj["op"], f"{where}.op", "operator", tuple(OPERATORS))
    if op == "SCMP_CMP_MASKED_EQ":
        if value_two & ~value:
            raise PolicyError(
                f"{where}.valueTwo: {value_two:#x} has bits outside the mask {value:#x} "
                "(value), so the rule could never match"
            )
    elif value_two:
        raise PolicyError(f"{where}.valueTwo: only SCMP_CMP_MASKED_EQ uses valueTwo")
    return ArgCondition(index=index, value=value, value_two=value_two, op=op)


def _parse_filter(raw: Any, where: str) -> RuleFilter:
    if raw is None:
        return RuleFilter()
    obj = _object(raw, where, _FILTER_KEYS)
    caps = _list(obj.get("caps"), f"{where}.caps")
    arches = _list(obj.get("arches"), f"{where}.arches")
    for key, items, pattern in (("caps", caps, _CAP_NAME), ("arches", arches, _GOARCH_NAME)):
        for i, item in enumerate(items):
            if not isinstance(item, str) or not pattern.fullmatch(item):
                raise PolicyError(f"{where}.{key}[{i}]: {item!r} does not match {pattern.pattern}")
    min_kernel = None
    if obj.get("minKernel") is not None:
        match = isinstance(obj["minKernel"], str) and _KERNEL_VERSION.fullmatch(obj["minKernel"])
        if not match:
            raise PolicyError(f'{where}.minKernel: {obj["minKernel"]!r} is not like "4.8"')
        min_kernel = (int(match[1]), int(match[2]))
    return RuleFilter(caps=tuple(caps), arches=tuple(arches), min_kernel=min_kernel)


def _errno_ret(raw: Any, where: str, action: str) -> int | None:
    if raw is None:
        return None
    if action == "SCMP_ACT_ERRNO":
        return _uint(raw, where, _MAX_ERRNO)
    if action == "SCMP_ACT_TRACE":
        return _uint(raw, where, _SECCOMP_DATA_MAX)
    raise PolicyError(
        f"{where}: only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take an errno, not {action}"
    )


def _object(
    raw: Any, where: str, allowed: frozenset[str], required: Sequence[str] = ()
) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where or 'profile'}: expected an object, got {_kind(raw)}")
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in allowed:
            raise PolicyError(
                f"{prefix}{key}: unknown field; known fields: {', '.join(sorted(allowed))}"
            )
    for key in required:
        if raw.get(key) is None:
            raise PolicyError(f"{prefix}{key}: missing required field")
    return raw


def _list(raw: Any, where: str) -> Sequence[Any]:
    if raw is None:  # Go marshals empty slices as null
        return ()
    if not isinstance(raw, list | tuple):
        raise PolicyError(f"{where}: expected a list, got {_kind(raw)}")
    return raw


def _choice(raw: Any, where: str, what: str, choices: Sequence[str]) -> str:
    if not isinstance(raw, str) or raw not in choices:
        raise PolicyError(f"{where}: unknown {what} {raw!r}; use one of {', '.join(choices)}")
    return raw


def _uint(raw: Any, where: str, maximum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= maximum:
        raise PolicyError(f"{where}: expected an integer from 0 to {maximum}, got {raw!r}")
    return raw


def _kind(raw: Any) -> str:
    return "null" if raw is None else type(raw).__name__


# --------------------------------------------------------------------------- compiling


def compile_profile(
    profile: SeccompProfile,
    *,
    capabilities: frozenset[str] = frozenset(),
    kernel: tuple[int, int] | None = None,
    own_process_only: bool = False,
) -> SeccompProgram:
    """Resolve the profile for this host (or `kernel`) and `capabilities`; return its BPF.

    With `own_process_only`, whatever the profile says, the calls that change another
    process's limits or scheduling fail with EPERM unless they name the caller itself (see
    OWN_PROCESS_ONLY): for runs that share their id with the container's init."""
    try:
        if own_process_only:
            profile = _own_process_only(profile)
        return _compile(profile, capabilities, kernel or _running_kernel())
    except PolicyError as exc:
        raise PolicyError(f"seccomp profile {profile.name!r}: {exc}") from None


def _compile(
    profile: SeccompProfile, capabilities: frozenset[str], kernel: tuple[int, int]
) -> SeccompProgram:
    caps = frozenset(_cap_name(c) for c in capabilities)
    native = _native_arch()
    goarch = _GOARCH.get(native, native.removeprefix("SCMP_ARCH_").lower())
    default = _action(profile.default_action, profile.default_errno_ret, "defaultAction")
    arch_values = [_arch_value(native, "native architecture")]
    for arch in _compat_arches(profile, native):
        arch_values.append(_arch_value(arch, "architectures"))

    rules = [
        (i, rule, _action(rule.action, rule.errno_ret, f"syscalls[{i}].action"))
        for i, rule in enumerate(profile.syscalls)
        if _applies(rule, goarch, caps, kernel)
    ]
    skipped = frozenset(n for _, r, _ in rules for n in r.names if not _known(n, arch_values))
    _check_conflicts(rules, skipped)
    # profile.flags are not passed on: TSYNC is moot in the single-threaded child, and LOG and
    # SPEC_ALLOW only relax auditing or a mitigation, so leaving them out is never less strict.
    # libseccomp refuses a rule that repeats the default action; runc skips those too.
    rules = [(i, r, action) for i, r, action in rules if action != default]
    whole = _libseccomp_bpf(default, arch_values, rules, skipped)
    named = [int(seccomp.resolve_syscall(arch_values[0], n))
             for _, r, _ in rules for n in r.names if n not in skipped]
    newest = max((nr for nr in named if nr >= 0), default=-1)
    if default != int(seccomp.ALLOW) and newest >= 0:
        whole = _enosys_stub(arch_values[0], newest) + whole
    program = whole
    if len(arch_values) == 1 and newest >= 0:
        program = _dispatched(whole, default, arch_values[0], rules, skipped, newest) or whole
    return SeccompProgram(name=profile.name, bpf=program,
                          skipped_syscalls=tuple(sorted(skipped)))


def _libseccomp_bpf(default: int, arch_values: list[int],
                    rules: list[tuple[int, SyscallRule, int]], skipped: frozenset[str]) -> bytes:
    flt = seccomp.SyscallFilter(default)
    # A syscall from an architecture the filter does not list (i386 `int 0x80`, x32) must not be
    # judged by the native rules: kill the process instead.
    flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    # A binary tree of syscall numbers instead of a linear chain: a syscall walks ~log2(n)
    # comparisons, and so does the kernel when it builds its per-syscall cache at load
    # time (it emulates the filter for every syscall number), which made loading a
    # 440-instruction chain cost ~0.4 ms per exec.
    flt.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    # libseccomp adds rules only to the architectures present when each rule is added.
    for arch in arch_values[1:]:
        flt.add_arch(arch)
    for i, rule, action in rules:
        args = [seccomp.Arg(a.index, OPERATORS[a.op], a.value, a.value_two) for a in rule.args]
        for name in rule.names:
            if name in skipped:
                continue
            try:
                flt.add_rule(action, name, *args)
            except OSError as exc:
                raise PolicyError(
                    f"syscalls[{i}]: libseccomp rejected the rule for {name}: "
                    f"{os.strerror(exc.errno) if exc.errno else exc}"
                ) from None
    return _export_bpf(flt)


def _dispatched(whole: bytes, default: int, native: int,
                rules: list[tuple[int, SyscallRule, int]], skipped: frozenset[str],
                newest: int) -> bytes | None:
    """The same decisions as `whole` in fewer instructions (bpf.dispatched): the syscalls
    with argument conditions go on to a libseccomp program of their rules alone."""
    conditional = frozenset(n for _, r, _ in rules if r.args for n in r.names) - skipped
    by_word = {n: d for n in sorted(conditional)
               if (d := _word_decision(native, n, rules, default)) is not None}
    left = conditional - by_word.keys()
    deferred = frozenset(int(seccomp.resolve_syscall(native, n)) for n in conditional)
    cases = _argument_cases(native, rules, conditional)
    cases += [c for d in by_word.values() for c in _word_cases(native, d)]
    try:
        rest = bpf.word_decisions(native, list(by_word.values())) if by_word else b""
        rest += _libseccomp_bpf(default, [native],
                                [(i, replace(r, names=tuple(n for n in r.names if n in left)),
                                  action) for i, r, action in rules
                                 if left.intersection(r.names)], skipped)
        return bpf.dispatched(whole, rest, arch=native, deferred=deferred, newest=newest,
                              cases=cases)
    except bpf.BPFError:
        return None   # an instruction the interpreter does not follow: libseccomp's as it is


# A word decision's cubes cost up to three instructions each, libseccomp's rules at least
# as much; past this many the dispatcher's short jumps would not reach.
_WORD_CUBES_MAX = 16


def _word_decision(native: int, name: str, rules: list[tuple[int, SyscallRule, int]],
                   default: int) -> bpf.WordDecision | None:
    """`name`'s rules as a bpf.WordDecision when they all give one action by masking one
    argument's low 32 bits (a mask and value with no high bit, so libseccomp's test of the
    high word always holds): tested as the words the rules match or as those they do not,
    whichever takes fewer cubes (ioctl's 32 rules leave 2 words). None when neither is
    short (libseccomp's program decides it)."""
    mine = [(r.args, action) for _, r, action in rules if name in r.names]
    if {action for _, action in mine} != {mine[0][1]} or any(len(a) != 1 for a, _ in mine):
        return None
    conds = [a[0] for a, _ in mine]
    if any(c.op != "SCMP_CMP_MASKED_EQ" or c.index != conds[0].index
           or max(c.value, c.value_two) > bpf.WORD or c.value_two & ~c.value for c in conds):
        return None
    # Docker's masked comparison: "value" is the mask, "valueTwo" what the masked word equals.
    matched = [(c.value, c.value_two) for c in conds]
    unmatched = bpf.complement(matched, limit=len(matched) - 1)
    decision = bpf.WordDecision(nr=int(seccomp.resolve_syscall(native, name)),
                                index=conds[0].index, cubes=tuple(matched),
                                action=mine[0][1], otherwise=default)
    if unmatched is not None:
        return replace(decision, cubes=tuple(unmatched), action=default, otherwise=mine[0][1])
    return decision if len(matched) <= _WORD_CUBES_MAX else None


def _word_cases(native: int, d: bpf.WordDecision) -> list[bpf.Case]:
    """Each cube's word, its neighbours and its free bits all set, under high words of
    0 and all ones (the rules' masks ignore them: libseccomp's program must too)."""
    cases = []
    for mask, value in d.cubes:
        for word in (value, value - 1, value + 1, value | (~mask & bpf.WORD)):
            for high in (0, bpf.WORD):
                for fill in (0, 0xFFFFFFFFFFFFFFFF):
                    args = [fill] * 6
                    args[d.index] = high << 32 | (word & bpf.WORD)
                    cases.append(bpf.Case(d.nr, native, tuple(args)))
    return cases


def _argument_cases(native: int, rules: list[tuple[int, SyscallRule, int]],
                    conditional: frozenset[str]) -> list[bpf.Case]:
    """Each conditional syscall with each argument its rules compare at, and next to, each
    value and mask they compare it with (one argument at a time; the others 0 or all ones)."""
    full = 0xFFFFFFFFFFFFFFFF
    values: dict[tuple[str, int], set[int]] = {}
    for _, rule, _ in rules:
        for name in conditional.intersection(rule.names):
            for a in rule.args:
                seen = values.setdefault((name, a.index), {0, 0xFFFFFFFF, full})
                for v in (a.value, a.value_two, a.value & a.value_two):
                    seen.update((v + d) & full for d in (-1, 0, 1))
    cases = []
    for (name, index), seen in sorted(values.items()):
        nr = int(seccomp.resolve_syscall(native, name))
        for fill in (0, full):
            for v in sorted(seen):
                args = [fill] * 6
                args[index] = v
                cases.append(bpf.Case(nr, native, tuple(args)))
    return cases


_SECCOMP_RET_ERRNO = 0x00050000


def _enosys_stub(native: int, newest: int) -> bytes:
    """Instructions put before libseccomp's program: a native syscall numbered above every
    one the profile names is newer than the profile, so it fails with ENOSYS (as runc
    does) and a libc falls back to an older call, instead of treating EPERM as fatal.
    x32 numbers are left to libseccomp's bad-architecture action."""
    return b"".join((
        bpf.insn(bpf.LD_W_ABS, 0, 0, 4),                     # seccomp_data.arch
        bpf.insn(bpf.JEQ_K, 0, 4, native),                   # another arch: to libseccomp
        bpf.insn(bpf.LD_W_ABS, 0, 0, 0),                     # seccomp_data.nr
        bpf.insn(bpf.JGE_K, 2, 0, bpf.X32_SYSCALL_BIT),      # x32: to libseccomp
        bpf.insn(bpf.JGT_K, 0, 1, newest),
        bpf.insn(bpf.RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS),
    ))


# Calls that act on another process's limits or scheduling: the forms of each that act on
# the caller only (its own process or process group, never its user), and the forms that
# do not, as alternatives of (argument index, operator, value) conditions. A process that
# shares its uid and gid with init could otherwise lower init's rlimits, and every later run
# would inherit them (the scheduling calls also need init's capabilities, which no run
# holds, but are refused the same way). Whole 64-bit arguments are compared (a pid with any
# high bit set is refused, although the kernel reads only the low 32), so that the two sets
# never overlap: libseccomp's rules may not.
_Forms = tuple[tuple[tuple[int, str, int], ...], ...]
_PID_SELF: _Forms = (((0, "SCMP_CMP_EQ", 0),),)
_PID_OTHER: _Forms = (((0, "SCMP_CMP_NE", 0),),)
OWN_PROCESS_ONLY: dict[str, tuple[_Forms, _Forms]] = {
    # pid 0, or only reading (new limit NULL)
    "prlimit64": ((((0, "SCMP_CMP_EQ", 0),), ((2, "SCMP_CMP_EQ", 0),)),
                  (((0, "SCMP_CMP_NE", 0), (2, "SCMP_CMP_NE", 0)),)),
    # PRIO_PROCESS or PRIO_PGRP, who 0
    "setpriority": ((((0, "SCMP_CMP_EQ", 0), (1, "SCMP_CMP_EQ", 0)),
                     ((0, "SCMP_CMP_EQ", 1), (1, "SCMP_CMP_EQ", 0))),
                    (((0, "SCMP_CMP_GT", 1),), ((1, "SCMP_CMP_NE", 0),))),
    # IOPRIO_WHO_PROCESS or IOPRIO_WHO_PGRP, who 0
    "ioprio_set": ((((0, "SCMP_CMP_EQ", 1), (1, "SCMP_CMP_EQ", 0)),
                    ((0, "SCMP_CMP_EQ", 2), (1, "SCMP_CMP_EQ", 0))),
                   (((0, "SCMP_CMP_LT", 1),), ((0, "SCMP_CMP_GT", 2),),
                    ((1, "SCMP_CMP_NE", 0),))),
    "sched_setscheduler": (_PID_SELF, _PID_OTHER),
    "sched_setparam": (_PID_SELF, _PID_OTHER),
    "sched_setattr": (_PID_SELF, _PID_OTHER),
    "sched_setaffinity": (_PID_SELF, _PID_OTHER),
    "migrate_pages": (_PID_SELF, _PID_OTHER),
    "move_pages": (_PID_SELF, _PID_OTHER),
}
_ALLOWING = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")


def _forms(name: str, forms: _Forms, action: str, errno_ret: int | None,
           like: SyscallRule | None = None) -> list[SyscallRule]:
    return [SyscallRule(names=(name,), action=action, errno_ret=errno_ret,
                        args=tuple(ArgCondition(i, v, 0, op) for i, op, v in form),
                        includes=like.includes if like else RuleFilter(),
                        excludes=like.excludes if like else RuleFilter(),
                        comment="own process only")
            for form in forms]


def _own_process_only(profile: SeccompProfile) -> SeccompProfile:
    """The profile with each call of OWN_PROCESS_ONLY it allows allowed in its own-process
    forms only; the others fail with EPERM. Rewritten as rules for libseccomp, which keeps
    them in its decision tree (a stub in front of the program cost every syscall number a
    longer walk when the kernel builds its cache at load: ~25 us per exec here)."""
    rules: list[SyscallRule] = []
    named: set[str] = set()
    for i, rule in enumerate(profile.syscalls):
        mine = [n for n in rule.names if n in OWN_PROCESS_ONLY]
        named.update(mine)
        if not mine or rule.action not in _ALLOWING:
            rules.append(rule)
            continue
        if rule.args:
            raise PolicyError(f"syscalls[{i}] allows {mine[0]} under conditions of its own; "
                              "runs that share init's id allow it only on their own process, "
                              "so give it without args (or deny it)")
        rest = tuple(n for n in rule.names if n not in OWN_PROCESS_ONLY)
        if rest:
            rules.append(replace(rule, names=rest))
        for name in mine:
            rules += _forms(name, OWN_PROCESS_ONLY[name][0], rule.action, rule.errno_ret, rule)
    if profile.default_action in _ALLOWING:  # what no rule names is allowed: refuse the rest
        for name in sorted(set(OWN_PROCESS_ONLY) - named):
            rules += _forms(name, OWN_PROCESS_ONLY[name][1], "SCMP_ACT_ERRNO", errno.EPERM)
    return replace(profile, syscalls=tuple(rules))


def _cap_name(cap: str) -> str:
    cap = cap.upper()
    return cap if cap.startswith("CAP_") else f"CAP_{cap}"


def _action(name: str, errno_ret: int | None, where: str) -> int:
    eno = errno.EPERM if errno_ret is None else errno_ret
    match name:
        case "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD":
            return int(seccomp.KILL_THREAD)
        case "SCMP_ACT_KILL_PROCESS":
            return int(seccomp.KILL_PROCESS)
        case "SCMP_ACT_TRAP":
            return int(seccomp.TRAP)
        case "SCMP_ACT_ERRNO":
            return int(seccomp.ERRNO(eno))
        case "SCMP_ACT_TRACE":
            return int(seccomp.TRACE(eno))
        case "SCMP_ACT_ALLOW":
            return int(seccomp.ALLOW)
        case "SCMP_ACT_LOG":
            return int(seccomp.LOG)
    raise PolicyError(
        f"{where}: {name} is not supported (sandboxd runs no seccomp notify listener); "
        "use SCMP_ACT_ERRNO or SCMP_ACT_KILL_PROCESS"
    )


def _applies(rule: SyscallRule, goarch: str, caps: frozenset[str], kernel: tuple[int, int]) -> bool:
    """Docker's semantics: any matching exclude drops the rule; every include must hold."""
    exc, inc = rule.excludes, rule.includes
    if goarch in exc.arches or caps.intersection(exc.caps):
        return False
    if exc.min_kernel is not None and kernel >= exc.min_kernel:
        return False
    if inc.arches and goarch not in inc.arches:
        return False
    if not caps.issuperset(inc.caps):
        return False
    return inc.min_kernel is None or kernel >= inc.min_kernel


def _compat_arches(profile: SeccompProfile, native: str) -> list[str]:
    """Architectures to filter besides the native one: `architectures` (as runc adds them), and
    the archMap sub-architectures of the native entry (as Docker expands archMap)."""
    listed = list(profile.architectures)
    for arch, subs in profile.arch_map:
        if arch == native:
            listed.extend(subs)
    return [a for i, a in enumerate(listed) if a != native and a not in listed[:i]]


def _check_conflicts(rules: list[tuple[int, SyscallRule, int]], skipped: frozenset[str]) -> None:
    # A rule without args covers the whole syscall, and libseccomp then silently ignores every
    # other rule for it (a deny carved out of an allow would vanish). Refuse such profiles.
    whole: dict[str, tuple[int, int]] = {}
    for i, rule, action in rules:
        if not rule.args:
            for name in rule.names:
                whole.setdefault(name, (i, action))
    for i, rule, action in rules:
        for name in rule.names:
            first = whole.get(name)
            if name in skipped or first is None or first[1] == action:
                continue
            raise PolicyError(
                f"syscalls[{first[0]}] and syscalls[{i}] give {name} different actions, and "
                f"syscalls[{first[0]}] has no args, so libseccomp would ignore syscalls[{i}]; "
                f"spell the allowed cases of {name} out as rules with args instead"
            )
    for i, rule, _ in rules:
        indexes = [a.index for a in rule.args]
        if len(set(indexes)) != len(indexes):
            raise PolicyError(
                f"syscalls[{i}].args: two conditions on the same argument index; libseccomp "
                "cannot AND them, so use one condition per index or split the rule (rules are ORed)"
            )


def _known(name: str, arch_values: list[int]) -> bool:
    # Negative numbers are libseccomp's "not on this architecture" pseudo numbers.
    return any(int(seccomp.resolve_syscall(arch, name)) >= 0 for arch in arch_values)


def _native_arch() -> str:
    # Debian's binding gives Arch values as signed 32-bit ints, system_arch() as unsigned.
    native = int(seccomp.system_arch()) & 0xFFFFFFFF
    for name in ARCHITECTURES:
        value = getattr(seccomp.Arch, name.removeprefix("SCMP_ARCH_"), None)
        if value is not None and int(value) & 0xFFFFFFFF == native:
            return name
    raise PolicyError(f"libseccomp reports an unknown native architecture {native:#x}")


def _arch_value(name: str, where: str) -> int:
    value = getattr(seccomp.Arch, name.removeprefix("SCMP_ARCH_"), None)
    if value is None:
        raise PolicyError(f"{where}: {name} is not supported by this libseccomp")
    return int(value)


def _running_kernel() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if not match:
        raise PolicyError(f"cannot parse the kernel version {os.uname().release!r}")
    return int(match[1]), int(match[2])


def _export_bpf(flt: Any) -> bytes:
    # Both bindings only export to a file descriptor; a memfd avoids the disk and, unlike a
    # pipe, cannot block however large the program is.
    with open(os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC), "w+b") as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


# --------------------------------------------------------------------------- installing

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_NR = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


# Resolved at import so that install(), which runs between fork and execve, only makes calls.
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int


def install(program: bytes) -> None:
    """Load a compiled program into the calling thread. The caller has set no_new_privs."""
    count, rest = divmod(len(program), bpf.INSN_SIZE)
    if rest or not 0 < count <= bpf.MAX_INSNS:
        raise OSError(errno.EINVAL, f"not a BPF program: {len(program)} bytes")
    prog = _SockFprog(count, program)  # points at the bytes object; nothing is copied
    if _SECCOMP_NR is not None:
        rc = _syscall(
            ctypes.c_long(_SECCOMP_NR),
            ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(0),
            ctypes.byref(prog),
        )
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
    rc = _prctl(
        ctypes.c_int(_PR_SET_SECCOMP),
        ctypes.c_ulong(_SECCOMP_MODE_FILTER),
        ctypes.byref(prog),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
