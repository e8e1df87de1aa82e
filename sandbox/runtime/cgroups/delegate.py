"""Hand a cgroup subtree to an ordinary user, for `sandboxd setup --user NAME` (run as root)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from sandbox.errors import CgroupError
from sandbox.runtime.cgroups import base
from sandbox.runtime.cgroups.detect import parse_mountinfo
from sandbox.runtime.cgroups.v1 import CONTROLLERS


def _v1_dirs(user: str, root: Path) -> list[tuple[Path, frozenset[str]]]:
    """The base directory for user in each distinct v1 hierarchy sandboxd uses."""
    try:
        mounts = parse_mountinfo((root / "proc/self/mountinfo").read_text(), root)
    except OSError as e:
        raise CgroupError(f"cannot read /proc/self/mountinfo: {e.strerror}") from e
    seen: dict[Path, frozenset[str]] = {}
    for m in mounts:
        if m.fstype == "cgroup" and m.controllers and m.path not in seen:
            seen[m.path] = m.controllers
    return [(p / f"sandboxd-{user}", ctls) for p, ctls in seen.items()
            if ctls & set(CONTROLLERS)]


def delegate_v1(user: str, *, root: Path = Path("/")) -> list[Path]:
    """Make /sys/fs/cgroup/<hierarchy>/sandboxd-<user> in each hierarchy, owned by user."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError as e:
        raise CgroupError(f"no such user {user!r}") from e
    made: list[Path] = []
    for d, ctls in _v1_dirs(user, root):
        try:
            d.mkdir(exist_ok=True)
            if "cpuset" in ctls:
                base.cpuset_copy_parent(str(d))
            # The user must write limits and cgroup.procs here and make children.
            os.chown(d, pw.pw_uid, pw.pw_gid)
            for entry in d.iterdir():
                if entry.is_file():
                    os.chown(entry, pw.pw_uid, pw.pw_gid)
        except OSError as e:
            raise CgroupError(f"cannot delegate {d} to {user}: {e.strerror}") from e
        made.append(d)
    if not made:
        raise CgroupError("no cgroup v1 hierarchy is mounted: nothing to delegate")
    return made


def undelegate_v1(user: str, *, root: Path = Path("/")) -> list[Path]:
    """Remove what delegate_v1 made (empty children first); missing ones are skipped."""
    removed: list[Path] = []
    for d, _ctls in _v1_dirs(user, root):
        if d.is_dir():
            base.remove_tree(str(d))
            removed.append(d)
    return removed


def systemd_recipe_v2(user: str) -> str:
    """What a cgroup v2 (systemd) host's admin runs so that user's sandboxd gets limits."""
    return f"""\
# cgroup v2: let systemd delegate the memory, pids, cpu and cpuset controllers to the
# user managers (user@UID.service), so {user}'s services may create limited cgroups.
mkdir -p /etc/systemd/system/user@.service.d
cat > /etc/systemd/system/user@.service.d/delegate.conf <<'EOF'
[Service]
Delegate=memory pids cpu cpuset
EOF
systemctl daemon-reload
# Takes effect when {user}'s user manager restarts (log out and in again, or as root:
# systemctl restart user@$(id -u {user}).service).
#
# Then {user} runs sandboxd as a user service with a delegated cgroup of its own, e.g.:
#   systemd-run --user --unit=sandboxd -p Delegate=yes sandboxd serve
# or with `Delegate=yes` in the [Service] section of ~/.config/systemd/user/sandboxd.service.
# sandboxd reads its cgroup from the `0::` line of /proc/self/cgroup (e.g.
# /user.slice/user-UID.slice/user@UID.service/app.slice/sandboxd.service), moves itself
# into the leaf sandboxd-{user}-supervisor there, and creates its containers' cgroups under
# sandboxd-{user}. Check with: cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/cgroup.controllers
"""
