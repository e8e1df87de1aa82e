"""The content-addressed blob store, its locks, the SQLite catalog and gc (no registry)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sandbox.errors import DigestMismatch, InvalidReference
from sandbox.images import ImageService, digests
from sandbox.images.store import gc
from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.catalog import Catalog, ImageRecord, LayerRecord
from sandbox.images.store.layers import LayerStore
from sandbox.images.store.unpack import Ownership
from sandbox.tenants import Tenant

REPO = Path(__file__).resolve().parents[2]


def test_put_bytes_names_the_blob_by_its_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    d = store.put_bytes(b"hello")
    assert d == digests.of_bytes(b"hello")
    assert store.path(d).read_bytes() == b"hello"
    assert store.read(d, 100) == b"hello"


def test_a_mismatch_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    wrong = digests.of_bytes(b"other")
    with pytest.raises(DigestMismatch):
        store.put_bytes(b"hello", expected=wrong)
    import io
    with pytest.raises(DigestMismatch):
        store.put_stream(io.BytesIO(b"hello"), expected=wrong)
    with pytest.raises(DigestMismatch):
        store.put_stream(io.BytesIO(b"hello"), expected=digests.of_bytes(b"hello"),
                         expected_size=4)
    assert list(store.dir.iterdir()) == []
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("bad", ["sha256:../../etc/passwd", "sha256:" + "A" * 64,
                                 "sha512:" + "a" * 128, "md5:abc", "", "sha256:" + "a" * 63])
def test_a_malformed_digest_never_names_a_file(tmp_path: Path, bad: str) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(InvalidReference):
        store.path(bad)
    with pytest.raises(InvalidReference):
        asyncio.run(store.ensure(bad, _never))


async def _never(_: Path) -> None:
    raise AssertionError("fetch must not run")


def test_concurrent_ensures_fetch_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"x" * 100_000
    d = digests.of_bytes(data)
    calls = 0

    async def fetch(dest: Path) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        dest.write_bytes(data)

    async def main() -> list[tuple[Path, bool]]:
        return await asyncio.gather(*(store.ensure(d, fetch) for _ in range(8)))

    results = asyncio.run(main())
    assert calls == 1
    assert {p for p, _ in results} == {store.path(d)}
    assert store.path(d).read_bytes() == data
    assert list(store.tmp.iterdir()) == []


def test_a_failed_fetch_leaves_nothing_and_the_next_one_runs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    d = digests.of_bytes(b"data")

    async def broken(dest: Path) -> None:
        dest.write_bytes(b"da")
        raise DigestMismatch("truncated")

    async def good(dest: Path) -> None:
        dest.write_bytes(b"data")

    with pytest.raises(DigestMismatch):
        asyncio.run(store.ensure(d, broken))
    assert not store.has(d)
    assert list(store.tmp.iterdir()) == []
    path, fetched = asyncio.run(store.ensure(d, good))
    assert fetched and path.read_bytes() == b"data"


def test_processes_sharing_a_store_fetch_each_blob_once(tmp_path: Path) -> None:
    """Across processes the flock serialises: the second finds the blob and fetches nothing."""
    log = tmp_path / "fetches"
    script = textwrap.dedent(f"""
        import asyncio, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from sandbox.images.store.blobs import BlobStore
        from sandbox.images import digests
        data = b"shared" * 1000
        async def fetch(dest):
            with open({str(log)!r}, "a") as f:
                f.write("fetch\\n")
            await asyncio.sleep(0.3)
            dest.write_bytes(data)
        store = BlobStore(Path({str(tmp_path / "store")!r}))
        asyncio.run(store.ensure(digests.of_bytes(data), fetch))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    assert log.read_text().count("fetch") == 1


def test_temps_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = store.tmp / f"{'a' * 64}.{dead.pid}.0000"
    live = store.tmp / f"{'b' * 64}.{os.getpid()}.0000"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    assert store.clean_temps() == 1
    assert not stale.exists() and live.exists()


