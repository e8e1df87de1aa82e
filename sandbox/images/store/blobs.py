"""Content-addressed blobs: `blobs/sha256/<hex>`, written once, verified, never rewritten.

A blob appears under its name only complete and verified: it is written to a temporary
file beside it, fsynced, then renamed. A digest is validated before it names any file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from sandbox.errors import DigestMismatch, ManifestError, NotFound
from sandbox.images import digests
from sandbox.images.store.locks import SingleFlight, file_lock, remove_stale, temp_name

Fetch = Callable[[Path], Awaitable[None]]

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "sha256"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        for d in (self.dir, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        self._flight = SingleFlight()

    def path(self, digest: str) -> Path:
        return self.dir / digests.hex_part(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def _temp(self, digest: str) -> Path:
        return self.tmp / temp_name(digests.hex_part(digest))

    async def ensure(self, digest: str, fetch: Fetch) -> tuple[Path, bool]:
        """The blob's path, fetched once if missing: `fetch(temp)` must write the verified
        bytes to `temp`. Returns (path, fetched_now). The caller pins `digest` first (gc)."""
        final = self.path(digest)
        if final.is_file():
            return final, False

        async def work() -> tuple[Path, bool]:
            async with file_lock(self.locks / f"{final.name}.lock"):
                if final.is_file():  # another process fetched it while we waited
                    return final, False
                temp = self._temp(digest)
                try:
                    await fetch(temp)
                    os.rename(temp, final)
                finally:
                    temp.unlink(missing_ok=True)
                fsync_dir(self.dir)
                return final, True

        return await self._flight.do(digest, work)

    def put_bytes(self, data: bytes, expected: str | None = None, *,
                  on_digest: Callable[[str], None] | None = None) -> str:
        """Store `data` (a manifest or config), checking it against `expected` if given.
        `on_digest` as for put_stream."""
        digest = digests.of_bytes(data)
        if expected is not None and digest != expected:
            raise DigestMismatch(f"content of {expected} hashes to {digest}")
        if on_digest is not None:
            on_digest(digest)
        final = self.path(digest)
        if not final.is_file():
            temp = self._temp(digest)
            try:
                with open(temp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(temp, final)
            finally:
                temp.unlink(missing_ok=True)
        return digest

    def put_stream(self, src: BinaryIO, expected: str | None = None,
                   expected_size: int | None = None, *,
                   on_digest: Callable[[str], None] | None = None) -> tuple[str, int]:
        """Copy a stream in, hashing it; (digest, size). Mismatches leave nothing behind.

        `on_digest(digest)` is called once the content is hashed and verified, before the
        blob is looked for or renamed into place: the caller pins it there against gc (see
        store/gc.py), which then either removed an older copy first (this one takes its
        place) or leaves it be."""
        h = hashlib.sha256()
        size = 0
        temp = self.tmp / temp_name("ingest")
        try:
            with open(temp, "wb") as f:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            if expected is not None and digest != expected:
                raise DigestMismatch(f"content of {expected} hashes to {digest}")
            if expected_size is not None and size != expected_size:
                raise DigestMismatch(f"{digest} is {size} bytes, its descriptor says "
                                     f"{expected_size}")
            if on_digest is not None:
                on_digest(digest)
            final = self.path(digest)
            if not final.is_file():
                os.rename(temp, final)
            return digest, size
        finally:
            temp.unlink(missing_ok=True)

    def read(self, digest: str, limit: int) -> bytes:
        """A small blob's bytes (manifests, configs), refusing anything over `limit`."""
        path = self.path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store; pull the image again") from None
        if len(data) > limit:
            raise ManifestError(f"blob {digest} is over {limit} bytes")
        return data

    def remove(self, digest: str) -> int:
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def digests(self) -> list[str]:
        return ["sha256:" + p.name for p in self.dir.iterdir() if digests.is_digest(
            "sha256:" + p.name)]

    def clean_temps(self) -> int:
        """Remove what killed processes left in tmp/; returns how many."""
        return remove_stale(self.tmp, os.unlink)
