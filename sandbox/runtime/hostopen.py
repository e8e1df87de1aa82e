"""Paths of a container opened by its init for the host (copies in and out).

Init runs this inside the container's mount namespace, as container root; the host only
reads or writes the descriptor it gets back. Sandboxed code may have planted symlinks
anywhere and may swap directories at any moment, so no path is ever resolved through a
symlink: every component is resolved with openat2 RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS and
the last one is opened with O_NOFOLLOW. A path through a link is refused (ELOOP) with a
message naming the link and where it points; the caller gives the real path.

Two kinds of request:

- `path`: an absolute path inside the container ("/tmp/in.txt", "/" for the root);
- `entry` (an `Entry`): an entry of a directory the host is walking. The host holds that
  directory open and names it by (st_dev, st_ino) and the path it was found at. Init
  opens the path again, proves it is still the same inode (the host's descriptor pins it,
  so the number cannot have been reused) and opens the entry from that descriptor with
  O_NOFOLLOW; a directory moved or replaced meanwhile is ESTALE, never another tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

from sandbox.runtime.resolve import open_in_root

# Kernel interfaces, not data: a host file opened or written there could reach init itself
# (/proc/self/mem is a regular file) or the kernel's settings.
_PSEUDO_FS = {0x9FA0: "procfs", 0x62656572: "sysfs", 0x1CD1: "devpts", 0x27E0EB: "cgroup",
              0x63677270: "cgroup2", 0x73636673: "securityfs", 0x64626720: "debugfs",
              0x74726163: "tracefs", 0xCAFE4A11: "bpf"}
_libc = ctypes.CDLL(None, use_errno=True)
_DIR = os.O_PATH | os.O_DIRECTORY


@dataclass(frozen=True)
class Entry:
    """Entry `name` of the directory at `dir_path` (relative to the container's root, b""
    for the root) whose identity is (dev, ino)."""

    dir_path: bytes
    dev: int
    ino: int
    name: bytes

    def message(self) -> dict[str, Any]:
        # Control messages are JSON: raw names travel as hex, whatever bytes they hold.
        return {"dir": self.dir_path.hex(), "dev": self.dev, "ino": self.ino,
                "name": self.name.hex()}

    @classmethod
    def from_message(cls, m: dict[str, Any]) -> Entry:
        name = bytes.fromhex(m["name"])
        if _components(name) != [name]:
            raise OSError(errno.EINVAL, f"{name!r} is not the name of a directory entry")
        return cls(bytes.fromhex(m["dir"]), int(m["dev"]), int(m["ino"]), name)


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type comes first
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value


def _open(dirfd: int, rel: bytes, flags: int, mode: int = 0) -> int:
    return open_in_root(dirfd, rel or b".", flags, no_symlinks=True, cross_mounts=True,
                        mode=mode)


def _link_error(root: int, parts: list[bytes], shown: str) -> OSError:
    """ELOOP naming the first symlink on the way to `parts` (a /proc magic link is one)."""
    for i in range(1, len(parts) + 1):
        try:
            fd = _open(root, b"/".join(parts[:i]), os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            break
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                link = "/" + os.fsdecode(b"/".join(parts[:i]))
                target = os.readlink(b"", dir_fd=fd).decode(errors="replace")
                where = (f"{shown} is a symbolic link" if link == shown else
                         f"{shown} passes through the symbolic link {link}")
                return OSError(errno.ELOOP, f"{where} (-> {target!r}); copies never follow "
                               "symbolic links: give the real path")
        finally:
            os.close(fd)
    return OSError(errno.ELOOP, f"{shown}: a symbolic link on the way changed while it was "
                   "opened; copies never follow symbolic links: give the real path")


def _walk(root: int, parts: list[bytes], owner: tuple[int, int] | None, shown: str) -> int:
    """An O_PATH descriptor of the directory `parts`, making what is missing (0755, given
    to `owner`) when `owner` is set. Never through a symlink, never creating through one."""
    try:
        return _open(root, b"/".join(parts), _DIR)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(root, parts, shown) from None
        if e.errno != errno.ENOENT or owner is None:
            raise
    fd = os.dup(root)
    try:
        for i, part in enumerate(parts):
            try:
                try:
                    nfd = _open(fd, part, _DIR)
                except FileNotFoundError:
                    nfd = _make_dir(fd, part, owner)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise _link_error(root, parts[:i + 1], shown) from None
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_dir(parent: int, name: bytes, owner: tuple[int, int]) -> int:
    # Made meanwhile, or a link was planted there: the open below refuses the link.
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent)
    fd = _open(parent, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        # Only a directory this init made is handed over: one swapped in since the mkdir is
        # someone else's, and its owner stays.
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchown(fd, *owner)
            os.fchmod(fd, 0o755)
        return os.open(b".", _DIR | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _open_entry(parent: int, name: bytes, flags: int) -> int:
    """Open `name` in `parent`; with O_CREAT, an existing entry is opened without it and a
    new one made with O_EXCL: on someone else's link in a sticky directory (/tmp) O_CREAT
    gets EACCES (the kernel's rule for creating in sticky directories) before O_NOFOLLOW
    gets the ELOOP that lets the error name the link."""
    if not flags & os.O_CREAT:
        return _open(parent, name, flags)
    for _ in range(8):
        try:
            return _open(parent, name, flags & ~os.O_CREAT)
        except FileNotFoundError:
            pass
        try:
            return _open(parent, name, flags | os.O_EXCL, 0o600)
        except FileExistsError:
            continue  # made meanwhile: open that one
    raise OSError(errno.EAGAIN, f"{os.fsdecode(name)} kept appearing and vanishing")


def _components(path: bytes) -> list[bytes]:
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise OSError(errno.EINVAL, f"{path!r}: '..' is not allowed")
    return parts


def open_for_host(msg: dict[str, Any], container_root: str) -> int:
    """Open a path of this container (whose root is `container_root` in init's) for the
    host, which reads or writes through the fd.

    With "owner" [uid, gid], missing parents are made (0755) and they and the file are given
    to that owner, the file with "mode"; an existing file must be a regular file with no
    other hard link (writing it would change the file under its other names too), and
    O_TRUNC waits until that is checked. Files of kernel pseudo filesystems are refused
    (EPERM) before anything is changed.
    """
    flags = int(msg["flags"])
    owner = msg.get("owner")
    entry = Entry.from_message(msg["entry"]) if msg.get("entry") else None
    name: bytes | None = None
    if entry is not None:
        parts, name = _components(entry.dir_path), entry.name
    else:
        parts = _components(str(msg["path"]).encode())
    shown = "/" + os.fsdecode(b"/".join(parts + ([name] if name else [])))
    root = os.open(container_root, _DIR | os.O_CLOEXEC)
    try:
        if entry is not None:
            parent = _walk(root, parts, None, shown)
            st = os.fstat(parent)
            if (st.st_dev, st.st_ino) != (entry.dev, entry.ino):
                os.close(parent)
                raise OSError(errno.ESTALE, f"{shown}: its directory was moved or replaced")
        else:
            if parts:
                *parts, name = parts
            parent = _walk(root, parts, owner if name else None, shown)
        try:
            if name is None:
                fd = os.open(b".", (flags & ~os.O_CREAT) | os.O_CLOEXEC, dir_fd=parent)
            else:
                fd = _open_entry(parent, name, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno != errno.ELOOP or name is None:
                raise
            raise _link_error(root, [*parts, name], shown) from None
        finally:
            os.close(parent)
    finally:
        os.close(root)
    try:
        fs = _PSEUDO_FS.get(_fs_type(fd))
        if fs is not None:
            raise OSError(errno.EPERM, f"{shown} is on {fs}, a kernel interface")
        if owner is not None:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{shown} is not a regular file")
            if st.st_nlink > 1:
                raise OSError(errno.EMLINK, f"{shown} has {st.st_nlink} hard links; writing "
                              "it would change the file under its other names too: remove "
                              "it first, then copy again")
            os.fchown(fd, *owner)
            os.fchmod(fd, int(msg["mode"]) & 0o777)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd
