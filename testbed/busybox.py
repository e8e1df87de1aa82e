"""A minimal root filesystem from the host's busybox-static, for the demo, tests and
benchmarks (images from registries come with the image store)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from sandbox.errors import SandboxError

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def find_busybox() -> Path:
    """The host's static busybox: a dynamic one would not find its libc in the rootfs."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            with path.open("rb") as f:
                head = f.read(4096)
            if b"ld-linux" not in head:  # no ELF interpreter named: statically linked
                return path
    raise SandboxError("a static busybox was not found; install it with "
                       "`apt-get install busybox-static`")


def build_rootfs(dest: Path, *, owner: tuple[int, int] | None = None) -> Path:
    """Write a busybox root filesystem at `dest` (created; must not exist or be empty).

    `owner` is the host uid and gid that container root maps to; files are chowned to it
    so that container root owns its root filesystem, as in an image unpacked for it.
    """
    busybox = find_busybox()
    dest.mkdir(parents=True, exist_ok=True)
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "home", "usr/bin", "var/tmp",
              "work"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "var/tmp").chmod(0o1777)
    (dest / "work").chmod(0o777)
    shutil.copy2(busybox, dest / "bin/busybox")
    (dest / "bin/busybox").chmod(0o755)
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = dest / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    (dest / "etc/hostname").write_text("sandbox\n")
    if owner is not None:
        for root, dirs, files in os.walk(dest):
            for name in (*dirs, *files):
                os.lchown(os.path.join(root, name), *owner)
        os.lchown(dest, *owner)
    dest.chmod(0o755)
    return dest
