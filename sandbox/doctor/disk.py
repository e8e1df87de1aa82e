"""The state directory: whose it is, and the space and inodes left on its filesystem (images
and their unpacked layers, the file cache, job records all live there)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sandbox.doctor.findings import Finding, Level
from sandbox.doctor.host import Host

MiB = 1 << 20
# Below these a pull or an unpack cannot finish (an ordinary image's layers take tens of
# MiB, and unpacked, thousands of files); below the warning ones, a few images fill it.
FAIL_BYTES, WARN_BYTES = 100 * MiB, 2048 * MiB
FAIL_INODES, WARN_INODES = 1_000, 50_000


def _existing(path: Path) -> Path:
    """The path, or the nearest ancestor that exists (sandboxd makes what is missing)."""
    while not os.path.exists(path) and path != path.parent:  # unreachable counts as missing
        path = path.parent
    return path


def state_dir(host: Host) -> Finding:
    if host.state_dir is None:
        return Finding("state_dir", Level.SKIPPED,
                       "no state directory given (--state-dir, SANDBOXD_STATE_DIR or "
                       "--config): its space was not checked")
    where = _existing(host.state_dir)
    st = where.stat()
    if where == host.state_dir:
        if not stat.S_ISDIR(st.st_mode):
            return Finding("state_dir", Level.FAIL, f"{where} is not a directory",
                           fix="give a directory for sandboxd's state (made if missing)")
        if st.st_uid != host.uid:
            return Finding("state_dir", Level.FAIL,
                           f"{where} belongs to uid {st.st_uid}, not to {host.user}: the "
                           "service refuses a state directory it does not own",
                           fix=host.as_root(f"chown -R {host.user}: {where}"))
    elif not os.access(where, os.W_OK):
        return Finding("state_dir", Level.FAIL,
                       f"{host.state_dir} does not exist and {host.user} cannot make it in "
                       f"{where}", fix=host.as_root(f"install -d -o {host.user} -m 0700 "
                                                    f"{host.state_dir}"))
    fs = os.statvfs(where)
    free, inodes = fs.f_bavail * fs.f_frsize, fs.f_favail
    counted = fs.f_files > 0  # some filesystems (btrfs) have no inode count
    said = f"{free // MiB} MiB" + (f" and {inodes} inodes" if counted else "")
    fix = (f"free space on the filesystem of {where} (unused images: `sbx rmi IMAGE` or "
           "POST /v1/images/gc; cached files: `sbx file rm ID`), or give a state directory on "
           "a larger one")
    if free < FAIL_BYTES or (counted and inodes < FAIL_INODES):
        return Finding("state_dir", Level.FAIL,
                       f"{said} free for {host.state_dir}: too little for a pull to finish",
                       fix=fix)
    if free < WARN_BYTES or (counted and inodes < WARN_INODES):
        return Finding("state_dir", Level.WARN,
                       f"{said} free for {host.state_dir}: a few images will fill it",
                       fix=fix)
    return Finding("state_dir", Level.OK, f"{said} free for {host.state_dir}")
