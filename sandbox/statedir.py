"""The service's state directory: images (unpacked layers among them), records, temporary
files. It is private to the service's user (0700).

Layer files are the service user's own files on the host (or its subordinate ids'), and
other local users have no business reading images or container records. Unpacking drops
setuid bits and file capabilities (images/store/unpack.py); the 0700 directory also shuts out
what an older store kept. Containers do not need to traverse it: a container's helper opens
the layers (O_PATH) while it still has the service's credentials, before its id map is
used (docs/architecture.md, "Reaching the layers").
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from sandbox.errors import SandboxError

log = logging.getLogger("sandboxd.state")

MODE = 0o700


def prepare(path: Path) -> None:
    """Make `path` (and missing parents) with mode 0700, or take the group and other bits
    off an existing directory of this user's (logged). One owned by another user, or
    shared with others (sticky or world-writable, like /tmp), is refused: it is not
    sandboxd's to take over."""
    try:
        path.mkdir(MODE, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileExistsError, NotADirectoryError):
        raise SandboxError(f"state_dir {path} is not a directory; give a directory for "
                           "sandboxd's state (it is created if missing)") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid():
            raise SandboxError(
                f"state_dir {path} belongs to uid {st.st_uid}, not to this user "
                f"({os.geteuid()}): sandboxd keeps images and container state there, private "
                "to the user it runs as; give a directory of its own (it is created if "
                "missing) or run sandboxd as that directory's owner")
        if mode & (stat.S_ISVTX | stat.S_IWOTH):
            raise SandboxError(
                f"state_dir {path} is shared (mode {mode:04o}, like /tmp): sandboxd would "
                f"have to make it private to its user; give a directory of its own, e.g. "
                f"{path / 'sandboxd'}")
        if mode & 0o077:
            os.fchmod(fd, mode & ~0o077)
            log.warning("state_dir %s was mode %04o, open to other local users; made it "
                        "%04o (private to the user sandboxd runs as)", path, mode,
                        mode & ~0o077)
    finally:
        os.close(fd)
