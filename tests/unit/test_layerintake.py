"""A committed layer's tar stream into the store: one gzip member (deflated where it
compresses, stored where not) that any gzip reader reads back, the diff_id and the unpacked
layer from the same bytes, and nothing half-made left when the stream or the tar fails."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox.errors import LayerError
from sandbox.images import layerintake
from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.layers import LayerStore
from sandbox.images.store.unpack import Ownership


def _gzip_of(data: bytes, chunk: int) -> bytes:
    src = io.BytesIO(data)

    class Reader:
        def read(self, n: int = -1) -> bytes:
            return src.read(min(n, chunk) if n > 0 else chunk)

    stream = layerintake.GzipStream(Reader())  # type: ignore[arg-type]
    out = []
    while piece := stream.read():
        out.append(piece)
    assert stream.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    return b"".join(out)


MIXED = (b"text compresses well\n" * 40000 + os.urandom(700_000) + b"\0" * 300_000
         + os.urandom(65_535 * 2 + 7) + b"tail" * 1000)


@pytest.mark.parametrize("data", [b"", b"x", b"\0" * 1024, os.urandom(1 << 20), MIXED],
                         ids=["empty", "one byte", "empty tar", "random", "mixed"])
@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_one_gzip_member_any_reader_decodes(data: bytes, chunk: int) -> None:
    blob = _gzip_of(data, chunk)
    assert gzip.decompress(blob) == data
    # A single member: a reader that stops after the first one still gets everything.
    d = zlib.decompressobj(31)
    assert d.decompress(blob) == data and d.eof and d.unused_data == b""


def test_what_does_not_compress_is_stored_and_the_rest_deflated() -> None:
    rand = os.urandom(2 << 20)
    assert len(_gzip_of(rand, 1 << 16)) < len(rand) * 1.001
    text = b"every line alike\n" * 100_000
    assert len(_gzip_of(text, 1 << 16)) < len(text) // 20


def _tar(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def _chunks(data: bytes, size: int = 4096, fail: Exception | None = None
                  ) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
        if fail is not None and i > len(data) // 2:
            raise fail


def _stores(tmp_path: Path) -> tuple[BlobStore, LayerStore]:
    return (BlobStore(tmp_path / "blobs"),
            LayerStore(tmp_path / "layers", ownership=Ownership("squash")))


def _leftovers(blobs: BlobStore, layers: LayerStore) -> list[str]:
    """Temporary files and layers. (A blob that was complete when the other side failed
    stays for gc: it may be another image's too.)"""
    return [p.name for d in (blobs.tmp, layers.tmp, layers.dir) for p in d.iterdir()]


def test_take_a_layer(tmp_path: Path) -> None:
    blobs, layers = _stores(tmp_path)
    data = _tar(("a.txt", b"hello\n"), ("big", os.urandom(600_000)))
    taken = asyncio.run(layerintake.take_layer(_chunks(data), blobs, layers))
    assert taken.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    blob = blobs.path(taken.blob).read_bytes()
    assert taken.blob == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert taken.size == len(blob) and gzip.decompress(blob) == data
    assert (layers.path(taken.diff_id) / "a.txt").read_bytes() == b"hello\n"
    assert taken.report.entries == 2


def test_a_hostile_tar_is_refused_and_leaves_nothing_half_made(tmp_path: Path) -> None:
    blobs, layers = _stores(tmp_path)
    data = _tar(("ok", os.urandom(300_000)), ("../escape", b"x"), ("more", os.urandom(300_000)))
    with pytest.raises(LayerError, match=r"contains '\.\.'"):
        asyncio.run(layerintake.take_layer(_chunks(data), blobs, layers))
    assert _leftovers(blobs, layers) == []
    assert not (tmp_path / "escape").exists()


def test_a_failing_stream_leaves_nothing_half_made(tmp_path: Path) -> None:
    blobs, layers = _stores(tmp_path)
    data = _tar(("f", os.urandom(1 << 20)))
    with pytest.raises(ConnectionResetError):
        asyncio.run(layerintake.take_layer(
            _chunks(data, fail=ConnectionResetError("the container went away")),
            blobs, layers))
    assert _leftovers(blobs, layers) == []