# catalog and gc


def _image(cat: Catalog, store: BlobStore, layers: LayerStore, name: str | None,
           blobs: list[bytes], used: float, tenant: str = "t") -> ImageRecord:
    """An image whose layer blobs are `blobs` (content shared between images dedupes),
    named `name` by `tenant`."""
    layer_recs = []
    for b in blobs:
        d = store.put_bytes(b)
        diff_id = digests.of_bytes(b"diff" + b)
        layers.path(diff_id).mkdir(exist_ok=True)
        cat.record_layer(diff_id, 1000, 1)
        layer_recs.append(LayerRecord(diff_id, d, "application/vnd.oci.image.layer.v1.tar",
                                      len(b)))
    config = store.put_bytes(b"config of " + b"".join(blobs) + (name or "").encode())
    manifest = store.put_bytes(b"manifest " + config.encode())
    rec = ImageRecord(manifest, "application/vnd.oci.image.manifest.v1+json", config,
                      "linux/amd64", sum(len(b) for b in blobs), used, used, tuple(layer_recs))
    cat.add_image(rec)
    if name:
        cat.set_name(tenant, name, name.rsplit(":", 1)[0], "t", manifest, manifest)
    return rec


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Catalog, BlobStore, LayerStore]:
    cat = Catalog(tmp_path / "catalog.db")
    yield cat, BlobStore(tmp_path / "blobs"), LayerStore(tmp_path / "layers",
                                                         ownership=Ownership("squash"))
    cat.close()


def test_gc_keeps_named_and_leased_images(parts: tuple[Catalog, BlobStore, LayerStore]
                                          ) -> None:
    cat, store, layers = parts
    named = _image(cat, store, layers, "r/named:t", [b"n" * 10], 1)
    leased = _image(cat, store, layers, None, [b"l" * 10], 2)
    loose = _image(cat, store, layers, None, [b"o" * 10], 3)
    cat.lease("container-1", leased.digest)
    report = gc.collect(cat, store, layers)
    assert report.images == [loose.digest]
    assert cat.image(named.digest) and cat.image(leased.digest)
    assert not store.has(loose.layers[0].blob) and not layers.has(loose.layers[0].diff_id)
    assert store.has(named.layers[0].blob) and layers.has(leased.layers[0].diff_id)


