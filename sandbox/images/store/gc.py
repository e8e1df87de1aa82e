"""Garbage collection of the shared store: images no tenant names and no live container
uses, then every blob and layer no image needs. Which of its own images a tenant gives up
to fit a budget is decided above (ImageService.gc)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.catalog import Catalog, ImageRecord
from sandbox.images.store.layers import LayerStore


@dataclass
class GcReport:
    images: list[str] = field(default_factory=list)     # image digests removed
    blobs: int = 0
    layers: int = 0
    freed_bytes: int = 0
    kept_bytes: int = 0      # what the store holds after (ImageService.gc: the tenant uses)


def _blobs_of(rec: ImageRecord) -> set[str]:
    return {rec.digest, rec.config, *(lr.blob for lr in rec.layers)}


def _layers_of(rec: ImageRecord) -> set[str]:
    return {lr.diff_id for lr in rec.layers}


def collect(catalog: Catalog, blobs: BlobStore, layers: LayerStore,
            keep: Collection[str] = ()) -> GcReport:
    """`keep`: blobs and diff_ids of imports and pulls under way, named by no image yet."""
    report = GcReport()
    leased = catalog.leased()
    named = {n.image for n in catalog.names()}
    kept = []
    for rec in catalog.images():
        if rec.digest in named or rec.digest in leased:
            kept.append(rec)
        else:
            catalog.remove_image(rec.digest)
            report.images.append(rec.digest)
    keep_blobs = set().union(*(_blobs_of(rec) for rec in kept))
    keep_blobs |= {n.target for n in catalog.names()}  # an index a tag points at
    keep_blobs |= set(keep)
    keep_layers = set().union(*(_layers_of(rec) for rec in kept), keep)
    for digest in blobs.digests():
        if digest not in keep_blobs:
            report.freed_bytes += blobs.size(digest)
            blobs.remove(digest)
            catalog.forget_blob(digest)
            report.blobs += 1
        else:
            report.kept_bytes += blobs.size(digest)
    for diff_id in layers.diff_ids():
        size = catalog.layer_bytes(diff_id)
        if diff_id not in keep_layers:
            layers.remove(diff_id)
            catalog.forget_layer(diff_id)
            report.freed_bytes += size
            report.layers += 1
        else:
            report.kept_bytes += size
    return report
