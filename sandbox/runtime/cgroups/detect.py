"""Pick the cgroup driver this host allows, from /proc/self/mountinfo and /proc/self/cgroup."""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from sandbox.runtime.cgroups.base import CgroupDriver
from sandbox.runtime.cgroups.v1 import CONTROLLERS, V1Driver
from sandbox.runtime.cgroups.v2 import V2Driver


@dataclass(frozen=True)
class CgroupMount:
    path: Path  # where it is mounted (under the detection root)
    fstype: str  # "cgroup" (v1) or "cgroup2"
    controllers: frozenset[str]  # v1: the controllers this hierarchy carries
    root: str  # the part of the hierarchy this mount shows ("/" unless bind-mounted)
    options: frozenset[str] = frozenset()  # the superblock's options


@dataclass(frozen=True)
class Detection:
    driver: CgroupDriver | None
    warnings: tuple[str, ...]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str, root: Path = Path("/")) -> list[CgroupMount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        opts = set(fields[sep + 3].split(",")) if len(fields) > sep + 3 else set()
        mounts.append(CgroupMount(
            path=root / _unescape(fields[4]).lstrip("/"),
            fstype=fstype,
            controllers=frozenset(opts & set(CONTROLLERS)) if fstype == "cgroup" else frozenset(),
            root=_unescape(fields[3]), options=frozenset(opts)))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller (or "" for the v2 line) -> this process's cgroup path."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for c in parts[1].split(",") if parts[1] else [""]:
                out[c] = parts[2]
    return out


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def default_base_name(uid: int) -> str:
    return "sandboxd" if uid == 0 else f"sandboxd-{user_name(uid)}"


def detect(*, base_name: str | None = None, root: Path = Path("/"),
           uid: int | None = None) -> Detection:
    """Choose v2 when the unified hierarchy has the memory controller, else v1.

    root: the filesystem root to look under (tests point it at a fake tree).
    uid: whose service this is; root creates base cgroups, others need them delegated.
    """
    uid = os.geteuid() if uid is None else uid
    user = user_name(uid)
    name = base_name or default_base_name(uid)
    try:
        mounts = parse_mountinfo((root / "proc/self/mountinfo").read_text(), root)
        own = parse_proc_cgroup((root / "proc/self/cgroup").read_text())
    except OSError as e:
        return Detection(None, (f"cannot read /proc/self ({e.strerror}): no cgroup limits",))

    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v1: dict[str, str] = {}
    for m in mounts:
        for c in m.controllers:
            v1.setdefault(c, str(m.path))
    v2_memory = v2 is not None and "memory" in _controllers(v2.path)

    if v2 is not None and (v2_memory or "memory" not in v1):
        rel = own.get("", "/")
        if v2.root != "/" and (rel == v2.root or rel.startswith(v2.root + "/")):
            rel = rel[len(v2.root):] or "/"
        parent = str(v2.path / rel.lstrip("/")).rstrip("/")
        driver, warnings = V2Driver.at(
            parent, name, move_self=root == Path("/") and rel != "/",
            setup_hint=f"run sandboxd as a systemd service with Delegate=yes "
                       f"(`sandboxd setup --user {user}` as root prints the recipe)")
        if not v2_memory:
            warnings.insert(0, "no memory cgroup controller on this host: memory limits fall "
                               "back to rlimits")
        return Detection(driver, tuple(warnings))
    if "memory" in v1:
        driver1, warnings = V1Driver.at(
            v1, name, may_create=uid == 0,
            setup_hint=f"run `sandboxd setup --user {user}` as root")
        return Detection(driver1, tuple(warnings))
    return Detection(None, ("no cgroup hierarchy is mounted: memory and pids limits fall back "
                            "to rlimits",))


def _controllers(v2_mount: Path) -> set[str]:
    try:
        return set((v2_mount / "cgroup.controllers").read_text().split())
    except OSError:
        return set()
