"""Root filesystems for the demo, tests and benchmarks, made from what Debian installed on
this host: busybox-static alone, or busybox plus the files of some of Debian's packages and
the shared libraries they load: the python3.11 interpreter and standard library, or the C
compiler (gcc 12, binutils, the libc headers and crt files).
`push_images` makes them images (`ImageService.import_tar`) and pushes them to a registry."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import SandboxError
from sandbox.images import ImageService
from sandbox.images.store.unpack import Ownership
from sandbox.runtime import idmap
from sandbox.tenants import LOCAL
from testbed import busybox

PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
                   "python3-minimal")
GCC_PACKAGES = ("gcc", "gcc-12", "cpp-12", "libgcc-12-dev", "libgcc-s1", "libc6-dev",
                "linux-libc-dev", "binutils", "binutils-x86-64-linux-gnu")
# Left out of the compiler image: what `gcc -O2 [-static] x.c` never runs or links, and
# whose size would dominate it: documentation, link-time optimisation (lto1 and lto-dump,
# 31 MB each), coverage and profiling tools, the gold linker, the sanitizers' libraries
# (their .so links would pull in 20 MB of runtimes) and gcc's plugins.
GCC_LEFT_OUT = re.compile(
    r"^/usr/share/|/lto1$|lto-dump|gcov|gprof|gp-|gold|dwp$"
    r"|/lib(asan|hwasan|lsan|tsan|ubsan)[^/]*$|/gcc/x86_64-linux-gnu/12/plugin/")
_LDD_PATH = re.compile(r"(/\S+) \(0x")
_ELF_MAGIC = b"\x7fELF"
_ELF_LOADABLE = (2, 3)  # e_type ET_EXEC, ET_DYN: what ldd can follow (not .o files)


def _package_files(packages: Iterable[str], image: str) -> list[Path]:
    try:
        out = subprocess.run(["dpkg-query", "-L", *packages], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SandboxError(f"the {image} image needs Debian's {', '.join(packages)}: "
                           f"install them with apt-get ({e})") from None
    return [Path(line) for line in out.splitlines() if line.startswith("/")]


def copy_into_root(src: Path, root: Path) -> None:
    """Copy one host path into root at the same place, symlinks as symlinks, and the
    targets of symlinks too (a library is usually reached through one)."""
    dest = root / src.relative_to("/")
    if dest.exists() or dest.is_symlink():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        target = os.readlink(src)
        dest.symlink_to(target)
        # The target at the path the link names (not resolved through the host's own
        # usr-merge links), which is where the loader will look inside the image.
        copy_into_root(Path(os.path.normpath(src.parent / target)), root)
    elif src.is_file():
        shutil.copy2(src, dest)


def loadable_elf(path: Path) -> bool:
    """An executable or shared library (not a symlink, an object file or a script)."""
    if path.is_symlink() or not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(18)
    return (len(head) == 18 and head[:4] == _ELF_MAGIC
            and int.from_bytes(head[16:18], "little") in _ELF_LOADABLE)


def shared_libraries(binaries: Sequence[Path]) -> set[Path]:
    if not binaries:
        return set()
    out = subprocess.run(["ldd", *map(str, binaries)], capture_output=True, text=True).stdout
    return {Path(m) for m in _LDD_PATH.findall(out)}


def packages_rootfs(dest: Path, packages: Sequence[str], image: str,
                     left_out: re.Pattern[str] | None = None) -> Path:
    """busybox plus the files of Debian's `packages` (but those `left_out` matches) and
    every shared library their executables and libraries load."""
    busybox.build_rootfs(dest)
    files = [p for p in _package_files(packages, image)
             if (p.is_file() or p.is_symlink())
             and (left_out is None or not left_out.search(str(p)))]
    for path in files:
        copy_into_root(path, dest)
    for lib in shared_libraries([p for p in files if loadable_elf(p)]):
        copy_into_root(lib, dest)
    return dest


def python_rootfs(dest: Path) -> Path:
    """busybox plus Debian's python3.11 (about 30 MB): `python3 -c ...` runs in it."""
    return packages_rootfs(dest, PYTHON_PACKAGES, "python demo")


def gcc_rootfs(dest: Path) -> Path:
    """busybox plus Debian's gcc 12, binutils and the libc headers, static and shared libc:
    `gcc -O2 [-static] -o /tmp/a /tmp/a.c` works in it with a read-only root (gcc writes
    only to $TMPDIR, default /tmp, and its output)."""
    return packages_rootfs(dest, GCC_PACKAGES, "compiler", GCC_LEFT_OUT)


def write_tar(root: Path, dest: Path) -> Path:
    """A gzip tar of `root` as an image layer: paths relative to `/`, owned by root."""
    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info
    with tarfile.open(dest, "w:gz", compresslevel=6) as tar:
        tar.add(root, arcname=".", filter=owned_by_root)
    return dest


@dataclass(frozen=True)
class TarImage:
    """A root-filesystem tar and what its image should be called and run by default."""

    tar: Path
    ref: str                      # where it is pushed, e.g. "127.0.0.1:5000/demo/busybox:1"
    cmd: Sequence[str]
    env: Mapping[str, str]


def push_images(store: Path, images: Sequence[TarImage]) -> None:
    """Import each tar into an image store at `store` and push it to its registry, with
    the image API's own registry client."""
    import asyncio

    async def push() -> None:
        async with ImageService(store, ownership=Ownership.for_mapping(idmap.plan())) as svc:
            for image in images:
                await svc.import_tar(image.tar, image.ref, tenant=LOCAL, cmd=image.cmd,
                                     env=image.env)
                await svc.push(image.ref, tenant=LOCAL)

    asyncio.run(push())
