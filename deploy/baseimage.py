"""Base root filesystems for sandboxd's container images, made from the Debian 12 packages
installed on this machine (no base image is pulled: see deploy/build-image.sh).

    python deploy/baseimage.py sandboxd SITE_DIR OUT.tar.gz
    python deploy/baseimage.py registry-cache OUT.tar.gz

`sandboxd`: busybox, Debian's python3.11 (the interpreter the project is tested with),
libseccomp (pyseccomp loads it; ldconfig and its configuration let ctypes find it), the CA
bundle (pulls over TLS), and every shared library the compiled modules of SITE_DIR (the
Python packages the image will hold) load. `registry-cache`: busybox, Debian's
docker-registry and the CA bundle (it fetches from Docker Hub over TLS).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from testbed.demoimages import (
    PYTHON_PACKAGES,
    copy_into_root,
    loadable_elf,
    packages_rootfs,
    shared_libraries,
    write_tar,
)

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# What ctypes.util.find_library needs in an image without a compiler: `ldconfig -p`.
LDCONFIG = (Path("/sbin/ldconfig"), Path("/etc/ld.so.conf"),
            Path("/etc/ld.so.conf.d/libc.conf"),
            Path("/etc/ld.so.conf.d/x86_64-linux-gnu.conf"))

# Documentation, and a service manager's files (an image runs one process, no init system);
# /lib itself, a link to usr/lib on this merged-/usr host, made where usr/lib is not yet.
_LEFT_OUT = re.compile(r"^/usr/share/(doc|man|lintian)/|^/etc/init\.d/|^/lib(/systemd/.*)?$")


def sandboxd_root(dest: Path, site: Path) -> Path:
    packages_rootfs(dest, (*PYTHON_PACKAGES, "libseccomp2"), "sandboxd",
                     left_out=_LEFT_OUT)
    compiled = [p for p in site.rglob("*.so*") if loadable_elf(p)]
    for lib in shared_libraries(compiled):
        if not str(lib).startswith(str(site)):
            copy_into_root(lib, dest)
    for path in (CA_BUNDLE, *LDCONFIG):
        if path.exists():
            copy_into_root(path, dest)
    return dest


def registry_root(dest: Path) -> Path:
    packages_rootfs(dest, ("docker-registry",), "registry cache", left_out=_LEFT_OUT)
    copy_into_root(CA_BUNDLE, dest)
    return dest



def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "sandboxd":
        make, out = (lambda d: sandboxd_root(d, Path(argv[1]))), Path(argv[2])
    elif len(argv) == 2 and argv[0] == "registry-cache":
        make, out = registry_root, Path(argv[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sandboxd-base-") as tmp:
        write_tar(make(Path(tmp) / "root"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
