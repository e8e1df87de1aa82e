"""A container's root filesystem as data: an ordered list of mount operations.

`plan()` turns a `RootfsSpec` into operations (as bubblewrap's --bind/--tmpfs/--proc list
does), on the host; `message()` gives them as the create request carries them. The
spawner's helper (native/helper.c, rootfs.c) carries them out inside the container's fresh
mount namespace, in order, up to the proc mount, and the container's init does the rest,
ending with pivot_root (native/mounts.c: a proc mount shows the pid namespace of whoever
mounts it). Reading the plan tells exactly what a container sees.

Init's own root is a small tmpfs (`STAGING` until pivot_root, `/` after it) that holds the
layers (read-only binds), the writable root's upper tmpfs, and the container's root at
`ROOT`, which every run enters with chroot. Keeping the layers attached there, out of every
run's sight, is what lets init's reset mount a writable root anew (`WritableRoot`;
native/scratch.c): a layer
reached only through a descriptor opened on the host side would be detached with the host's
mounts at pivot_root, and overlayfs refuses detached layers.

Targets of operations are paths inside the container ("/proc"), or, for `staging` ones,
paths in init's root ("/rw"); before pivot_root both are joined to the staging mount.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from sandbox.errors import RuntimeSetupError
from sandbox.runtime import syscalls as sc

# Where init's root is assembled: a tmpfs mounted over /tmp in the container's own mount
# namespace. The host's /tmp is untouched; sources are reached through fds opened earlier.
STAGING = "/tmp"
# In init's root (after pivot_root):
ROOT = "/root"                    # the container's root: runs chroot here
RW = "/rw"                        # a writable root's upper and work directories (a tmpfs)
LAYERS = "/layers"                # the image's layers, /layers/0 the lowest
SKELETON = "/skeleton"            # mount points the image lacks, as a topmost layer
NEXT_ROOT, NEXT_RW = "/next", "/next-rw"   # a reset's new writable root, before it moves in
FILES = "/files"                  # the file cache's blobs (read-only), bound into runs' roots

# Docker's defaults (moby daemon/pkg/oci/defaults.go): hidden, and read-only, parts of /proc.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
    "/proc/timer_stats", "/sys/devices/virtual/powercap", "/sys/firmware",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# Every devpts instance but the host's draws on one pool of ptys (kernel.pty.max less its
# reserve): a cap per container keeps one run from taking the terminals of all the others.
PTYS_PER_CONTAINER = 16
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
    files: str | None = None         # the file cache's blob directory, for init's binds
    # (path, content) of files the runtime provides over the image's (network/names.py)
    provided: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Tmpfs:
    target: str
    size: int
    mode: int = 0o1777
    inodes: int | None = None
    flags: int = _SAFE
    resettable: bool = False         # given back empty by a container reset
    staging: bool = False            # a path in init's root rather than the container's


@dataclass(frozen=True)
class Bind:
    source: str                      # a host path, not joined to the root
    target: str
    readonly: bool = True
    flags: int = _SAFE


@dataclass(frozen=True)
class Layer:
    """A directory bound read-only into init's root: a layer, where overlayfs can reach it
    again for a reset; the file cache's blobs, which init binds one by one into runs'
    roots."""

    source: str                      # a host directory, opened by the helper
    target: str                      # in init's root


@dataclass(frozen=True)
class Root:
    """The container's root at ROOT: a read-only bind of a single layer, or an overlay of
    the layers (read-only without an upper). Mount points the image lacks (or has as a
    symbolic link or a file) are provided by a skeleton layer on top, as runc and podman
    make their own: an image's shape never keeps /proc, /dev or /tmp from being mounted,
    and a mount never follows a link the image planted. The skeleton also holds the files
    the runtime provides (/etc/hosts...), as a layer rather than binds: a writable root's
    reset keeps them, and a run that changes one changes its own copy."""

    lowers: tuple[str, ...]          # paths in init's root, topmost first (overlayfs's order)
    upper: str | None = None         # paths in init's root
    work: str | None = None
    mountpoints: tuple[str, ...] = ()
    provided: tuple[tuple[str, str], ...] = ()


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
    staging: bool = False            # a path in init's root rather than the container's


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


Op = (Tmpfs | Bind | Layer | Root | Proc | Sysfs | DevPts | Mkdir | Touch | Symlink | Mask
      | ReadOnly | RemountReadOnly | PivotRoot)


@dataclass
class Plan:
    ops: list[Op] = field(default_factory=list)

    def resettable(self) -> list[Tmpfs]:
        return [op for op in self.ops if isinstance(op, Tmpfs) and op.resettable]


def plan(spec: RootfsSpec) -> Plan:
    """Operations for `spec`."""
    sources, files = spec.layers, spec.files
    if not sources:
        raise RuntimeSetupError("a container needs a root directory or at least one layer")
    p = Plan()
    add = p.ops.append
    add(Tmpfs("/", 1 << 20, mode=0o755, staging=True))
    add(Mkdir(ROOT, staging=True))
    add(Mkdir(LAYERS, staging=True))
    for i, source in enumerate(sources):
        add(Mkdir(f"{LAYERS}/{i}", staging=True))
        add(Layer(source, f"{LAYERS}/{i}"))
    if files is not None:
        add(Mkdir(FILES, staging=True))
        add(Layer(files, FILES))
    lowers = tuple(f"{LAYERS}/{i}" for i in reversed(range(len(sources))))
    in_dev = [m for m in spec.tmpfs if m.target.startswith("/dev/")]
    mountpoints = ("/proc", "/dev", *(m.target for m in spec.tmpfs if m not in in_dev),
                   *(("/sys",) if spec.sys == "ro" else ()))
    if spec.writable:
        for d in (RW, NEXT_ROOT, NEXT_RW):
            add(Mkdir(d, staging=True))
        add(Tmpfs(RW, spec.upper_size, mode=0o755, staging=True))
        add(Mkdir(f"{RW}/upper", staging=True))
        add(Mkdir(f"{RW}/work", staging=True))
        add(Root(lowers, f"{RW}/upper", f"{RW}/work", mountpoints, spec.provided))
    else:
        add(Root(lowers, mountpoints=mountpoints, provided=spec.provided))
    add(Proc("/proc"))
    add(Tmpfs("/dev", 64 << 10, mode=0o755, flags=_SAFE | sc.MS_NOEXEC | sc.MS_STRICTATIME))
    for dev in DEVICES:
        add(Touch(f"/dev/{dev}"))
        add(Bind(f"/dev/{dev}", f"/dev/{dev}", readonly=False, flags=sc.MS_NOSUID | sc.MS_NOEXEC))
    add(Mkdir("/dev/pts"))
    add(DevPts("/dev/pts"))
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


def _staged(path: str) -> str:
    """A path in init's root, before pivot_root (when that root is still at STAGING)."""
    return STAGING + path if path != "/" else STAGING


