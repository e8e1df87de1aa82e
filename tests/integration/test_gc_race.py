"""gc against content on its way in: a real gc (what POST /v1/images/gc runs, in a worker
thread) at the moments a pull, an import, an OCI layout import or a commit is most exposed,
chosen deterministically by running it from inside the writer's own calls to the store:

- right after the store published a blob or a layer, before the writer's next step;
- at the writer's pin hook, just before or just after the pin (the store has hashed or
  unpacked the content but not yet published it or looked for an older copy);
- between the image record and its name (`Catalog.add_image`, then `set_name`);
- inside a gc that has read the names, while a whole import runs to its end.

Each time the new image must come out complete and named. The stores, catalog and gc are
the real ones; only the moment is chosen. Nothing here sleeps or measures time."""

from __future__ import annotations

import asyncio
import functools
import gzip
import io
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbox.images import Image, ImageService
from sandbox.tenants import Tenant
from tests.conftest import Session
from tests.integration.test_images import make_service

T = Tenant("writer")
SWEEPER = Tenant("sweeper")   # names nothing: its gc evicts nothing and collects the store
HELLO = b"hello through the gc\n"


def _tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 4096):
        yield data[i:i + 4096]


@pytest.fixture
def svc(session: Session, tmp_path: Path) -> ImageService:
    s = make_service(tmp_path / "state")
    yield s
    session.run(s.close())


class Sweeps:
    """Runs a full gc at chosen moments and counts them (each test checks its moments
    happened)."""

    def __init__(self, svc: ImageService) -> None:
        self.svc = svc
        self.runs = 0

    def gc(self) -> None:
        self.runs += 1
        self.svc.gc(0, tenant=SWEEPER)

    def after_publishing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A gc right after each blob or layer the store publishes (or finds) for the
        writer."""
        blobs, layers = self.svc.blobs, self.svc.layers

        def after(put: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(put)
            def put_then_gc(*args: Any, **kw: Any) -> Any:
                out = put(*args, **kw)
                self.gc()
                return out
            return put_then_gc

        def after_async(put: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(put)
            async def put_then_gc(*args: Any, **kw: Any) -> Any:
                out = await put(*args, **kw)
                await asyncio.to_thread(self.gc)
                return out
            return put_then_gc

        monkeypatch.setattr(blobs, "put_stream", after(blobs.put_stream))
        monkeypatch.setattr(blobs, "put_bytes", after(blobs.put_bytes))
        monkeypatch.setattr(blobs, "ensure", after_async(blobs.ensure))
        monkeypatch.setattr(layers, "add", after_async(layers.add))
        monkeypatch.setattr(layers, "ensure", after_async(layers.ensure))

    def at_pin(self, monkeypatch: pytest.MonkeyPatch, store: str, *, before: bool) -> None:
        """A gc at each pin hook the writer hands `store` ("blobs" or "layers"): just before
        the pin (gc may remove an older copy: the writer must then publish its own) or just
        after it (gc must leave the older copy, which the writer then uses)."""

        def hooked(hook: Callable[[str], None]) -> Callable[[str], None]:
            def gc_at_pin(digest: str) -> None:
                if before:
                    self.gc()
                hook(digest)
                if not before:
                    self.gc()
            return gc_at_pin

        def wrap(put: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(put)
            def put_with_gc(*args: Any, on_digest: Callable[[str], None], **kw: Any) -> Any:
                return put(*args, on_digest=hooked(on_digest), **kw)
            return put_with_gc

        if store == "blobs":
            blobs = self.svc.blobs
            monkeypatch.setattr(blobs, "put_stream", wrap(blobs.put_stream))
            monkeypatch.setattr(blobs, "put_bytes", wrap(blobs.put_bytes))
        else:
            add = self.svc.layers.add

            async def add_with_gc(*args: Any, on_digest: Callable[[str], None],
                                  **kw: Any) -> Any:
                return await add(*args, on_digest=hooked(on_digest), **kw)

            monkeypatch.setattr(self.svc.layers, "add", add_with_gc)


def assert_complete(session: Session, svc: ImageService, image: Image, name: str,
                    tenant: Tenant = T) -> None:
    """`name` resolves to `image`, and every blob its manifest names and every layer its
    record lists is in the store; still so after one more gc with nothing under way."""
    for _ in range(2):
        assert session.run(svc.resolve(name, tenant=tenant)).digest == image.digest
        manifest = orjson.loads(svc.blobs.read(image.digest, 1 << 20))
        wanted = [manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])]
        assert [d for d in wanted if not svc.blobs.has(d)] == []
        rec = svc.catalog.image(image.digest)
        assert rec is not None
        assert all(svc.layers.has(lr.diff_id) for lr in rec.layers)
        svc.gc(0, tenant=SWEEPER)


def _import(session: Session, svc: ImageService, name: str, tar: bytes) -> Image:
    return session.run(svc.import_tar(io.BytesIO(tar), name, tenant=T))


# right after each write to the store


def test_an_import_survives_a_gc_after_each_store_write(
        session: Session, svc: ImageService, monkeypatch: pytest.MonkeyPatch) -> None:
    sweeps = Sweeps(svc)
    sweeps.after_publishing(monkeypatch)
    image = _import(session, svc, "local/imported:1", _tar("hello.txt", HELLO))
    assert sweeps.runs == 4   # the layer blob, the layer, the config, the manifest
    assert_complete(session, svc, image, "local/imported:1")
    assert (image.layers[-1] / "hello.txt").read_bytes() == HELLO


def test_a_commit_survives_a_gc_after_each_store_write(
        session: Session, svc: ImageService, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _import(session, svc, "local/base:1", _tar("base.txt", b"base\n"))
    sweeps = Sweeps(svc)
    sweeps.after_publishing(monkeypatch)
    image = session.run(svc.commit(base, _chunks(_tar("hello.txt", HELLO)),
                                   "local/committed:1", tenant=T))
    assert sweeps.runs == 4   # the gzip blob, the layer, the config, the manifest
    assert_complete(session, svc, image, "local/committed:1")
    assert [(p / f).read_bytes() for p, f in zip(image.layers, ("base.txt", "hello.txt"),
                                                  strict=True)] == [b"base\n", HELLO]


def test_a_pulled_index_survives_a_gc_after_each_store_write(
        session: Session, svc: ImageService, images: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The index and the platform's manifest are stored before the layers are fetched."""
    sweeps = Sweeps(svc)
    sweeps.after_publishing(monkeypatch)
    image = session.run(svc.pull(images.multi, tenant=T))
    assert sweeps.runs >= 2
    assert image.digest == images.platforms[images.native_platform]
    assert_complete(session, svc, image, images.multi)
    assert svc.blobs.has(images.digests["multi"])   # the index the name points at