def test_a_lease_of_a_dead_process_does_not_pin(parts: tuple[Catalog, BlobStore, LayerStore]
                                                ) -> None:
    cat, store, layers = parts
    img = _image(cat, store, layers, None, [b"x"], 1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    cat.lease("gone", img.digest, pid=dead.pid)
    assert gc.collect(cat, store, layers).images == [img.digest]


def test_a_tenants_gc_drops_its_least_recently_used_images_down_to_its_budget(
        tmp_path: Path) -> None:
    """A budget is the tenant's own: its oldest images go first, another tenant's images
    (even older) and the images both name stay."""
    svc = ImageService(tmp_path)
    cat, store, layers = svc.catalog, svc.blobs, svc.layers
    now = time.time()
    theirs = _image(cat, store, layers, "r/theirs:t", [b"z" * 5000], now - 500, tenant="b")
    old = _image(cat, store, layers, "r/old:t", [b"a" * 5000], now - 100, tenant="a")
    new = _image(cat, store, layers, "r/new:t", [b"b" * 5000], now, tenant="a")
    shared = _image(cat, store, layers, "r/shared:t", [b"s" * 10], now - 300, tenant="a")
    cat.set_name("b", "r/shared:t", "r/shared", "t", shared.digest, shared.digest)
    a = Tenant("a")
    before = cat.usage("a")
    assert before == 2 * (5000 + 1000) + 10 + 1000
    report = svc.gc(5000 + 1000, tenant=a)
    # Least recently used first: the shared one leaves a's names (the files stay, b uses
    # them), then old (its files go), and new fits.
    assert report.images == [shared.digest, old.digest]
    assert cat.image(old.digest) is None and not store.has(old.layers[0].blob)
    assert cat.image(new.digest) is not None and cat.image(theirs.digest) is not None
    assert cat.image(shared.digest) is not None and cat.names(("b",))[0].name == "r/shared:t"
    assert report.kept_bytes == cat.usage("a") == 5000 + 1000
    asyncio.run(svc.close())


def test_a_shared_layer_goes_only_with_its_last_image(
        parts: tuple[Catalog, BlobStore, LayerStore]) -> None:
    cat, store, layers = parts
    a = _image(cat, store, layers, "r/a:t", [b"base", b"top-a"], 1)
    b = _image(cat, store, layers, None, [b"base", b"top-b"], 2)
    report = gc.collect(cat, store, layers)
    assert report.images == [b.digest]
    base = a.layers[0]
    assert store.has(base.blob) and layers.has(base.diff_id)
    assert not store.has(b.layers[1].blob)
    cat.remove_name("t", "r/a:t")
    gc.collect(cat, store, layers)
    assert not store.has(base.blob) and not layers.has(base.diff_id)
    assert store.digests() == [] and layers.diff_ids() == []


def test_the_catalog_is_usable_from_a_worker_thread(
        parts: tuple[Catalog, BlobStore, LayerStore]) -> None:
    """The service runs gc and imports in threads beside its event loop."""
    cat, store, layers = parts
    img = _image(cat, store, layers, None, [b"t"], 1)

    async def main() -> gc.GcReport:
        return await asyncio.to_thread(gc.collect, cat, store, layers)

    assert asyncio.run(main()).images == [img.digest]



def test_many_opening_a_new_catalog_at_once_all_get_it(tmp_path: Path) -> None:
    """Each turns the new database to WAL; SQLite refuses at once ("database is locked"),
    busy timeout or not, whoever comes while another is doing it. Threads race like the
    processes of several services sharing a state directory (~1 in 150 failed before)."""
    errors: list[BaseException] = []
    for round_ in range(100):
        db = tmp_path / f"catalog-{round_}.db"
        start = threading.Barrier(8)

        def open_it(db: Path = db, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                Catalog(db).close()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_names_of_a_catalog_from_before_tenants_become_the_local_tenants(
        tmp_path: Path) -> None:
    """A state directory made before tenancy: its names are kept, as the local tenant's
    (a service with tokens never serves that tenant, so they are gc's)."""
    import sqlite3
    db = tmp_path / "catalog.db"
    old = sqlite3.connect(db)
    old.executescript("""
        CREATE TABLE images (digest TEXT PRIMARY KEY, media_type TEXT NOT NULL,
            config TEXT NOT NULL, platform TEXT NOT NULL, size INTEGER NOT NULL,
            created REAL NOT NULL, last_used REAL NOT NULL);
        CREATE TABLE names (name TEXT PRIMARY KEY, repository TEXT NOT NULL, tag TEXT,
            target TEXT NOT NULL, image TEXT NOT NULL REFERENCES images(digest)
            ON DELETE CASCADE, updated REAL NOT NULL);
        CREATE INDEX names_image ON names(image);
        CREATE TABLE blob_sources (blob TEXT NOT NULL, repository TEXT NOT NULL,
            PRIMARY KEY (blob, repository));
        INSERT INTO images VALUES ('sha256:aa', 'm', 'sha256:cc', 'linux/amd64', 1, 0, 0);
        INSERT INTO names VALUES ('r/x:1', 'r/x', '1', 'sha256:aa', 'sha256:aa', 0);
        INSERT INTO blob_sources VALUES ('sha256:bb', 'r/x');
    """)
    old.close()
    cat = Catalog(db)
    try:
        assert [(n.tenant, n.name) for n in cat.names()] == [("local", "r/x:1")]
        assert cat.sources("local", "sha256:bb") == ["r/x"]
        assert cat.lookup("other", "r/x:1") is None
    finally:
        cat.close()
    Catalog(db).close()  # opening it again changes nothing