def _in_root(target: str) -> str:
    """A path inside the container, before pivot_root."""
    return _staged(ROOT) + target if target != "/" else _staged(ROOT)


def _tmpfs_data(op: Tmpfs) -> str:
    # Owned by container root whoever mounts it, as init's remounts at a reset are
    # (native/scratch.c: by then init runs under an id of its own, idmap.init_uid).
    data = f"size={op.size},mode={op.mode:o},uid=0,gid=0"
    return data + (f",nr_inodes={op.inodes}" if op.inodes else "")


def _mount(source: str, fstype: str, target: str, flags: int,
           data: str | None = None) -> dict[str, object]:
    return {"op": "mount", "source": source, "fstype": fstype, "target": target,
            "flags": flags, "data": data}


def _helper_op(op: Op) -> dict[str, object]:
    """An operation as the helper carries it out (native/rootfs.h), its paths joined to the
    staging mount."""
    match op:
        case Tmpfs(staging=staging) as t:
            return _mount("tmpfs", "tmpfs", _staged(t.target) if staging else _in_root(t.target),
                          t.flags, _tmpfs_data(t))
        case Mkdir(target=target, mode=mode, staging=staging):
            return {"op": "mkdir", "target": _staged(target) if staging else _in_root(target),
                    "mode": mode, "if_missing": not staging}
        case Layer(source=source, target=target):
            return {"op": "layer", "source": source, "target": _staged(target)}
        case Root() as r:
            return {"op": "root", "target": _staged(ROOT),
                    "lowers": [_staged(d) for d in r.lowers],
                    "upper": r.upper and _staged(r.upper), "work": r.work and _staged(r.work),
                    "mountpoints": list(r.mountpoints),
                    "provided": [list(pair) for pair in r.provided],
                    "skeleton": _staged(SKELETON)}
        case Bind(source=source, target=target, readonly=ro, flags=flags):
            return {"op": "bind", "source": source, "target": _in_root(target),
                    "flags": flags | (sc.MS_RDONLY if ro else 0)}
        case Sysfs(target=target):
            return _mount("sysfs", "sysfs", _in_root(target),
                          _SAFE | sc.MS_NOEXEC | sc.MS_RDONLY)
        case DevPts(target=target):
            return _mount("devpts", "devpts", _in_root(target), sc.MS_NOSUID | sc.MS_NOEXEC,
                          f"newinstance,ptmxmode=0666,mode=0620,max={PTYS_PER_CONTAINER}")
        case Touch(target=target):
            return {"op": "touch", "target": _in_root(target)}
        case Symlink(link_to=link_to, target=target):
            return {"op": "symlink", "link_to": link_to, "target": _in_root(target)}
        case RemountReadOnly(target=target, flags=flags):
            return {"op": "remount", "target": _in_root(target), "flags": sc.MS_RDONLY | flags}
    raise RuntimeSetupError(f"{op} is init's to carry out, not the helper's")


