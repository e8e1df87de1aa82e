"""What a failed write touched, and collecting just that (sandbox/images/store/gc.py:
`Pins.recording`, `collect(only=...)`): a failed pull takes away its own leftovers and
leaves the rest of the store unread."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sandbox.images.store import gc
from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.catalog import Catalog
from sandbox.images.store.layers import LayerStore
from sandbox.images.store.unpack import Ownership
from tests.unit.test_gc_pins import A, B, _record


def test_recording_sees_pins_of_the_work_its_tasks_and_threads_only() -> None:
    pins = gc.Pins()

    async def work() -> None:
        with pins.holding() as pin:
            await asyncio.gather(asyncio.to_thread(pin, A), asyncio.sleep(0))
            pin(B)

    with pins.hold(B), pins.recording() as touched:
        asyncio.run(work())
    assert touched == {A, B}
    with pins.recording() as untouched, pins.hold(A):
        pass
    with pins.hold(B):  # outside any recording
        pass
    assert untouched == {A}


def test_collect_only_takes_what_it_is_given(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    blobs = BlobStore(tmp_path / "blobs")
    layers = LayerStore(tmp_path / "layers", ownership=Ownership("squash"))
    try:
        mine, other = _record(cat, blobs, layers, b"mine"), _record(cat, blobs, layers, b"other")
        touched = {mine.digest, mine.config, mine.layers[0].blob, mine.layers[0].diff_id}
        report = gc.collect(cat, blobs, layers, gc.Pins(), only=touched)
        assert report.images == [mine.digest] and (report.blobs, report.layers) == (3, 1)
        assert cat.image(other.digest) == other
        assert sorted(blobs.digests()) == sorted([other.digest, other.config,
                                                  other.layers[0].blob])
        assert layers.diff_ids() == [other.layers[0].diff_id]
    finally:
        cat.close()
