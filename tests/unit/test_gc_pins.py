"""gc's pins (sandbox/images/store/gc.py: Pins): counted holds, a hook usable from several
threads, and what a running gc counts as pinned: everything pinned at any moment since it
began, until the last gc running has ended."""

from __future__ import annotations

import threading
from pathlib import Path

from sandbox.images import digests
from sandbox.images.manifest import OCI_LAYER, OCI_MANIFEST
from sandbox.images.store import gc
from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.catalog import Catalog, ImageRecord, LayerRecord
from sandbox.images.store.layers import LayerStore
from sandbox.images.store.unpack import Ownership

A, B = digests.of_bytes(b"a"), digests.of_bytes(b"b")


def pinned(pins: gc.Pins, digest: str) -> bool:
    with pins.deciding(digest) as answer:
        return answer


def test_holds_are_counted() -> None:
    pins = gc.Pins()
    with pins.hold(A, A):
        with pins.hold(A):
            assert pinned(pins, A)
        assert pinned(pins, A)
    assert not pinned(pins, A)


def test_the_hook_pins_from_any_thread_until_the_block_ends() -> None:
    pins = gc.Pins()
    with pins.holding() as pin:
        threads = [threading.Thread(target=pin, args=(d,)) for d in (A, B, A)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert pinned(pins, A) and pinned(pins, B)
    assert not pinned(pins, A) and not pinned(pins, B)


def test_a_running_gc_sees_what_was_pinned_since_it_began_until_the_last_gc_ends() -> None:
    """A writer may name its image after a gc read the names and drop its pins before that
    gc reaches its content: the gc must still count it as pinned."""
    pins = gc.Pins()
    with pins.hold(A), pins.sweep():
        pass
    assert not pinned(pins, A)   # no gc running: only what is held
    with pins.sweep():
        with pins.hold(B):
            pass
        assert pinned(pins, B)
        with pins.sweep():       # a second gc beside the first
            pass
        assert pinned(pins, B)
    assert not pinned(pins, B)
    with pins.hold(A), pins.sweep():
        pass
    with pins.hold(A):
        with pins.sweep():
            pass
        assert pinned(pins, A)


def _record(cat: Catalog, blobs: BlobStore, layers: LayerStore, tag: bytes) -> ImageRecord:
    """An image of one layer, recorded and named by nothing (as between `add_image` and
    `set_name`)."""
    blob = blobs.put_bytes(b"layer " + tag)
    diff_id = digests.of_bytes(b"tar " + tag)
    layers.path(diff_id).mkdir()
    (layers.path(diff_id) / "file").write_bytes(tag)
    cat.record_layer(diff_id, 1, 1)
    config = blobs.put_bytes(b"config " + tag)
    rec = ImageRecord(blobs.put_bytes(b"manifest " + tag), OCI_MANIFEST, config, "linux/amd64",
                      1, 0, 0, (LayerRecord(diff_id, blob, OCI_LAYER, 1),))
    cat.add_image(rec)
    return rec


def test_collect_keeps_a_pinned_record_with_its_content_and_takes_the_rest(
        tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    blobs = BlobStore(tmp_path / "blobs")
    layers = LayerStore(tmp_path / "layers", ownership=Ownership("squash"))
    try:
        kept, gone = _record(cat, blobs, layers, b"kept"), _record(cat, blobs, layers, b"gone")
        pins = gc.Pins()
        with pins.hold(kept.digest):
            report = gc.collect(cat, blobs, layers, pins)
        assert report.images == [gone.digest] and cat.image(kept.digest) == kept
        assert sorted(blobs.digests()) == sorted([kept.digest, kept.config,
                                                  kept.layers[0].blob])
        assert layers.diff_ids() == [kept.layers[0].diff_id]
        assert (report.blobs, report.layers) == (3, 1)
        assert list(layers.tmp.iterdir()) == []   # the withdrawn layer is removed too
    finally:
        cat.close()
