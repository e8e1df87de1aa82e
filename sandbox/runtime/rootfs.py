"""A container's root filesystem as data: an ordered list of mount operations.

`plan()` turns a `RootfsSpec` into operations (as bubblewrap's --bind/--tmpfs/--proc list
does); `execute()` carries them out inside the container's fresh mount namespace, in order,
up to the proc mount, and the container's init does the rest, ending with pivot_root
(native/mounts.c: a proc mount shows the pid namespace of whoever mounts it). Reading the
plan tells exactly what a container sees.

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

import contextlib
import errno
import os
import stat
from dataclasses import dataclass, field

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
    source: str                      # a host path (or /proc/self/fd/N), not joined to the root
    target: str
    readonly: bool = True
    flags: int = _SAFE


@dataclass(frozen=True)
class Layer:
    """A directory bound read-only into init's root: a layer, where overlayfs can reach it
    again for a reset; the file cache's blobs, which init binds one by one into runs'
    roots."""

    source: str                      # /proc/self/fd/N
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


def plan(spec: RootfsSpec, sources: list[str], files: str | None = None) -> Plan:
    """Operations for `spec`; `sources[i]` is how to reach `spec.layers[i]` (e.g. an fd path),
    `files` how to reach `spec.files`."""
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


def _tmpfs(op: Tmpfs, path: str) -> None:
    # Owned by container root whoever mounts it, as init's remounts at a reset are
    # (native/scratch.c: by then init runs under an id of its own, idmap.init_uid).
    data = f"size={op.size},mode={op.mode:o},uid=0,gid=0"
    if op.inodes:
        data += f",nr_inodes={op.inodes}"
    sc.mount("tmpfs", path, "tmpfs", op.flags, data)


def _overlay(target: str, lowers: tuple[str, ...], upper: str | None, work: str | None) -> None:
    data = "lowerdir=" + ":".join(lowers)
    if upper:
        data += f",upperdir={upper},workdir={work}"
    sc.mount("overlay", target, "overlay", _SAFE | (0 if upper else sc.MS_RDONLY),
             data + ",userxattr")


def execute(p: Plan) -> tuple[list[dict[str, str]], WritableRoot | None]:
    """Carry out a plan in a fresh mount namespace (as root of its user namespace), but for
    the proc mount and the ops at the plan's end that need it (the masks, the read-only
    parts, pivot_root): those are init's, in the container's pid namespace. Returns them in
    order, as init's configuration takes them, and for a writable root what a reset needs
    to make it anew."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    writable: WritableRoot | None = None
    for_init: list[dict[str, str]] = []
    for op in p.ops:
        # Init does its part after all of this: the plan's end, and the proc mount (which
        # nothing before the end needs).
        if any(d["op"] != "proc" for d in for_init) and not isinstance(
                op, Mask | ReadOnly | PivotRoot):
            raise RuntimeSetupError(f"{op} comes after the plan's end that init carries out")
        match op:
            case Tmpfs(staging=True) as t:
                _tmpfs(t, _staged(t.target))
            case Tmpfs() as t:
                _tmpfs(t, _in_root(t.target))
            case Mkdir(target=target, mode=mode, staging=True):
                os.mkdir(_staged(target), mode)
            case Mkdir(target=target, mode=mode):
                path = _in_root(target)
                if not os.path.isdir(path):
                    os.mkdir(path, mode)
            case Layer(source=source, target=target):
                _bind_read_only(source, _staged(target))
            case Root() as r:
                writable = _root(r, p)
            case Bind(source=source, target=target, readonly=ro, flags=flags):
                path = _in_root(target)
                sc.mount(source, path, None, sc.MS_BIND)
                locked = sc.locked_mount_flags(path)
                sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | flags | locked
                         | (sc.MS_RDONLY if ro else 0))
            case Proc(target=target):
                for_init.append({"op": "proc", "target": _in_root(target)})
            case Sysfs(target=target):
                sc.mount("sysfs", _in_root(target), "sysfs",
                         _SAFE | sc.MS_NOEXEC | sc.MS_RDONLY)
            case DevPts(target=target):
                sc.mount("devpts", _in_root(target), "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
                         f"newinstance,ptmxmode=0666,mode=0620,max={PTYS_PER_CONTAINER}")
            case Touch(target=target):
                os.close(os.open(_in_root(target), os.O_CREAT | os.O_WRONLY, 0o644))
            case Symlink(link_to=link_to, target=target):
                os.symlink(link_to, _in_root(target))
            case Mask(target=target):
                for_init.append({"op": "mask", "target": _in_root(target)})
            case ReadOnly(target=target):
                for_init.append({"op": "readonly", "target": _in_root(target)})
            case RemountReadOnly(target=target, flags=flags):
                sc.mount(None, _in_root(target), None, sc.MS_REMOUNT | sc.MS_RDONLY | flags)
            case PivotRoot():
                for_init.append({"op": "pivot_root", "target": STAGING})
    return for_init, writable


