"""Run profiles as data: policies/profiles/<name>.json names a seccomp policy, the root
filesystem's shape, the network and the limits (defaults and maxima) of every run.

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
from typing import Any

from sandbox.errors import PolicyError
from sandbox.runtime.rootfs import DEFAULT_TMPFS, TmpfsMount
from sandbox.runtime.seccomp import builtin_profile_path

# Operator choices that take a layer away, by Docker's names (--security-opt
# seccomp=unconfined, --network host); see "Policies" in docs/architecture.md for the risk.
UNCONFINED = "unconfined"    # seccomp: no filter at all
HOST_NETWORK = "host"        # network: no network namespace, the host's interfaces
NETWORKS = ("none", HOST_NETWORK)


@dataclass(frozen=True)
class Limits:
    """Per-run limits; None means "not limited" (or the profile's default once resolved)."""

    cpu_ms: int | None = None            # user + system CPU time of every process of the run
    wall_ms: int | None = None           # monotonic wall time from fork to exit
    memory_bytes: int | None = None      # peak resident memory of the run, swap off
    pids: int | None = None              # processes and threads at once
    output_bytes: int | None = None      # per stream (stdout, stderr), counted as it arrives
    file_size_bytes: int | None = None   # largest file a process may write (RLIMIT_FSIZE)
    open_files: int | None = None        # RLIMIT_NOFILE
    stack_bytes: int | None = None       # RLIMIT_STACK
    address_space_bytes: int | None = None  # RLIMIT_AS, only when asked
    cpu_quota_cores: float | None = None    # cpu bandwidth, e.g. 0.5 of one core
    cpuset: str | None = None               # e.g. "0" or "0-1"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "limits") -> Limits:
        if not isinstance(data, dict):
            raise PolicyError(f"{where}: expected an object of limits")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise PolicyError(f"{where}.{key}: unknown limit; known: {', '.join(known)}")
            if value is None:
                continue
            if key == "cpuset":
                value = format_cpuset(parse_cpuset(value, f"{where}.cpuset"))
            elif key == "cpu_quota_cores":
                if not isinstance(value, int | float) or isinstance(value, bool) \
                        or not MIN_QUOTA_CORES <= value <= MAX_QUOTA_CORES:
                    raise PolicyError(f"{where}.{key}: expected a number of cores from "
                                      f"{MIN_QUOTA_CORES} to {MAX_QUOTA_CORES}, such as 0.5")
            elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PolicyError(f"{where}.{key}: expected a positive integer, got {value!r}")
            values[key] = value
        return cls(**values)

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


# A cgroup's CPU bandwidth period is 100 ms and its quota at least 1 ms: 0.01 of a core.
MIN_QUOTA_CORES = 0.01
MAX_QUOTA_CORES = 4096
_MAX_CPU = 1 << 16
_CPU_RANGE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")


def parse_cpuset(text: Any, where: str) -> frozenset[int]:
    """The CPUs of a list such as "0-3,6" (the kernel's cpuset.cpus syntax)."""
    cpus: set[int] = set()
    parts = text.split(",") if isinstance(text, str) else [""]
    for part in parts:
        m = _CPU_RANGE.fullmatch(part)
        first, last = (int(m[1]), int(m[2] or m[1])) if m else (1, 0)
        if not m or first > last or last >= _MAX_CPU:
            raise PolicyError(f"{where}: expected a list of CPUs such as '0', '0-1' or '0,2', "
                              f"got {text!r}")
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


@dataclass(frozen=True)
class RootfsShape:
    writable: bool = False
    upper_size: int = 256 << 20
    tmpfs: tuple[TmpfsMount, ...] = DEFAULT_TMPFS
    sys: str = "none"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RootfsShape:
        if not isinstance(data, dict):
            raise PolicyError(f"{where}: expected an object")
        unknown = set(data) - {"writable", "upper_size", "tmpfs", "sys"}
        if unknown:
            raise PolicyError(f"{where}.{sorted(unknown)[0]}: unknown key; known: writable, "
                              "upper_size, tmpfs, sys")
        writable = data.get("writable", False)
        if not isinstance(writable, bool):
            raise PolicyError(f"{where}.writable: expected true or false")
        sys = data.get("sys", "none")
        if sys not in ("none", "ro"):
            raise PolicyError(f"{where}.sys: must be 'none' or 'ro'")
        raw = data.get("tmpfs", None)
        if raw is None:
            mounts = DEFAULT_TMPFS
        elif isinstance(raw, list):
            mounts = tuple(_tmpfs(m, f"{where}.tmpfs[{i}]") for i, m in enumerate(raw))
        else:
            raise PolicyError(f"{where}.tmpfs: expected a list of mounts")
        targets = [m.target for m in mounts]
        if len(set(targets)) != len(targets):
            raise PolicyError(f"{where}.tmpfs: a target appears twice")
        return cls(writable=writable,
                   upper_size=_positive(data.get("upper_size", 256 << 20),
                                        f"{where}.upper_size"),
                   tmpfs=mounts, sys=sys)


def _positive(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PolicyError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _tmpfs(raw: Any, where: str) -> TmpfsMount:
    if not isinstance(raw, dict) or not isinstance(raw.get("target"), str):
        raise PolicyError(f"{where}: expected {{\"target\": \"/path\", \"size\": bytes}}")
    unknown = set(raw) - {"target", "size", "inodes", "noexec"}
    if unknown:
        raise PolicyError(f"{where}.{sorted(unknown)[0]}: unknown key")
    target = raw["target"]
    # One of the container's own directories: not the root, not through .., not over the
    # kernel's views (proc, sys) and, in /dev, only one level down.
    if (not target.startswith("/") or target != posixpath.normpath(target) or target == "/"
            or target.startswith(("/proc", "/sys")) or "\0" in target
            or (target.startswith("/dev/") and target.count("/") != 2)
            or target == "/dev"):
        raise PolicyError(f"{where}.target: {target!r} is not a place a tmpfs may go; use a "
                          "normalised absolute path outside /proc and /sys")
    inodes = raw.get("inodes")
    noexec = raw.get("noexec", False)
    if not isinstance(noexec, bool):
        raise PolicyError(f"{where}.noexec: expected true or false")
    return TmpfsMount(target, _positive(raw.get("size"), f"{where}.size"),
                      None if inodes is None else _positive(inodes, f"{where}.inodes"), noexec)


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


def _capabilities(value: Any, profile: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"profile {profile!r}: capabilities must be a list of names such as "
                          "[\"CHOWN\", \"FOWNER\"]")
    names = tuple(v.upper().removeprefix("CAP_") for v in value)
    for name in names:
        if name not in CAPABILITIES:
            raise PolicyError(f"profile {profile!r}: capability {name!r} is not one a profile "
                              f"may keep; choose among {', '.join(sorted(CAPABILITIES))}")
    return names


def _seccomp_policy(value: Any, profile: str) -> str:
    """A built-in seccomp policy's name, or "unconfined"."""
    if not isinstance(value, str):
        raise PolicyError(f"profile {profile!r}: seccomp must be the name of a policy in "
                          f"policies/seccomp or {UNCONFINED!r}, got {value!r}")
    if value != UNCONFINED:
        try:
            builtin_profile_path(value)
        except PolicyError as e:
            raise PolicyError(f"profile {profile!r}: {e}, or {UNCONFINED!r}") from None
    return value


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
    if not isinstance(data, dict):
        raise PolicyError(f"profile {name!r}: expected a JSON object")
    network = data.get("network", "none")
    if network not in NETWORKS:
        raise PolicyError(f"profile {name!r}: network {network!r} is not one of 'none' (a "
                          "network namespace of its own, only lo) or 'host' (no namespace)")
    rootfs = RootfsShape.from_dict(data.get("rootfs", {}), f"{name}.rootfs")
    if network == HOST_NETWORK and rootfs.sys != "none":
        # The kernel mounts sysfs only for the owner of the network namespace.
        raise PolicyError(f"profile {name!r}: rootfs.sys 'ro' needs a network namespace of "
                          "the container's own; use network 'none' or rootfs.sys 'none'")
    limits = data.get("limits", {})
    maxima = Limits.from_dict(limits.get("maxima", {}), f"{name}.limits.maxima")
    cpus = host_cpus()
    maxima = replace(maxima, cpuset=maxima.cpuset or format_cpuset(cpus),
                     cpu_quota_cores=maxima.cpu_quota_cores or float(len(cpus)))
    defaults = Limits.from_dict(limits.get("defaults", {}), f"{name}.limits.defaults")
    defaults.check_within(maxima, f"{name}.limits.defaults")
    return Profile(
        name=name,
        description=str(data.get("description", "")),
        seccomp=_seccomp_policy(data.get("seccomp", "default"), name),
        network=network,
        rootfs=rootfs,
        defaults=defaults,
        maxima=maxima,
        capabilities=_capabilities(data.get("capabilities", []), name),
    )