def _init_op(op: Op) -> dict[str, str] | None:
    """An operation init carries out (native/mounts.c), or None for the helper's."""
    match op:
        case Proc(target=target):
            return {"op": "proc", "target": _in_root(target)}
        case Mask(target=target):
            return {"op": "mask", "target": _in_root(target)}
        case ReadOnly(target=target):
            return {"op": "readonly", "target": _in_root(target)}
        case PivotRoot():
            return {"op": "pivot_root", "target": STAGING}
    return None


def _writable(p: Plan) -> WritableRoot | None:
    """What a reset needs to make a writable root anew (its skeleton layer included, when
    the helper mounted one)."""
    r = next(op for op in p.ops if isinstance(op, Root))
    if r.upper is None:
        return None
    tmpfs_targets = [op.target for op in p.ops
                     if isinstance(op, Tmpfs) and not op.staging and op.target != "/dev"
                     and not op.target.startswith("/dev/")]
    size = next(op.size for op in p.ops if isinstance(op, Tmpfs) and op.target == RW)
    return WritableRoot(lowers=r.lowers, upper_size=size,
                        carried=_outermost(["/proc", "/dev", *tmpfs_targets,
                                            *(["/sys"] if "/sys" in r.mountpoints else [])]))


@functools.lru_cache(maxsize=64)
def message(spec: RootfsSpec) -> dict[str, Any]:
    """The plan of `spec` as the create request carries it: `mounts`, the helper's part
    (every operation but the proc mount and those at the plan's end, which need the
    container's pid namespace), and `init`, init's part of its configuration; and, for the
    host, `tmpfs_bytes`, what every tmpfs of the plan may hold (the container's cgroup
    limit counts it). Made once per spec: a pool's containers of one image share it."""
    p = plan(spec)
    helper: list[dict[str, object]] = []
    for_init: list[dict[str, str]] = []
    for op in p.ops:
        done_by_init = _init_op(op)
        if done_by_init is not None:
            for_init.append(done_by_init)
        elif any(d["op"] != "proc" for d in for_init):
            raise RuntimeSetupError(f"{op} comes after the plan's end that init carries out")
        else:
            helper.append(_helper_op(op))
    writable = _writable(p)
    return {"tmpfs_bytes": sum(op.size for op in p.ops if isinstance(op, Tmpfs)),
            "mounts": helper, "init": {
        "mounts": for_init, "root": ROOT, "files": None if spec.files is None else FILES,
        "writable": None if writable is None else writable.message(),
        "resettable": [{"target": op.target, "size": op.size, "mode": op.mode,
                        "inodes": op.inodes, "flags": op.flags} for op in p.resettable()]}}


def _outermost(targets: list[str]) -> tuple[str, ...]:
    """Mounts to move onto a new root: a mount below another moves with it."""
    return tuple(t for t in targets
                 if not any(t != o and t.startswith(o.rstrip("/") + "/") for o in targets))


@dataclass(frozen=True)
class WritableRoot:
    """What init needs to give a writable root back as the image made it, in place, after
    pivot_root (native/scratch.c). Two slots take turns: the current one is the container's
    root; the other holds a spare, a new overlay of the same layers over a new, empty upper
    tmpfs, made while init is idle. A reset moves the container's mounts (/proc, /dev, the
    tmpfs mounts) onto the spare and turns to it; the old root and its upper are detached
    later, also while idle: a detach waits for an RCU grace period, which the next run
    need not wait for. The kernel frees the old mounts once detached (the run's processes
    are gone by then)."""

    lowers: tuple[str, ...]          # paths in init's root, topmost first (without the skeleton)
    upper_size: int
    carried: tuple[str, ...]         # container paths of the mounts moved to a new root
    slots: tuple[tuple[str, str], ...] = ((ROOT, RW), (NEXT_ROOT, NEXT_RW))  # (root, upper tmpfs)

    def message(self) -> dict[str, object]:
        """For init's configuration."""
        return {"lowers": list(self.lowers), "skeleton": SKELETON,
                "upper_size": self.upper_size,
                "carried": list(self.carried), "slots": [list(p) for p in self.slots]}