def test_a_layout_import_survives_a_gc_after_each_store_write(
        session: Session, svc: ImageService, images: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sweeps = Sweeps(svc)
    sweeps.after_publishing(monkeypatch)
    image = session.run(svc.import_layout(images.layout, "local/layout:1", name="multi",
                                          tenant=T))
    assert sweeps.runs >= 4   # index, manifest, config, layer blobs
    assert image.digest == images.platforms[images.native_platform]
    assert_complete(session, svc, image, "local/layout:1")


# between the record and its name


def test_an_import_survives_a_gc_between_its_record_and_its_name(
        session: Session, svc: ImageService, monkeypatch: pytest.MonkeyPatch) -> None:
    sweeps = Sweeps(svc)
    add_image = svc.catalog.add_image

    def add_then_gc(*args: Any) -> None:
        add_image(*args)
        sweeps.gc()

    monkeypatch.setattr(svc.catalog, "add_image", add_then_gc)
    image = _import(session, svc, "local/imported:1", _tar("hello.txt", HELLO))
    assert sweeps.runs == 1
    assert_complete(session, svc, image, "local/imported:1")


# a whole import inside one gc


def test_an_import_that_ends_while_a_gc_runs_keeps_its_image(
        session: Session, svc: ImageService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gc has read the names (the import's is not there yet) and pauses before it lists
    the store; meanwhile the import stores, records and names its image and lets go of its
    pins. Then the gc goes on: it must still see that content as the import's."""
    loop = session.loop
    digests = svc.blobs.digests
    done: list[Image] = []

    def list_after_an_import() -> list[str]:
        if not done:
            done.append(asyncio.run_coroutine_threadsafe(
                svc.import_tar(io.BytesIO(_tar("hello.txt", HELLO)), "local/imported:1",
                               tenant=T), loop).result())
        return digests()

    monkeypatch.setattr(svc.blobs, "digests", list_after_an_import)
    session.run(asyncio.to_thread(svc.gc, 0, tenant=SWEEPER))
    monkeypatch.undo()
    assert len(done) == 1
    assert_complete(session, svc, done[0], "local/imported:1")


# at the pin hook, with an older unnamed copy of the same content in the store

AT_PIN = pytest.mark.parametrize(("store", "before"), [
    ("blobs", True), ("blobs", False), ("layers", True), ("layers", False)],
    ids=["blob-gc-before-pin", "blob-gc-after-pin", "layer-gc-before-pin",
         "layer-gc-after-pin"])


def _inodes(svc: ImageService, image: Image) -> tuple[int, int]:
    """The inodes of `image`'s top layer blob and layer directory."""
    rec = svc.catalog.image(image.digest)
    assert rec is not None
    top = rec.layers[-1]
    return svc.blobs.path(top.blob).stat().st_ino, svc.layers.path(top.diff_id).stat().st_ino


def _check_copies(svc: ImageService, old: tuple[int, int], image: Image, store: str,
                  before: bool) -> None:
    """gc before the pin took the older copy (the writer published its own: a new inode);
    after the pin it left it, and the writer uses it (the same inode)."""
    new = _inodes(svc, image)
    i = 0 if store == "blobs" else 1
    assert (new[i] != old[i]) is before


@AT_PIN
def test_an_import_of_content_the_store_has_unnamed_survives_a_gc_at_its_pins(
        session: Session, svc: ImageService, monkeypatch: pytest.MonkeyPatch, store: str,
        before: bool) -> None:
    """The same tar imported before, its name gone but not yet collected: gc either takes
    the old blob or layer before the pin (the import then publishes its own) or must leave
    it once pinned (the import uses it). Gzip, so that the blob's digest is not the
    layer's diff_id (pins are by digest: an uncompressed tar's pin covers both)."""
    tar = gzip.compress(_tar("hello.txt", HELLO), mtime=0)
    old = _import(session, svc, "local/old:1", tar)
    old_inodes = _inodes(svc, old)
    assert svc.catalog.remove_name(T.id, *old.names)   # garbage now, until a gc
    sweeps = Sweeps(svc)
    sweeps.at_pin(monkeypatch, store, before=before)
    image = _import(session, svc, "local/imported:1", tar)
    assert sweeps.runs == (3 if store == "blobs" else 1)  # layer blob, config, manifest
    _check_copies(svc, old_inodes, image, store, before)
    assert image.layers == old.layers   # the same layer, by its diff_id
    assert_complete(session, svc, image, "local/imported:1")
    assert (image.layers[-1] / "hello.txt").read_bytes() == HELLO


@AT_PIN
def test_a_commit_of_content_the_store_has_unnamed_survives_a_gc_at_its_pins(
        session: Session, svc: ImageService, monkeypatch: pytest.MonkeyPatch, store: str,
        before: bool) -> None:
    base = _import(session, svc, "local/base:1", _tar("base.txt", b"base\n"))
    tar = _tar("hello.txt", HELLO)
    old = session.run(svc.commit(base, _chunks(tar), "local/old:1", tenant=T))
    old_inodes = _inodes(svc, old)
    assert svc.catalog.remove_name(T.id, *old.names)
    sweeps = Sweeps(svc)
    sweeps.at_pin(monkeypatch, store, before=before)
    image = session.run(svc.commit(base, _chunks(tar), "local/committed:1", tenant=T))
    assert sweeps.runs == (3 if store == "blobs" else 1)  # gzip blob, config, manifest
    _check_copies(svc, old_inodes, image, store, before)
    assert_complete(session, svc, image, "local/committed:1")
    assert (image.layers[-1] / "hello.txt").read_bytes() == HELLO
