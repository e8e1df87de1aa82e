"""A container's root filesystem as data: an ordered list of mount operations.

`plan()` turns a `RootfsSpec` into operations (as bubblewrap's --bind/--tmpfs/--proc list
does); `execute()` carries them out inside the container's fresh mount namespace, in order,
up to the proc mount, and the container's init does the rest, ending with pivot_root.
Reading the plan tells exactly what a container sees.

Targets are paths inside the container ("/proc"), joined to the staging root.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from sandbox.errors import RuntimeSetupError
from sandbox.runtime import syscalls as sc

# Where the new root is assembled: a tmpfs mounted over /tmp in the container's own mount
# namespace. The host's /tmp is untouched; sources are reached through fds opened earlier.
STAGING = "/tmp"
NEW_ROOT = "/tmp/root"
RW_DIR = "/tmp/rw"

# Docker's defaults (moby daemon/pkg/oci/defaults.go): hidden, and read-only, parts of /proc.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
    "/proc/timer_stats", "/sys/devices/virtual/powercap", "/sys/firmware",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
             ("ptmx", "pts/ptmx"))

_SAFE = sc.MS_NOSUID | sc.MS_NODEV


@dataclass(frozen=True)
class TmpfsMount:
    """A private, size-limited tmpfs, given back empty by every reset."""

    target: str
    size: int                        # bytes
    inodes: int | None = None
    noexec: bool = False


DEFAULT_TMPFS = (TmpfsMount("/tmp", 64 << 20, 4096), TmpfsMount("/dev/shm", 16 << 20,
                                                                 noexec=True))


@dataclass(frozen=True)
class RootfsSpec:
    """What a container's filesystem is made of; sizes in bytes."""

    layers: tuple[str, ...]          # host directories, lowest first; one = a plain directory root
    writable: bool = False           # an overlay upper on a size-limited tmpfs
    upper_size: int = 256 << 20
    tmpfs: tuple[TmpfsMount, ...] = DEFAULT_TMPFS
    sys: str = "none"                # "none" (absent) or "ro" (read-only sysfs)


@dataclass(frozen=True)
class Tmpfs:
    target: str
    size: int
    mode: int = 0o1777
    inodes: int | None = None
    flags: int = _SAFE
    resettable: bool = False         # given back empty by a container reset
    staging: bool = False            # a staging path rather than one inside the new root


@dataclass(frozen=True)
class Bind:
    source: str                      # a host path (or /proc/self/fd/N), not joined to the root
    target: str
    readonly: bool = True
    flags: int = _SAFE


@dataclass(frozen=True)
class Overlay:
    lowers: tuple[str, ...]          # topmost first, as overlayfs wants them
    target: str
    upper: str | None = None         # staging paths, outside the new root
    work: str | None = None


@dataclass(frozen=True)
class Proc:
    target: str


@dataclass(frozen=True)
class Sysfs:
    target: str


@dataclass(frozen=True)
class DevPts:
    target: str


@dataclass(frozen=True)
class Mkdir:
    target: str
    mode: int = 0o755
    staging: bool = False            # a staging path rather than one inside the new root


@dataclass(frozen=True)
class Touch:
    target: str


@dataclass(frozen=True)
class Symlink:
    link_to: str
    target: str


@dataclass(frozen=True)
class Mask:
    target: str                      # /dev/null over a file, an empty read-only tmpfs over a dir


@dataclass(frozen=True)
class ReadOnly:
    target: str


@dataclass(frozen=True)
class RemountReadOnly:
    target: str
    flags: int = _SAFE | sc.MS_NOEXEC


@dataclass(frozen=True)
class PivotRoot:
    pass


Op = (Tmpfs | Bind | Overlay | Proc | Sysfs | DevPts | Mkdir | Touch | Symlink | Mask | ReadOnly
      | RemountReadOnly | PivotRoot)


@dataclass
class Plan:
    ops: list[Op] = field(default_factory=list)

    def resettable(self) -> list[Tmpfs]:
        return [op for op in self.ops if isinstance(op, Tmpfs) and op.resettable]


def plan(spec: RootfsSpec, sources: list[str]) -> Plan:
    """Operations for `spec`; `sources[i]` is how to reach `spec.layers[i]` (e.g. an fd path)."""
    if not sources:
        raise RuntimeSetupError("a container needs a root directory or at least one layer")
    p = Plan()
    add = p.ops.append
    add(Tmpfs(STAGING, 1 << 20, mode=0o755, staging=True))
    add(Mkdir(NEW_ROOT, staging=True))
    if spec.writable:
        add(Mkdir(RW_DIR, staging=True))
        add(Tmpfs(RW_DIR, spec.upper_size, mode=0o755, staging=True))
        add(Mkdir(f"{RW_DIR}/upper", staging=True))
        add(Mkdir(f"{RW_DIR}/work", staging=True))
        add(Overlay(tuple(reversed(sources)), "/", f"{RW_DIR}/upper", f"{RW_DIR}/work"))
    elif len(sources) == 1:
        add(Bind(sources[0], "/", readonly=True))
    else:
        # Overlay without an upper layer is read-only by construction.
        add(Overlay(tuple(reversed(sources)), "/"))
    add(Proc("/proc"))
    add(Tmpfs("/dev", 64 << 10, mode=0o755, flags=_SAFE | sc.MS_NOEXEC | sc.MS_STRICTATIME))
    for dev in DEVICES:
        add(Touch(f"/dev/{dev}"))
        add(Bind(f"/dev/{dev}", f"/dev/{dev}", readonly=False, flags=sc.MS_NOSUID | sc.MS_NOEXEC))
    add(Mkdir("/dev/pts"))
    add(DevPts("/dev/pts"))
    in_dev = [m for m in spec.tmpfs if m.target.startswith("/dev/")]
    for m in in_dev:  # /dev is ours (a tmpfs) until it is sealed below
        add(Mkdir(m.target))
        add(_tmpfs_op(m))
    for name, to in DEV_LINKS:
        add(Symlink(to, f"/dev/{name}"))
    add(RemountReadOnly("/dev"))
    for m in spec.tmpfs:
        if m not in in_dev:
            add(_tmpfs_op(m))
    if spec.sys == "ro":
        add(Sysfs("/sys"))
    for path in MASKED_PATHS:
        if spec.sys == "ro" or path.startswith("/proc/"):
            add(Mask(path))
    for path in READONLY_PATHS:
        add(ReadOnly(path))
    add(PivotRoot())
    return p