def _root(r: Root, p: Plan) -> WritableRoot | None:
    """Mount the container's root; with a skeleton layer on top if the image lacks a mount
    point (found by looking, so a shape the plan cannot know of is still served) or the
    runtime provides files. A provided file goes where the image's directory is a real one
    or absent: an image whose /etc is a link or a file keeps its own shape."""
    lowers = r.lowers
    _mount_root(lowers, r.upper, r.work)
    root = _staged(ROOT)
    missing = [t for t in r.mountpoints if not _is_real_dir(root, t)]
    provided = [(path, content) for path, content in r.provided
                if _shape(root, os.path.dirname(path)) != "other"]
    if missing or provided:
        skeleton = _staged(SKELETON)
        _make_skeleton(root, [*missing, *{os.path.dirname(p) for p, _ in provided}], skeleton)
        for path, content in provided:
            with open(skeleton + path, "x", encoding="utf-8") as f:
                f.write(content)
            os.chmod(skeleton + path, 0o644)
        sc.umount2(root, sc.MNT_DETACH)
        try:
            _mount_root((SKELETON, *lowers), r.upper, r.work)
            lowers = (SKELETON, *lowers)
        except OSError as e:
            # overlayfs takes no layer with mounts locked below it (a directory root with
            # the host's mounts under it, which only a bind can show): such a root goes
            # without the provided files, as it went before they were.
            if missing or e.errno != errno.EINVAL:
                raise
            _mount_root(lowers, r.upper, r.work)
    if r.upper is None:
        return None
    tmpfs_targets = [op.target for op in p.ops
                     if isinstance(op, Tmpfs) and not op.staging and op.target != "/dev"
                     and not op.target.startswith("/dev/")]
    size = next(op.size for op in p.ops if isinstance(op, Tmpfs) and op.target == RW)
    return WritableRoot(lowers=lowers, upper_size=size,
                        carried=_outermost(["/proc", "/dev", *tmpfs_targets,
                                            *(["/sys"] if "/sys" in r.mountpoints else [])]))


def _mount_root(lowers: tuple[str, ...], upper: str | None, work: str | None) -> None:
    staged = tuple(_staged(d) for d in lowers)
    if upper is None and len(lowers) == 1:
        _bind_read_only(staged[0], _staged(ROOT))
    else:
        _overlay(_staged(ROOT), staged, upper and _staged(upper), work and _staged(work))


def _outermost(targets: list[str]) -> tuple[str, ...]:
    """Mounts to move onto a new root: a mount below another moves with it."""
    return tuple(t for t in targets
                 if not any(t != o and t.startswith(o.rstrip("/") + "/") for o in targets))


def _is_real_dir(root: str, target: str) -> bool:
    """Whether every component of `target` below `root` is a directory, not a link."""
    return _shape(root, target) == "dir"


def _shape(root: str, target: str) -> str:
    """"dir" when every component of `target` below `root` is a directory; "absent" when
    the first that is not does not exist; "other" when it is a link or a file."""
    path = root
    for part in target.strip("/").split("/"):
        path = f"{path}/{part}"
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return "other"
        except FileNotFoundError:
            return "absent"
    return "dir"


def _make_skeleton(root: str, targets: list[str], skeleton: str) -> None:
    """Directories for `targets` in a layer meant to go over the image's: an image
    directory on the way keeps its mode and owner (the skeleton's copy is what the merged
    tree shows); anything else becomes a plain 0755 directory, hiding a link or file."""
    os.makedirs(skeleton, mode=0o755, exist_ok=True)
    for target in targets:
        # The image is looked at only while every component so far is a real directory:
        # past a link, a path would lead wherever the image chose (the host, here).
        image: str | None = root
        skel = skeleton
        for part in target.strip("/").split("/"):
            skel = f"{skel}/{part}"
            st = None
            if image is not None:
                image = f"{image}/{part}"
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(image)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    image, st = None, None
            if os.path.isdir(skel):
                continue
            os.mkdir(skel, 0o755)
            if st is not None:
                os.chmod(skel, stat.S_IMODE(st.st_mode))
                # An owner the user namespace does not map shows as the overflow id.
                with contextlib.suppress(OSError):
                    os.chown(skel, st.st_uid, st.st_gid)


def _bind_read_only(source: str, target: str) -> None:
    """A read-only, nosuid, nodev bind of a directory.

    Not recursive, so that mounts below the directory on the host stay out of sight; the
    kernel refuses that (EINVAL) when such mounts are locked (they came from a more
    privileged namespace and hide what is under them), and then they come along, made
    read-only, nosuid and nodev with the rest.
    """
    try:
        sc.mount(source, target, None, sc.MS_BIND)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        sc.mount(source, target, None, sc.MS_BIND | sc.MS_REC)
    sc.mount_setattr_recursive(
        target, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV)


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

    lowers: tuple[str, ...]          # paths in init's root, topmost first
    upper_size: int
    carried: tuple[str, ...]         # container paths of the mounts moved to a new root
    slots: tuple[tuple[str, str], ...] = ((ROOT, RW), (NEXT_ROOT, NEXT_RW))  # (root, upper tmpfs)

    def message(self) -> dict[str, object]:
        """For init's configuration."""
        return {"lowers": list(self.lowers), "upper_size": self.upper_size,
                "carried": list(self.carried), "slots": [list(p) for p in self.slots]}
