"""The image store checked against itself (an fsck): every blob an image or a name needs is
there and hashes to its name, every layer an image needs is unpacked, nothing is half-stored
(temporary entries of a live process, or of none) and nothing is left that nothing needs
and no work under way pins: no image record no name, lease or build cache holds, no blob or
layer no image needs (what a failed pull must not leave).

Reads every blob: for tests, faults and operators' checks, not for a request's path; run it
when no pull, import or commit is under way (their temporary entries count as left over).
"""

from __future__ import annotations

import hashlib

from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.catalog import Catalog
from sandbox.images.store.gc import Pins
from sandbox.images.store.layers import LayerStore

_CHUNK = 1 << 20


def _hash_of(blobs: BlobStore, digest: str) -> str:
    h = hashlib.sha256()
    with open(blobs.path(digest), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def problems(catalog: Catalog, blobs: BlobStore, layers: LayerStore,
             pins: Pins | None = None) -> list[str]:
    """What is wrong with the store, one sentence each; empty when it is consistent."""
    found: list[str] = []
    names = catalog.names()
    needed_blobs = {n.target for n in names}
    needed_layers: set[str] = set()
    pinned = (lambda d: False) if pins is None else pins.pinned
    held = {n.image for n in names} | catalog.cached_images() | catalog.leased()
    for rec in catalog.images():
        if rec.digest not in held and not pinned(rec.digest):
            found.append(f"image {rec.digest} is recorded but nothing names or uses it")
        needed_blobs |= {rec.digest, rec.config, *(lr.blob for lr in rec.layers)}
        needed_layers |= {lr.diff_id for lr in rec.layers}
        found += [f"image {rec.digest}: layer {lr.diff_id} is not unpacked"
                  for lr in rec.layers if not layers.has(lr.diff_id)]
    present = set(blobs.digests())
    found += [f"blob {d} is needed but missing" for d in sorted(needed_blobs - present)]
    for digest in sorted(present):
        got = _hash_of(blobs, digest)
        if got != digest:
            found.append(f"blob {digest} hashes to {got}")
    found += [f"blob {d} is stored but nothing needs it" for d in sorted(present - needed_blobs)
              if not pinned(d)]
    found += [f"layer {d} is unpacked but nothing needs it"
              for d in sorted(set(layers.diff_ids()) - needed_layers) if not pinned(d)]
    for tmp in (blobs.tmp, layers.tmp):
        found += [f"{tmp / name} is left over" for name in sorted(p.name for p in tmp.iterdir())]
    return found
