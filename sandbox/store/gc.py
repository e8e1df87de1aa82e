"""Garbage collection: remove what no name and no live container uses, least recently used
first, until the store fits a size budget; then every blob and layer no image needs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sandbox.store.blobs import BlobStore
from sandbox.store.catalog import Catalog, ImageRecord
from sandbox.store.layers import LayerStore


@dataclass
class GcReport:
    images: list[str] = field(default_factory=list)     # image digests removed
    blobs: int = 0
    layers: int = 0
    freed_bytes: int = 0
    kept_bytes: int = 0                                 # what the store holds afterwards


def _blobs_of(rec: ImageRecord) -> set[str]:
    return {rec.digest, rec.config, *(lr.blob for lr in rec.layers)}


def _layers_of(rec: ImageRecord) -> set[str]:
    return {lr.diff_id for lr in rec.layers}


def _release(refs: Counter[str], keys: set[str], sizes: dict[str, int]) -> int:
    """Drop one reference to each key; the bytes of those no longer referenced."""
    freed = 0
    for key in keys:
        refs[key] -= 1
        if refs[key] == 0:
            freed += sizes.get(key, 0)
    return freed


def collect(catalog: Catalog, blobs: BlobStore, layers: LayerStore,
            budget_bytes: int = 0) -> GcReport:
    report = GcReport()
    leased = catalog.leased()
    named = {n.image for n in catalog.names()}
    images = catalog.images()
    blob_refs: Counter[str] = Counter()
    layer_refs: Counter[str] = Counter()
    for rec in images:
        blob_refs.update(_blobs_of(rec))
        layer_refs.update(_layers_of(rec))
    blob_size = {d: blobs.size(d) for d in blobs.digests()}
    layer_size = {d: catalog.layer_bytes(d) for d in layers.diff_ids()}
    # What images share is counted once, and freed only with the last image using it.
    total = sum(blob_size.values()) + sum(layer_size.values())
    for rec in sorted(images, key=lambda r: r.last_used):  # least recently used first
        if total <= budget_bytes:
            break
        if rec.digest in named or rec.digest in leased:
            continue
        catalog.remove_image(rec.digest)
        report.images.append(rec.digest)
        total -= _release(blob_refs, _blobs_of(rec), blob_size)
        total -= _release(layer_refs, _layers_of(rec), layer_size)

    keep_blobs = {d for d, n in blob_refs.items() if n > 0}
    keep_blobs |= {n.target for n in catalog.names()}  # an index a tag points at
    keep_layers = {d for d, n in layer_refs.items() if n > 0}
    for digest, size in blob_size.items():
        if digest not in keep_blobs:
            blobs.remove(digest)
            catalog.forget_blob(digest)
            report.freed_bytes += size
            report.blobs += 1
    for diff_id, size in layer_size.items():
        if diff_id not in keep_layers:
            layers.remove(diff_id)
            catalog.forget_layer(diff_id)
            report.freed_bytes += size
            report.layers += 1
    report.kept_bytes = (sum(s for d, s in blob_size.items() if d in keep_blobs)
                         + sum(s for d, s in layer_size.items() if d in keep_layers))
    return report
