"""Paths of a container opened by its init for the host (copies in and out).

Init runs this inside the container's mount namespace, as container root; the host only
reads or writes the descriptor it gets back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Any

from sandbox.store.resolve import open_in_root

# Kernel interfaces, not data: a host file opened or written there could reach init itself
# (/proc/self/mem is a regular file) or the kernel's settings.
_PSEUDO_FS = {0x9FA0: "procfs", 0x62656572: "sysfs", 0x1CD1: "devpts", 0x27E0EB: "cgroup",
              0x63677270: "cgroup2", 0x73636673: "securityfs", 0x64626720: "debugfs",
              0x74726163: "tracefs", 0xCAFE4A11: "bpf"}
_libc = ctypes.CDLL(None, use_errno=True)


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type comes first
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value


def open_for_host(msg: dict[str, Any]) -> int:
    """Open a path of this container for the host, which reads or writes through the fd.

    Resolution stays inside this root (openat2 RESOLVE_IN_ROOT, no magic links) and is done
    as container root. With "owner" [uid, gid], missing parents are made (0755) and they and
    the file are given to that owner, the file with "mode". Files of kernel pseudo
    filesystems are refused (EPERM) before anything is changed.
    """
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        path = msg["path"].lstrip("/").encode()
        owner = msg.get("owner")
        if owner is not None:
            parts = path.split(b"/")[:-1]
            for i, part in enumerate(parts):
                parent = open_in_root(root, b"/".join(parts[:i]) or b".",
                                      os.O_PATH | os.O_DIRECTORY, cross_mounts=True)
                try:
                    os.mkdir(part, 0o700, dir_fd=parent)
                except FileExistsError:
                    continue
                finally:
                    os.close(parent)
                made = open_in_root(root, b"/".join(parts[: i + 1]),
                                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                    cross_mounts=True)
                try:
                    os.fchown(made, *owner)
                    os.fchmod(made, 0o755)
                finally:
                    os.close(made)
        fd = open_in_root(root, path or b".", int(msg["flags"]), cross_mounts=True,
                          mode=0o600)
    finally:
        os.close(root)
    try:
        fs = _PSEUDO_FS.get(_fs_type(fd))
        if fs is not None:
            raise OSError(errno.EPERM, f"{msg['path']} is on {fs}, a kernel interface")
        if owner is not None:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{msg['path']} is not a regular file")
            os.fchown(fd, *owner)
            os.fchmod(fd, int(msg["mode"]) & 0o777)
    except BaseException:
        os.close(fd)
        raise
    return fd
