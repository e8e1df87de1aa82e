"""Root filesystems for the demo, tests and benchmarks, made from what Debian installed on
this host: busybox-static alone, or busybox plus the python3.11 interpreter and standard
library (the files of Debian's python3.11 packages and the shared libraries they load).
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

from sandbox import busybox
from sandbox.errors import SandboxError
from sandbox.images import ImageService
from sandbox.runtime import idmap
from sandbox.store.unpack import Ownership

PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
                   "python3-minimal")
_LDD_PATH = re.compile(r"(/\S+) \(0x")


def _package_files(packages: Iterable[str]) -> list[Path]:
    try:
        out = subprocess.run(["dpkg-query", "-L", *packages], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SandboxError(f"the python demo image needs Debian's {', '.join(packages)}: "
                           f"install them with apt-get ({e})") from None
    return [Path(line) for line in out.splitlines() if line.startswith("/")]


def _copy(src: Path, root: Path) -> None:
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
        _copy(Path(os.path.normpath(src.parent / target)), root)
    elif src.is_file():
        shutil.copy2(src, dest)


def _shared_libraries(binaries: Iterable[Path]) -> set[Path]:
    libs: set[Path] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        libs.update(Path(m) for m in _LDD_PATH.findall(out))
    return libs


def python_rootfs(dest: Path) -> Path:
    """busybox plus Debian's python3.11 (about 30 MB): `python3 -c ...` runs in it."""
    busybox.build_rootfs(dest)
    files = [p for p in _package_files(PYTHON_PACKAGES) if p.is_file() or p.is_symlink()]
    for path in files:
        _copy(path, dest)
    elf = [p for p in files if p.is_file() and not p.is_symlink()
           and (p.suffix == ".so" or p.name.startswith("python3"))]
    for lib in _shared_libraries(elf):
        _copy(lib, dest)
    return dest


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
                await svc.import_tar(image.tar, image.ref, cmd=image.cmd, env=image.env)
                await svc.push(image.ref)

    asyncio.run(push())
