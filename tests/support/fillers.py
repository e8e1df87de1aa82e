"""Images that fill a disk: one layer holding one file of random (incompressible) bytes, so
the blob and its unpacked layer each take about the file's size. Made by sandboxd's own
import and pushed with its own push to a test registry.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

from sandbox.images import ImageService
from sandbox.tenants import Tenant
from testbed.registry import LocalRegistry

MiB = 1 << 20


def layer_tar(nbytes: int) -> bytes:
    """A tar of one file, `filler`, of `nbytes` random bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("filler")
        info.size = nbytes
        tar.addfile(info, io.BytesIO(os.urandom(nbytes)))
    return out.getvalue()


def push_fillers(registry: LocalRegistry, workdir: Path, sizes: dict[str, int]) -> dict[str, str]:
    """For each tag -> size in MiB, `<registry>/test/fill:<tag>` pushed; tag -> reference."""
    refs = {tag: f"{registry.host}/test/fill:{tag}" for tag in sizes}
    tenant = Tenant("fillers")

    async def go() -> None:
        async with ImageService(workdir / "state") as svc:
            for tag, mib in sizes.items():
                await svc.import_tar(io.BytesIO(layer_tar(mib * MiB)), refs[tag], tenant=tenant)
                await svc.push(refs[tag], tenant=tenant)

    asyncio.run(go())
    return refs
