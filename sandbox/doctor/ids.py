"""The ids a container maps: the user's subordinate ranges and the setuid helpers that map
them (see sandbox/runtime/idmap.py for how the mapping is chosen)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sandbox.doctor import podspec
from sandbox.doctor.findings import Finding, Level
from sandbox.doctor.host import Host
from sandbox.runtime import idmap

RANGE = 65536  # a container maps 0-65535 (root) or 1-65535 above the user's own id
FIRST = 100000  # where usermod's automatic ranges start (SUB_UID_MIN in login.defs)
HELPERS = ("newuidmap", "newgidmap")
PROGRAM_DIRS = ("usr/local/bin", "usr/bin", "bin", "usr/sbin", "sbin")

Span = tuple[int, int]  # [start, end)


def _subordinate(text: str | None) -> list[Span]:
    """Every range of an /etc/subuid-style file (name:start:count), whoever's."""
    spans = []
    for line in (text or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            spans.append((int(parts[1]), int(parts[1]) + int(parts[2])))
    return spans


def _mapped(text: str | None) -> list[Span]:
    """The ids this user namespace has, from /proc/self/uid_map (inside outside count);
    all of them when it cannot be read."""
    spans = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
            spans.append((int(parts[0]), int(parts[0]) + int(parts[2])))
    return spans or [(0, 2**32 - 1)]


def _free(mapped: list[Span], taken: list[Span]) -> Span | None:
    """A range for a user: a 65536 block from FIRST when the namespace has one free (the
    initial namespace), else the widest free stretch (a pod's namespace maps 65536 ids)."""
    def clear(a: int, b: int) -> bool:
        return (any(m0 <= a and b <= m1 for m0, m1 in mapped)
                and not any(a < t1 and t0 < b for t0, t1 in taken))

    for start in range(FIRST, FIRST + 1024 * RANGE, RANGE):
        if clear(start, start + RANGE):
            return start, start + RANGE
    best: Span | None = None
    for m0, m1 in mapped:
        cut = m0  # the lowest id not yet known to be taken
        for t0, t1 in [*sorted(taken), (m1, m1)]:
            end = min(t0, m1)
            if end > cut and (best is None or end - cut > best[1] - best[0]):
                best = (cut, end)
            cut = max(cut, t1)
            if cut >= m1:
                break
    return best


def subids(host: Host) -> Finding:
    files = ("etc/subuid", "etc/subgid")
    found = [idmap.read_subordinate(host.root / f, host.user, host.uid) for f in files]
    maps = [_mapped(host.read(f"proc/self/{m}")) for m in ("uid_map", "gid_map")]
    outside = [(f, r) for f, r, mapped in zip(files, found, maps, strict=True)
               if r is not None and not any(m0 <= r[0] and r[0] + r[1] <= m1
                                            for m0, m1 in mapped)]
    u, g = found
    if u is not None and g is not None and not outside:
        return Finding("subids", Level.OK, f"{host.user} has uids {u[0]}-{u[0] + u[1] - 1} "
                                           f"and gids {g[0]}-{g[0] + g[1] - 1}")
    # A range of this user's that lies outside the namespace is given up, not kept.
    taken = [(0, 1000), (host.uid, host.uid + 1)] + [  # root and system accounts too
        t for f in files for t in _subordinate(host.read(f))
        if not any(t[0] == r[0] for _, r in outside)]
    free = _free(maps[0], taken)
    if free is None:
        fix = ("start sandboxd outside this user namespace, or in one that maps a range of "
               "ids (/proc/self/uid_map; a pod with hostUsers: false maps 65536)")
    else:
        span = f"{free[0]}-{free[1] - 1}"
        dropped = "".join(f" --del-sub{f[-3:]}s {r[0]}-{r[0] + r[1] - 1}" for f, r in outside)
        added = "".join(f" --add-sub{f[-3:]}s {span}" for f, r in zip(files, found, strict=True)
                        if r is None or any(f == o for o, _ in outside))
        usermod = f"usermod{dropped}{added} {host.user}"
        fix = (f"in the image, a RUN line of its Dockerfile before USER: {usermod}"
               if host.in_kubernetes else host.as_root(usermod))
        if host.no_new_privs and host.uid != 0:
            fix += ("; and newuidmap, which maps them, is setuid: "
                    + (f"in the pod spec, {podspec.ESCALATION}" if host.in_kubernetes
                       else "start sandboxd without no_new_privs"))
    if outside:
        where = ", ".join(f"/{f} {r[0]}:{r[1]}" for f, r in outside)
        return Finding("subids", Level.FAIL,
                       f"{where} of {host.user} lies outside the ids this user namespace "
                       "maps (/proc/self/uid_map): no container's id map can be written, so "
                       "every container would fail to start", fix=fix)
    missing = " and ".join(f"/{f}" for f, r in zip(files, found, strict=True) if r is None)
    if host.uid == 0:
        return Finding("subids", Level.FAIL,
                       f"no range for root in {missing}: a service run as root needs one so "
                       "that container root is not host root", fix=fix)
    return Finding("subids", Level.WARN,
                   f"no range for {host.user} in {missing}: containers map one id only, and "
                   "untrusted code runs as container root (without capabilities) instead of "
                   "65534", fix=fix)


def _which(host: Host, program: str) -> Path | None:
    return next((p for d in PROGRAM_DIRS if (p := host.root / d / program).exists()), None)


def _privileged(program: Path) -> bool:
    """setuid root, or given file capabilities (some distributions' way)."""
    st = program.stat()
    if st.st_uid == 0 and st.st_mode & stat.S_ISUID:
        return True
    try:
        return bool(os.getxattr(program, "security.capability"))
    except OSError:
        return False


def newuidmap(host: Host) -> Finding:
    if host.uid == 0:
        return Finding("newuidmap", Level.OK, "not needed: root writes its id maps itself")
    if idmap.read_subordinate(host.root / "etc/subuid", host.user, host.uid) is None:
        return Finding("newuidmap", Level.SKIPPED, "not used without subordinate ids")
    found = {p: _which(host, p) for p in HELPERS}
    missing = [p for p, path in found.items() if path is None]
    if missing:
        return Finding("newuidmap", Level.WARN,
                       f"{' and '.join(missing)} not found: containers map one id only "
                       "(untrusted code runs as container root, without capabilities)",
                       fix=("in the image: apt-get install uidmap" if host.in_kubernetes
                            else host.as_root("apt-get install uidmap")))
    unprivileged = [p for p, path in found.items() if path and not _privileged(path)]
    if unprivileged:
        return Finding("newuidmap", Level.FAIL,
                       "not setuid root, nor given file capabilities: "
                       f"{' and '.join(unprivileged)}; no container's id map can be written",
                       fix=host.as_root("apt-get install --reinstall uidmap (Debian's are "
                                        "setuid root)"))
    if host.no_new_privs:
        return Finding(
            "newuidmap", Level.FAIL,
            "this process runs with no_new_privs, so newuidmap's setuid bit does nothing "
            "and no container's id map can be written",
            fix=(f"in the pod spec: {podspec.ESCALATION}" if host.in_kubernetes else
                 "start sandboxd without no_new_privs (systemd: NoNewPrivileges=no; Docker: "
                 "without --security-opt no-new-privileges)"))
    return Finding("newuidmap", Level.OK, "newuidmap and newgidmap are setuid root")

