"""Open a path inside a directory tree as if that directory were `/` (openat2 RESOLVE_IN_ROOT).

Python 3.11 has no openat2 wrapper, so this calls the system call through ctypes. The kernel
resolves every component, symlinks included, with `..` and absolute symlink targets clamped
at the root: no symlink in the tree can lead outside it, whoever created it and whenever.
"""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10

# /proc magic links are never followed.
_BASE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
                     ctypes.POINTER(_OpenHow), ctypes.c_size_t]
_HOW_SIZE = ctypes.sizeof(_OpenHow)


def open_in_root(root_fd: int, path: bytes, flags: int, *, no_symlinks: bool = False,
                 cross_mounts: bool = False, mode: int = 0) -> int:
    """Open `path` (relative, `b"."` for the root itself) below the directory `root_fd`.

    `flags` are open(2) flags; O_CLOEXEC is always added; `mode` is for O_CREAT. With
    `no_symlinks` any symlink on the way fails with ELOOP. A path never crosses into another
    mount (EXDEV) unless `cross_mounts`: a container's root has its /tmp as a mount of its
    own. Raises OSError (ENOSYS before Linux 5.6).
    """
    resolve = _BASE | (RESOLVE_NO_SYMLINKS if no_symlinks else 0)
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                   resolve | (0 if cross_mounts else RESOLVE_NO_XDEV))
    for _ in range(16):
        fd = _syscall(_SYS_OPENAT2, root_fd, path, ctypes.byref(how), _HOW_SIZE)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        # EAGAIN: a concurrent rename or mount made the kernel unsure `..` stayed inside.
        if err not in (errno.EAGAIN, errno.EINTR):
            break
    raise OSError(err, os.strerror(err), os.fsdecode(path))
