"""Garbage collection of the shared store: images no tenant names or caches (a build step)
and no live container uses, then every blob and layer no image needs. Which of its own
images a tenant gives up to fit a budget is decided above (ImageService.gc).

Content on its way in (a pull, an import, a commit) is named by no image until its last
step, so gc must be told about it: the writer pins it (`Pins`). The protocol, which needs
no lock held across a whole gc:

- A writer pins a digest before the store publishes it (renames it into place) or before
  it relies on finding it there, and keeps the pin until its image is recorded and named.
  The stores take a hook for that (`on_digest`), called once the digest is known.
- gc decides and removes each image record, blob and layer under the pins' lock
  (`Pins.deciding`): a pin taken before the decision is seen, and none slips in between
  the decision and the removal. So for an older copy of the content either gc took it
  out before the pin (the writer then finds it absent and publishes its own) or gc sees
  the pin and leaves it.
- gc reads the names once, at its start. A writer may name its image after that read and
  drop its pins before gc reaches its content; so whatever is pinned at any moment while
  a gc runs counts as pinned until that gc (every gc running then) has ended.

Pins are this process's: a store shared by several processes is not covered.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.catalog import Catalog, ImageRecord
from sandbox.images.store.layers import LayerStore, remove_tree

# The digests pinned by the work under `Pins.recording` (its tasks and worker threads inherit
# the context, hence the set).
_recording: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "pins_recording", default=None)


@dataclass
class GcReport:
    images: list[str] = field(default_factory=list)     # image digests removed
    blobs: int = 0
    layers: int = 0
    freed_bytes: int = 0
    kept_bytes: int = 0      # what the store holds after (ImageService.gc: the tenant uses)


class Pins:
    """Digests (manifests, configs, layer blobs, diff_ids) that work under way is about to
    name, counted; safe to use from the event loop and from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: Counter[str] = Counter()
        self._sweeps = 0                 # gcs running
        self._seen: set[str] = set()     # pinned at some moment since they began

    def _pin(self, digest: str) -> None:
        self._count[digest] += 1
        if self._sweeps:
            self._seen.add(digest)
        touched = _recording.get()
        if touched is not None:
            touched.add(digest)

    @contextlib.contextmanager
    def recording(self) -> Iterator[set[str]]:
        """The set of every digest pinned within the block by this task, the tasks and the
        worker threads it starts (they inherit its context): what a piece of work touched,
        for `collect(only=...)` when it fails."""
        touched: set[str] = set()
        token = _recording.set(touched)
        try:
            yield touched
        finally:
            _recording.reset(token)

    def _unpin(self, digests: list[str]) -> None:
        with self._lock:
            self._count.subtract(digests)
            self._count = +self._count

    @contextlib.contextmanager
    def hold(self, *digests: str) -> Iterator[None]:
        """`digests` pinned for the block."""
        with self._lock:
            for d in digests:
                self._pin(d)
        try:
            yield
        finally:
            self._unpin(list(digests))

    @contextlib.contextmanager
    def holding(self) -> Iterator[Callable[[str], None]]:
        """A hook for the stores' `on_digest` (from any thread): each digest it is given
        stays pinned until the block ends."""
        taken: list[str] = []

        def pin(digest: str) -> None:
            with self._lock:
                self._pin(digest)
                taken.append(digest)

        try:
            yield pin
        finally:
            self._unpin(taken)

    def pinned(self, digest: str) -> bool:
        with self._lock:
            return self._count[digest] > 0

    @contextlib.contextmanager
    def sweep(self) -> Iterator[None]:
        """A gc runs for the block: from now until it ends, a digest once pinned stays
        pinned for `deciding`."""
        with self._lock:
            self._sweeps += 1
            self._seen.update(self._count)
        try:
            yield
        finally:
            with self._lock:
                self._sweeps -= 1
                if not self._sweeps:
                    self._seen.clear()

    @contextlib.contextmanager
    def deciding(self, digest: str) -> Iterator[bool]:
        """Whether `digest` is pinned (or was, since a running gc began), with the lock held
        for the block: what the block removes on a False no writer has pinned."""
        with self._lock:
            yield self._count[digest] > 0 or digest in self._seen


def _blobs_of(rec: ImageRecord) -> set[str]:
    return {rec.digest, rec.config, *(lr.blob for lr in rec.layers)}


def _layers_of(rec: ImageRecord) -> set[str]:
    return {lr.diff_id for lr in rec.layers}


def _size(blobs: BlobStore, digest: str) -> int:
    try:
        return blobs.size(digest)
    except FileNotFoundError:  # another gc (running beside this one) took it
        return 0


def collect(catalog: Catalog, blobs: BlobStore, layers: LayerStore,
            pins: Pins | None = None, only: Collection[str] | None = None) -> GcReport:
    """Remove what nothing names, leases or pins (see the module's docstring). With `only`,
    just what of those digests nothing needs (what a failed pull touched): no other blob or
    layer is looked at, nor, with them, another process's work under way on other content.
    `kept_bytes` then counts only those kept."""
    pins = pins or Pins()
    report = GcReport()
    withdrawn: list[Path] = []
    try:
        with pins.sweep():
            leased = catalog.leased()
            names = catalog.names()
            named = {n.image for n in names} | catalog.cached_images()
            kept = []
            for rec in catalog.images():
                keep = (rec.digest in named or rec.digest in leased
                        or (only is not None and rec.digest not in only))
                if not keep:
                    with pins.deciding(rec.digest) as keep:  # pinned: about to be named
                        if not keep:
                            catalog.remove_image(rec.digest)
                            report.images.append(rec.digest)
                if keep:
                    kept.append(rec)
            keep_blobs = set().union(*(_blobs_of(rec) for rec in kept))
            keep_blobs |= {n.target for n in names}  # an index a tag points at
            keep_layers = set().union(*(_layers_of(rec) for rec in kept))
            for digest in (blobs.digests() if only is None
                           else [d for d in only if blobs.has(d)]):
                _blob(catalog, blobs, pins, digest, digest in keep_blobs, report)
            for diff_id in (layers.diff_ids() if only is None
                            else [d for d in only if layers.has(d)]):
                out = _layer(catalog, layers, pins, diff_id, diff_id in keep_layers, report)
                if out is not None:
                    withdrawn.append(out)
    finally:
        # Out of the store already: removed outside the lock (a large tree takes a while,
        # and writers wait for the lock to pin).
        for out in withdrawn:
            remove_tree(out)
    return report


def _blob(catalog: Catalog, blobs: BlobStore, pins: Pins, digest: str, needed: bool,
          report: GcReport) -> None:
    freed = 0
    if not needed:
        with pins.deciding(digest) as needed:  # pinned: needed by work under way
            if not needed:
                freed = blobs.remove(digest)
                catalog.forget_blob(digest)
    if needed:
        report.kept_bytes += _size(blobs, digest)
    elif freed:  # else another gc beside this one took it first
        report.freed_bytes += freed
        report.blobs += 1


def _layer(catalog: Catalog, layers: LayerStore, pins: Pins, diff_id: str, needed: bool,
           report: GcReport) -> Path | None:
    """Takes the layer out of the store unless needed or pinned; returns where it went."""
    size = catalog.layer_bytes(diff_id)
    out = None
    if not needed:
        with pins.deciding(diff_id) as needed:  # pinned: needed by work under way
            if not needed:
                out = layers.withdraw(diff_id)
                catalog.forget_layer(diff_id)
    if needed:
        report.kept_bytes += size
    elif out is not None:
        report.freed_bytes += size
        report.layers += 1
    return out
