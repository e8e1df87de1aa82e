"""Run profiles as data: policies/profiles/<name>.json names a seccomp policy, the root
filesystem's shape, the network and the limits (defaults and maxima) of every run."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from sandbox.errors import PolicyError


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
                if not isinstance(value, str) or not re.fullmatch(r"[0-9,\-]+", value):
                    raise PolicyError(f"{where}.cpuset: expected a cpu list such as '0-1'")
            elif key == "cpu_quota_cores":
                if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                    raise PolicyError(f"{where}.{key}: expected a positive number")
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
            if value is not None and top is not None and not isinstance(value, str) and value > top:
                raise PolicyError(f"{where}.{f.name}: {value} is above this profile's maximum "
                                  f"of {top}; ask for at most {top}")


@dataclass(frozen=True)
class RootfsShape:
    writable: bool = False
    upper_size: int = 256 << 20
    tmp_size: int = 64 << 20
    tmp_inodes: int = 4096
    shm_size: int = 16 << 20
    sys: str = "none"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    seccomp: str
    network: str
    rootfs: RootfsShape
    defaults: Limits
    maxima: Limits

    def resolve(self, asked: Limits | None) -> Limits:
        """The limits of one run: what was asked, within the maxima, defaults for the rest."""
        asked = asked or Limits()
        asked.check_within(self.maxima)
        return asked.over(self.defaults)


_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


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
    if network != "none":
        raise PolicyError(f"profile {name!r}: network {network!r} is not supported yet; use 'none'")
    shape = data.get("rootfs", {})
    try:
        rootfs = RootfsShape(**shape)
    except TypeError as e:
        raise PolicyError(f"profile {name!r}: rootfs: {e}") from e
    if rootfs.sys not in ("none", "ro"):
        raise PolicyError(f"profile {name!r}: rootfs.sys must be 'none' or 'ro'")
    limits = data.get("limits", {})
    return Profile(
        name=name,
        description=str(data.get("description", "")),
        seccomp=str(data.get("seccomp", "default")),
        network=network,
        rootfs=rootfs,
        defaults=Limits.from_dict(limits.get("defaults", {}), f"{name}.limits.defaults"),
        maxima=Limits.from_dict(limits.get("maxima", {}), f"{name}.limits.maxima"),
    )
