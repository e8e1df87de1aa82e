"""Unpacked layers: `layers/sha256/<diff_id hex>/`, each unpacked once and shared by every
image and container that has it.

A layer is keyed by its diff_id (the digest of its uncompressed tar), so the same content
pushed gzip- and zstd-compressed is unpacked once. It is unpacked into a temporary
directory and renamed into place: a directory under its name is complete, and a pull
killed midway leaves only a temporary directory, removed by the next store that opens.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from sandbox.errors import DigestMismatch
from sandbox.images import digests
from sandbox.images.store.blobs import fsync_dir
from sandbox.images.store.locks import SingleFlight, file_lock, remove_stale, temp_name
from sandbox.images.store.unpack import Ownership, UnpackLimits, UnpackReport, unpack_layer

BlobSource = Callable[[], Awaitable[Path]]


def remove_tree(path: Path) -> None:
    """Remove a tree we unpacked, including directories a layer shipped without write or
    search permission (an ordinary user cannot otherwise empty them)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    if os.geteuid() != 0:
        _owner_rwx(str(path), st)
        for top, dirs, _ in os.walk(path):
            for d in dirs:
                p = os.path.join(top, d)
                _owner_rwx(p, os.lstat(p))
    shutil.rmtree(path)


def _owner_rwx(path: str, st: os.stat_result) -> None:
    # lstat first: a symlink listed among the directories must not be followed by chmod.
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)


class LayerStore:
    def __init__(self, root: Path, *, ownership: Ownership,
                 limits: UnpackLimits | None = None) -> None:
        self.root = root
        self.dir = root / "sha256"
        self.flat = root / "flat"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        for d in (self.dir, self.flat, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        self.ownership = ownership
        self.limits = limits or UnpackLimits()
        self._flight = SingleFlight()

    def path(self, diff_id: str) -> Path:
        return self.dir / digests.hex_part(diff_id)

    def has(self, diff_id: str) -> bool:
        return self.path(diff_id).is_dir()

    async def ensure(self, diff_id: str, blob: BlobSource) -> tuple[Path, UnpackReport | None]:
        """The layer's directory, unpacked from `await blob()` if missing; the report is
        None when the layer was already there. The caller pins `diff_id` first (gc)."""
        final = self.path(diff_id)
        if final.is_dir():
            return final, None

        async def work() -> tuple[Path, UnpackReport | None]:
            async with file_lock(self.locks / f"{final.name}.lock"):
                if final.is_dir():
                    return final, None
                source = await blob()
                temp = self.tmp / temp_name(final.name)
                temp.mkdir(mode=0o700)
                try:
                    report = await asyncio.to_thread(
                        unpack_layer, source, temp, ownership=self.ownership,
                        limits=self.limits)
                    if report.diff_id != diff_id:
                        raise DigestMismatch(
                            f"layer {source.name[:12]} unpacks to {report.diff_id}, but the "
                            f"image config lists {diff_id}: the image is corrupt or was "
                            "tampered with; pull it again or rebuild it")
                    os.rename(temp, final)
                finally:
                    if temp.exists():
                        await asyncio.to_thread(remove_tree, temp)
                fsync_dir(self.dir)
                return final, report

        return await self._flight.do(diff_id, work)

    async def add(self, source: Path | BinaryIO, *,
                  on_digest: Callable[[str], None] | None = None
                  ) -> tuple[str, Path, UnpackReport]:
        """Unpack a blob (or a stream of one) whose diff_id is not known yet (an imported
        tar, a committed layer): (diff_id, path, report). If that layer is already present,
        the fresh copy is discarded.

        `on_digest(diff_id)` is called once it is unpacked, before the layer is looked for
        or renamed into place: the caller pins it there against gc (see store/gc.py)."""
        temp = self.tmp / temp_name("import")
        temp.mkdir(mode=0o700)
        try:
            report = await asyncio.to_thread(unpack_layer, source, temp,
                                             ownership=self.ownership, limits=self.limits)
            if on_digest is not None:
                on_digest(report.diff_id)
            final = self.path(report.diff_id)
            async with file_lock(self.locks / f"{final.name}.lock"):
                if not final.is_dir():
                    os.rename(temp, final)
                    fsync_dir(self.dir)
            return report.diff_id, final, report
        finally:
            if temp.exists():
                await asyncio.to_thread(remove_tree, temp)

    def flat_path(self, chain_id: str) -> Path:
        return self.flat / digests.hex_part(chain_id)

    async def ensure_flat(self, chain_id: str, blobs: Sequence[Path]) -> Path:
        """All layers applied in order into one directory: the copy-based root for hosts
        where overlayfs cannot be mounted in a user namespace."""
        final = self.flat_path(chain_id)
        if final.is_dir():
            return final

        async def work() -> Path:
            async with file_lock(self.locks / f"flat-{final.name}.lock"):
                if final.is_dir():
                    return final
                temp = self.tmp / temp_name(final.name)
                temp.mkdir(mode=0o700)
                try:
                    for source in blobs:
                        await asyncio.to_thread(unpack_layer, source, temp,
                                                ownership=self.ownership,
                                                limits=self.limits, flatten=True)
                    os.rename(temp, final)
                finally:
                    if temp.exists():
                        await asyncio.to_thread(remove_tree, temp)
                return final

        return await self._flight.do("flat:" + chain_id, work)

    def withdraw(self, diff_id: str) -> Path | None:
        """Take the layer out of the store at once (renamed into tmp/, which a later store
        empties if this process dies first): where it went, for `remove_tree`; None if it
        was not there."""
        out = self.tmp / temp_name("gone-" + digests.hex_part(diff_id))
        try:
            os.rename(self.path(diff_id), out)
        except FileNotFoundError:
            return None
        return out

    def remove_flat(self, chain_id: str) -> None:
        path = self.flat_path(chain_id)
        if path.exists():
            remove_tree(path)

    def diff_ids(self) -> list[str]:
        return ["sha256:" + p.name for p in self.dir.iterdir()
                if digests.is_digest("sha256:" + p.name)]

    def clean_temps(self) -> int:
        return remove_stale(self.tmp, remove_tree)