def _tmpfs_op(m: TmpfsMount) -> Tmpfs:
    return Tmpfs(m.target, m.size, inodes=m.inodes, resettable=True,
                 flags=_SAFE | (sc.MS_NOEXEC if m.noexec else 0))


def _join(root: str, target: str) -> str:
    return root + target if target != "/" else root


def _mkdir_mountpoint(path: str, writable: bool) -> None:
    if os.path.isdir(path):
        return
    if not writable:
        raise RuntimeSetupError(
            f"the root filesystem has no {path.removeprefix(NEW_ROOT)} directory and is "
            "read-only; add the directory to the image")
    os.makedirs(path, mode=0o755, exist_ok=True)


def _tmpfs(op: Tmpfs, path: str) -> None:
    # Owned by container root whoever mounts it: a reset remounts as init (native/scratch.c,
    # which mounts them the same way), by then under an id of its own (idmap.init_uid).
    data = f"size={op.size},mode={op.mode:o},uid=0,gid=0"
    if op.inodes:
        data += f",nr_inodes={op.inodes}"
    sc.mount("tmpfs", path, "tmpfs", op.flags, data)


def execute(p: Plan, *, writable: bool) -> list[dict[str, str]]:
    """Carry out a plan in a fresh mount namespace (as root of its user namespace), but for
    the proc mount and the ops at the plan's end that need it (the masks, the read-only
    parts, pivot_root): those are init's, in the container's pid namespace (a proc mount
    shows the pid namespace of whoever mounts it; native/mounts.c). Returned in order, as
    init's configuration takes them, their mount points made."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    root = NEW_ROOT
    for_init: list[dict[str, str]] = []
    for op in p.ops:
        # Init does its part after all of this: the plan's end, and the proc mount (which
        # nothing before the end needs).
        if any(d["op"] != "proc" for d in for_init) and not isinstance(
                op, Mask | ReadOnly | PivotRoot):
            raise RuntimeSetupError(f"{op} comes after the plan's end that init carries out")
        match op:
            case Tmpfs(staging=True) as t:
                _tmpfs(t, t.target)
            case Tmpfs() as t:
                path = _join(root, t.target)
                _mkdir_mountpoint(path, writable)
                _tmpfs(t, path)
            case Mkdir(target=target, mode=mode, staging=True):
                os.mkdir(target, mode)
            case Mkdir(target=target, mode=mode):
                path = _join(root, target)
                if not os.path.isdir(path):
                    os.mkdir(path, mode)
            case Bind(source=source, target="/"):
                _bind_root(source, root)
            case Bind(source=source, target=target, readonly=ro, flags=flags):
                path = _join(root, target)
                sc.mount(source, path, None, sc.MS_BIND)
                locked = sc.locked_mount_flags(path)
                sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | flags | locked
                         | (sc.MS_RDONLY if ro else 0))
            case Overlay(lowers=lowers, upper=upper, work=work):
                data = "lowerdir=" + ":".join(lowers)
                if upper:
                    data += f",upperdir={upper},workdir={work}"
                data += ",userxattr"
                sc.mount("overlay", root, "overlay", _SAFE | (0 if upper else sc.MS_RDONLY), data)
            case Sysfs(target=target):
                path = _join(root, target)
                _mkdir_mountpoint(path, writable)
                sc.mount("sysfs", path, "sysfs", _SAFE | sc.MS_NOEXEC | sc.MS_RDONLY)
            case DevPts(target=target):
                sc.mount("devpts", _join(root, target), "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
                         "newinstance,ptmxmode=0666,mode=0620")
            case Touch(target=target):
                os.close(os.open(_join(root, target), os.O_CREAT | os.O_WRONLY, 0o644))
            case Symlink(link_to=link_to, target=target):
                os.symlink(link_to, _join(root, target))
            case RemountReadOnly(target=target, flags=flags):
                path = _join(root, target)
                sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_RDONLY | flags)
            case Proc(target=target):
                _mkdir_mountpoint(_join(root, target), writable)
                for_init.append({"op": "proc", "target": _join(root, target)})
            case Mask(target=target):
                for_init.append({"op": "mask", "target": _join(root, target)})
            case ReadOnly(target=target):
                for_init.append({"op": "readonly", "target": _join(root, target)})
            case PivotRoot():
                for_init.append({"op": "pivot_root", "target": root})
    return for_init


def _bind_root(source: str, root: str) -> None:
    """A read-only, nosuid, nodev bind of a directory as the container's root.

    Not recursive, so that mounts below the directory on the host stay out of sight; the
    kernel refuses that (EINVAL) when such mounts are locked (they came from a more
    privileged namespace and hide what is under them), and then they come along, made
    read-only, nosuid and nodev with the rest.
    """
    try:
        sc.mount(source, root, None, sc.MS_BIND)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        sc.mount(source, root, None, sc.MS_BIND | sc.MS_REC)
    sc.mount_setattr_recursive(
        root, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV)
