"""Run profiles as data: policies/profiles/<name>.json names a seccomp policy, the root
filesystem's shape, the network and the limits (defaults and maxima) of every run.

Each part of a file is declared once: `Limits` (a dataclass, its fields' types with their
ranges), and the Tables below for the rest; sandbox.configfile reads them. What a key alone
cannot say (defaults within maxima, a tmpfs target twice, sysfs without a network
namespace of its own) is checked in code once they are read.

CPUs: a file cannot know the host's, so a profile without `maxima.cpuset` gets the CPUs
this service may run on (its affinity), and one without `maxima.cpu_quota_cores` as many
cores; whatever the maxima, a run's cpuset must name CPUs that exist here.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from sandbox.configfile import Table, read, table_of
from sandbox.errors import PolicyError
from sandbox.kept import Kept
from sandbox.runtime.rootfs import DEFAULT_TMPFS, TmpfsMount
from sandbox.runtime.seccomp import builtin_profile_path
from sandbox.validation import Invalid

# Operator choices that take a layer away, by Docker's names (--security-opt
# seccomp=unconfined, --network host); see "Policies" in docs/architecture.md for the risk.
UNCONFINED = "unconfined"    # seccomp: no filter at all
HOST_NETWORK = "host"        # network: no network namespace, the host's interfaces


# A cgroup's CPU bandwidth period is 100 ms and its quota at least 1 ms: 0.01 of a core.
MIN_QUOTA_CORES = 0.01
MAX_QUOTA_CORES = 4096
_MAX_CPU = 1 << 16
_CPU_RANGE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
_CPUS = "a list of CPUs such as '0', '0-1' or '0,2'"

Positive = Annotated[int, Meta(gt=0, description="a positive integer")]
Cores = Annotated[float, Meta(ge=MIN_QUOTA_CORES, le=MAX_QUOTA_CORES, description=(
    f"a number of cores from {MIN_QUOTA_CORES} to {MAX_QUOTA_CORES}, such as 0.5"))]
CpuList = Annotated[str, Meta(pattern=rf"^{_CPU_RANGE.pattern}(?:,{_CPU_RANGE.pattern})*$",
                              description=_CPUS)]


_tables: Kept[tuple[Any, ...], Limits] = Kept()   # Limits.from_dict's tables read


@dataclass(frozen=True)
class Limits:
    """Per-run limits; None means "not limited" (or the profile's default once resolved)."""

    cpu_ms: Positive | None = None       # user + system CPU time of every process of the run
    wall_ms: Positive | None = None      # monotonic wall time from fork to exit
    memory_bytes: Positive | None = None  # peak resident memory of the run, swap off
    pids: Positive | None = None         # processes and threads at once
    output_bytes: Positive | None = None  # per stream (stdout, stderr), counted as it arrives
    file_size_bytes: Positive | None = None  # largest file a process may write (RLIMIT_FSIZE)
    open_files: Positive | None = None   # RLIMIT_NOFILE
    stack_bytes: Positive | None = None  # RLIMIT_STACK
    address_space_bytes: Positive | None = None  # RLIMIT_AS, only when asked
    cpu_quota_cores: Cores | None = None  # cpu bandwidth, e.g. 0.5 of one core
    cpuset: CpuList | None = None        # e.g. "0" or "0-1"

    @classmethod
    def from_dict(cls, data: Any, where: str = "limits") -> Limits:
        """A limits table (a request's or a profile's) read and checked. A judge sends the
        same table with every run and case: each distinct one (its keys, values and their
        types: 1 and true are not the same ask) is read once (~5-12 µs each time on a
        run's path), the last kept.KEPT kept; a refused one never."""
        try:
            key = (cls, *((k, type(v), v) for k, v in data.items()))
            known = _tables.get(key)
        except (AttributeError, TypeError):   # not a table, or a value that cannot be a key
            key = known = None
        if known is not None:
            return known
        limits = cls._read(data, where)
        return limits if key is None else _tables.keep(key, limits)

    @classmethod
    def _read(cls, data: Any, where: str) -> Limits:
        try:
            table = read(data, _LimitsTable, where, json=True)
        except Invalid as e:
            raise PolicyError(str(e)) from None
        limits = cls(*msgspec.structs.astuple(table))   # the same fields, in order
        if limits.cpuset is None:
            return limits
        # the pattern has the form; the numbers' order and range, and the canonical spelling
        return replace(limits, cpuset=format_cpuset(parse_cpuset(limits.cpuset,
                                                                 f"{where}.cpuset")))

    def over(self, defaults: Limits) -> Limits:
        """These limits, with every unset one taken from `defaults`."""
        return replace(defaults, **{f.name: getattr(self, f.name) for f in fields(self)
                                    if getattr(self, f.name) is not None})

    def check_within(self, maxima: Limits, where: str = "limits") -> None:
        for f in fields(self):
            value, top = getattr(self, f.name), getattr(maxima, f.name)
            if f.name == "cpuset":
                if value is not None:
                    _check_cpuset(value, top, f"{where}.cpuset")
            elif value is not None and top is not None and value > top:
                raise PolicyError(f"{where}.{f.name}: {value} is above this profile's maximum "
                                  f"of {top}; ask for at most {top}")


_LimitsTable = table_of(Limits, "limit")


def parse_cpuset(text: Any, where: str) -> frozenset[int]:
    """The CPUs of a list such as "0-3,6" (the kernel's cpuset.cpus syntax)."""
    cpus: set[int] = set()
    parts = text.split(",") if isinstance(text, str) else [""]
    for part in parts:
        m = _CPU_RANGE.fullmatch(part)
        first, last = (int(m[1]), int(m[2] or m[1])) if m else (1, 0)
        if not m or first > last or last >= _MAX_CPU:
            raise PolicyError(f"{where}: expected {_CPUS}, got {text!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpuset(cpus: frozenset[int]) -> str:
    """The shortest list for `cpus`: "0-3,6"."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def host_cpus() -> frozenset[int]:
    """The CPUs this process may run on: those a run's cpuset may name."""
    return frozenset(os.sched_getaffinity(0))


def _check_cpuset(value: str, top: str | None, where: str) -> None:
    asked = parse_cpuset(value, where)
    allowed = host_cpus()
    if top is not None:
        allowed &= parse_cpuset(top, where)
    if not asked <= allowed:
        why = (f"CPUs this host does not have ({format_cpuset(asked - host_cpus())})"
               if not asked <= host_cpus() else f"CPUs outside this profile's maximum {top}")
        raise PolicyError(f"{where}: {value} names {why}; ask for a subset of "
                          f"{format_cpuset(allowed)}")


class TmpfsTarget(str):
    """Where a tmpfs goes: one of the container's own directories; not the root, not through
    .., not over the kernel's views (proc, sys) and, in /dev, only one level down."""

    @classmethod
    def from_config(cls, target: Any) -> TmpfsTarget:
        if not isinstance(target, str) or not target.startswith("/") \
                or target != posixpath.normpath(target) or target == "/" \
                or target.startswith(("/proc", "/sys")) or "\0" in target \
                or (target.startswith("/dev/") and target.count("/") != 2) or target == "/dev":
            raise ValueError(f"{target!r} is not a place a tmpfs may go; use a normalised "
                             "absolute path outside /proc and /sys")
        return cls(target)


class TmpfsTable(Table):
    config_word = "key"

    target: TmpfsTarget
    size: Positive
    inodes: Positive | None = None
    noexec: bool = False


class RootfsTable(Table):
    config_word = "key"

    writable: bool = False
    upper_size: Positive = 256 << 20
    tmpfs: tuple[TmpfsTable, ...] | None = None     # None: DEFAULT_TMPFS
    sys: Literal["none", "ro"] = "none"


_ROOTFS = RootfsTable()


@dataclass(frozen=True)
class RootfsShape:
    """A profile's root filesystem (the `rootfs` object of its file: RootfsTable)."""

    writable: bool = _ROOTFS.writable
    upper_size: int = _ROOTFS.upper_size
    tmpfs: tuple[TmpfsMount, ...] = DEFAULT_TMPFS
    sys: str = _ROOTFS.sys

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RootfsShape:
        try:
            return cls.of(read(data, RootfsTable, where, json=True), where)
        except Invalid as e:
            raise PolicyError(str(e)) from None

    @classmethod
    def of(cls, table: RootfsTable, where: str) -> RootfsShape:
        mounts = DEFAULT_TMPFS if table.tmpfs is None else tuple(
            TmpfsMount(m.target, m.size, m.inodes, m.noexec) for m in table.tmpfs)
        targets = [m.target for m in mounts]
        if len(set(targets)) != len(targets):
            raise PolicyError(f"{where}.tmpfs: a target appears twice")
        return cls(writable=table.writable, upper_size=table.upper_size, tmpfs=mounts,
                   sys=table.sys)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    seccomp: str
    network: str
    rootfs: RootfsShape
    defaults: Limits
    maxima: Limits
    capabilities: tuple[str, ...] = ()   # what container root keeps (see CAPABILITIES)

    @property
    def capability_mask(self) -> int:
        mask = 0
        for name in self.capabilities:
            mask |= 1 << CAPABILITIES[name]
        return mask

    def resolve(self, asked: Limits | None) -> Limits:
        """The limits of one run: what was asked, within the maxima, defaults for the rest."""
        asked = asked or Limits()
        asked.check_within(self.maxima)
        return asked.over(self.defaults)


_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# What a profile may let container root keep (linux/capability.h numbers): Docker's default
# set and nothing beyond it. They act only inside the container's user namespace, on its
# own files and processes; a run as any other uid holds none.
CAPABILITIES = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5,
                "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_RAW": 13,
                "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31}


class Capability(str):
    """A capability's name, upper case, without CAP_."""

    @classmethod
    def from_config(cls, value: Any) -> Capability:
        name = value.upper().removeprefix("CAP_") if isinstance(value, str) else value
        if name not in CAPABILITIES:
            raise ValueError(f"capability {name!r} is not one a profile may keep; choose "
                             f"among {', '.join(sorted(CAPABILITIES))}")
        return cls(name)


class SeccompPolicy(str):
    """A built-in seccomp policy's name, or "unconfined"."""

    @classmethod
    def from_config(cls, value: Any) -> SeccompPolicy:
        if not isinstance(value, str):
            raise ValueError(f"expected the name of a policy in policies/seccomp or "
                             f"{UNCONFINED!r}, got {value!r}")
        if value != UNCONFINED:
            try:
                builtin_profile_path(value)
            except PolicyError as e:
                raise ValueError(f"{e}, or {UNCONFINED!r}") from None
        return cls(value)


class LimitsTables(Table):
    config_word = "key"

    defaults: dict[str, Any] = msgspec.field(default_factory=dict)   # Limits reads each
    maxima: dict[str, Any] = msgspec.field(default_factory=dict)


class ProfileFile(Table):
    """policies/profiles/<name>.json."""

    config_word = "key"

    description: str = ""
    seccomp: SeccompPolicy = SeccompPolicy("default")
    network: Annotated[Literal["none", "host"], Meta(description=(
        "'none' (a network namespace of its own, only lo) or 'host' (no namespace)"))] = "none"
    rootfs: RootfsTable = _ROOTFS
    limits: LimitsTables = LimitsTables()
    capabilities: Annotated[tuple[Capability, ...], Meta(description=(
        'a list of names such as ["CHOWN", "FOWNER"]'))] = ()


def profile_path(name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise PolicyError(f"profile {name!r}: a profile name is lowercase letters, digits, - and _")
    path = Path(str(resources.files("policies") / "profiles" / f"{name}.json"))
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise PolicyError(f"profile {name!r} does not exist; known profiles: {', '.join(known)}")
    return path


def load_profile(name: str, path: Path | None = None) -> Profile:
    path = path or profile_path(name)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PolicyError(f"profile {name!r} ({path}) cannot be read: {e}") from e
    try:
        file = read(data, ProfileFile, json=True)
    except Invalid as e:
        raise PolicyError(f"profile {name!r}: {e}") from None
    rootfs = RootfsShape.of(file.rootfs, f"{name}.rootfs")
    if file.network == HOST_NETWORK and rootfs.sys != "none":
        # The kernel mounts sysfs only for the owner of the network namespace.
        raise PolicyError(f"profile {name!r}: rootfs.sys 'ro' needs a network namespace of "
                          "the container's own; use network 'none' or rootfs.sys 'none'")
    maxima = Limits.from_dict(file.limits.maxima, f"{name}.limits.maxima")
    cpus = host_cpus()
    maxima = replace(maxima, cpuset=maxima.cpuset or format_cpuset(cpus),
                     cpu_quota_cores=maxima.cpu_quota_cores or float(len(cpus)))
    defaults = Limits.from_dict(file.limits.defaults, f"{name}.limits.defaults")
    defaults.check_within(maxima, f"{name}.limits.defaults")
    return Profile(name=name, description=file.description, seccomp=file.seccomp,
                   network=file.network, rootfs=rootfs, defaults=defaults, maxima=maxima,
                   capabilities=file.capabilities)
