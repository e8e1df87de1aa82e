"""The image API the service uses: pull, resolve, list, inspect, tag, remove, import, commit,
push and gc, over a registry client and a store under the state directory.

    state_dir/images/blobs/sha256/<hex>     verified blobs (manifests, configs, layer tars)
    state_dir/images/layers/sha256/<hex>    unpacked layers, by diff_id (overlay lower dirs)
    state_dir/images/catalog.db             names, images, layers, leases (SQLite)

An `Image` carries what a container needs: its layer directories (lowest first) and the
run defaults of its config (argv, env, cwd, user).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson

from sandbox.errors import (
    DigestMismatch,
    Forbidden,
    ImageError,
    ImageInUse,
    InvalidReference,
    ManifestError,
    NotFound,
    QuotaExceeded,
    StoreFull,
)
from sandbox.images import digests
from sandbox.images.changes import apply_changes, parse_changes
from sandbox.images.imageconfig import (
    MAX_ACCOUNT_FILE_BYTES,
    ImageConfig,
    RunDefaults,
    build_config,
    chain_ids,
    parse_config,
    resolve_user,
    run_defaults,
)
from sandbox.images.layerintake import take_layer
from sandbox.images.manifest import (
    DOCKER_FOREIGN,
    DOCKER_FOREIGN_GZIP,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_ZSTD,
    MAX_INDEX_DEPTH,
    MAX_LAYERS,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ND,
    OCI_LAYER_ND_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    build_oci_manifest,
    parse_manifest,
    platform_serves,
    select_platform,
)
from sandbox.images.public import PUBLIC, PublicNames
from sandbox.images.reference import Reference, parse
from sandbox.images.registry.client import RegistryClient
from sandbox.images.registry.config import RegistriesConfig
from sandbox.images.store import gc, space, verify
from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.catalog import Catalog, ImageRecord, LayerRecord
from sandbox.images.store.layers import LayerStore
from sandbox.images.store.layerstream import diff_id_of
from sandbox.images.store.locks import temp_name
from sandbox.images.store.merged import MergedTree
from sandbox.images.store.peek import read_from_layers
from sandbox.images.store.unpack import (
    Ownership,
    UnpackLimits,
    UnpackReport,
    detect_compression,
)
from sandbox.tenants import Tenant

log = logging.getLogger("sandboxd.images")
T = TypeVar("T")

MANIFEST_MAX = 4 << 20
CONFIG_MAX = 4 << 20
INDEX_JSON_MAX = 4 << 20


@dataclass(frozen=True)
class PullProgress:
    """One step of a pull, for progress bars: `layer` is a blob digest ('' for the image)."""

    layer: str
    status: str          # resolving | cached | downloading | unpacking | done | up to date
    done: int = 0
    total: int | None = None


ProgressCallback = Callable[[PullProgress], None]


@dataclass(frozen=True)
class Image:
    digest: str                    # the platform manifest's digest
    config_digest: str             # Docker's image id
    config: ImageConfig
    platform: str
    size: int                      # compressed: config + layer blobs
    layers: tuple[Path, ...]       # unpacked layer directories, lowest first
    defaults: RunDefaults
    names: tuple[str, ...]


@dataclass(frozen=True)
class ImageSummary:
    digest: str
    config_digest: str
    names: tuple[str, ...]
    platform: str
    size: int
    created: float
    last_used: float


def _no_progress(_: PullProgress) -> None:
    pass


class ImageService:
    """Images per tenant over one shared store (see sandbox/tenants.py): every method that
    reads or makes a name takes the tenant it acts for."""

    def __init__(self, state_dir: Path, *, registries: RegistriesConfig | None = None,
                 ownership: Ownership | None = None, platform: Platform | None = None,
                 overlay: bool = True, unpack_limits: UnpackLimits | None = None,
                 client: RegistryClient | None = None, parallel_layers: int = 4,
                 public: PublicNames | None = None) -> None:
        root = state_dir / "images"
        root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(root / "blobs")
        self.layers = LayerStore(root / "layers", ownership=ownership or Ownership("squash"),
                                 limits=unpack_limits)
        self.catalog = Catalog(root / "catalog.db")
        self.client = client or RegistryClient(registries)
        self.platform = platform or Platform.host()
        self.overlay = overlay
        self.public = public or PublicNames()
        self._parallel = asyncio.Semaphore(parallel_layers)
        self._resolved: dict[tuple[str, str], tuple[int, Image]] = {}
        # Content of pulls, imports and commits under way, which no image name holds yet:
        # gc (in a worker thread, or after a remove) must not take it from under them.
        # Pinned before it is stored or looked for, until the image is named (store/gc.py).
        self._pins = gc.Pins()
        self.blobs.clean_temps()
        self.layers.clean_temps()

    async def close(self) -> None:
        await self.client.close()
        self.catalog.close()

    async def __aenter__(self) -> ImageService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _collect(self, only: set[str] | None = None) -> gc.GcReport:
        return gc.collect(self.catalog, self.blobs, self.layers, self._pins, only)

    def _full(self) -> StoreFull:
        images, blob_bytes, layer_bytes = self.catalog.totals()
        return space.full_error(
            "image store", self.blobs.root.parent,
            f"{space.count(images, 'image')} ({space.mib(blob_bytes)} compressed), "
            f"{space.mib(layer_bytes)} of unpacked layers")

    def _prune_flat(self) -> int:
        """Remove the flat roots (overlay=False) of images no longer recorded; how many."""
        # Listed before the records are read: a flat root is made only for an image already
        # recorded, so one made after that read is not among those listed.
        flat = list(self.layers.flat.iterdir())
        keep = {chain_ids([lr.diff_id for lr in rec.layers])[-1]
                for rec in self.catalog.images() if rec.layers}
        gone = [entry for entry in flat if "sha256:" + entry.name not in keep]
        for entry in gone:
            self.layers.remove_flat("sha256:" + entry.name)
        return len(gone)

    async def _reclaim(self) -> bool:
        """Collect, in a worker thread, what nothing names, leases or pins (blobs, layers,
        flat roots): whether anything went."""
        def reclaim() -> bool:
            report = self._collect()
            return bool(report.blobs + report.layers + self._prune_flat())
        return await asyncio.to_thread(reclaim)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """Work that stores content (a pull, an import, a commit, a build step): a full
        filesystem is StoreFull, and when the work fails, what it stored that nothing needs
        (what it pinned: its manifests, blobs and layers, unpinned by then) is collected at
        once, so a failed pull holds no space for the next one. A cancelled one leaves it to
        the next gc."""
        with self._pins.recording() as touched:
            try:
                with space.reported(self._full):
                    yield
            except Exception:
                try:
                    await asyncio.to_thread(self._collect, set(touched))
                except Exception:  # the failure the caller gets is the work's, not this
                    log.warning("collecting what a failed write left failed", exc_info=True)
                raise

    def verify(self) -> list[str]:
        """What is wrong with the store (store/verify.py), one sentence each; empty when it
        is consistent. Reads every blob: call it in a worker thread."""
        return verify.problems(self.catalog, self.blobs, self.layers, self._pins)

    def _namespace(self, tenant: Tenant, ref: Reference) -> str:
        """Where the name `ref` lives for `tenant`: the operator's shared names, or its own."""
        return PUBLIC if self.public.covers(ref) else tenant.id

    def _writable(self, tenant: Tenant, ref: Reference, field: str) -> str:
        if self.public.covers(ref):
            raise Forbidden(f"{field}: {ref.familiar()} is a public name (images.public in the "
                            "service's config): only pulls update it; use another name")
        return tenant.id

    # pull

    async def pull(self, reference: str, *, tenant: Tenant, platform: Platform | None = None,
                   on_progress: ProgressCallback | None = None) -> Image:
        """Fetch an image for `tenant` (or find its name up to date) and record the name.

        A name the tenant already has is checked with one HEAD (a tag) or not at all (a
        digest). Otherwise the manifest is always fetched and verified, even when its
        image is in the store: a HEAD's digest proves nothing, and content another tenant
        brought is used only once this tenant's registry has served it too."""
        ref = parse(reference)
        ns = self._namespace(tenant, ref)
        want = platform or self.platform
        report = on_progress or _no_progress
        name = str(ref)
        known = self.catalog.lookup(ns, name)
        if known is not None and not (self._complete(known.image)
                                      and self._fits(known.image, want)):
            known = None
        if ref.digest is None:
            head = await self.client.head_manifest(ref)
            if head is None:
                raise NotFound(f"{ref.familiar()} was not found in {ref.domain}: check the "
                               "name and tag, and that you may pull it")
            if known is not None and head.digest is not None and head.digest == known.target:
                self.catalog.set_name(ns, name, ref.repository, ref.tag, known.target,
                                      known.image)
                report(PullProgress("", "up to date"))
                return await self._image(known.image, tenant)
        elif known is not None:  # content-addressed, and verified when the name was made
            report(PullProgress("", "up to date"))
            return await self._image(known.image, tenant)
        report(PullProgress("", "resolving"))
        fetched = await self.client.get_manifest(ref)
        target = fetched.digest
        async with self._writing():
            with self._pins.holding() as pin:
                pin(target)
                digest, manifest, media_type = await self._platform_manifest(
                    ref, fetched.body, fetched.media_type, target, want, pin)
                return await self._pull_content(ref, ns, tenant, target, digest, media_type,
                                                manifest, report)

    async def _pull_content(self, ref: Reference, ns: str, tenant: Tenant, target: str,
                            digest: str, media_type: str, manifest: ImageManifest,
                            report: ProgressCallback) -> Image:

        async def fetch(desc: Descriptor) -> Path:
            """`desc`'s blob, downloaded from this registry now: if it is in the store
            already (another tenant's pull), downloaded again to a temporary file and
            dropped once verified, which proves this registry serves it."""
            async def download(dest: Path) -> None:
                def progress(done: int) -> None:
                    report(PullProgress(desc.digest, "downloading", done, desc.size))
                await self.client.fetch_blob(ref, desc.digest, desc.size, dest,
                                             on_progress=progress, urls=desc.urls)
                # Before the blob is renamed into place: a pull of the same namespace that
                # waited for this one (in another process too) finds it held.
                self.catalog.hold(ns, desc.digest)

            path, _ = await self.blobs.ensure(desc.digest, download)
            if not self.catalog.holds(ns, desc.digest):  # someone else's download
                proof = self.blobs.tmp / temp_name("proof-" + digests.hex_part(desc.digest))
                try:
                    await download(proof)
                finally:
                    proof.unlink(missing_ok=True)
            self.catalog.add_source(ns, desc.digest, ref.repository)
            return path

        image = await self._install(ns, tenant, digest, media_type, manifest, fetch, report,
                                    name=(ref, None if ref.digest else ref.tag, target))
        return await self._image(image, tenant)

    def _fits(self, digest: str, want: Platform) -> bool:
        rec = self.catalog.image(digest)
        return rec is not None and platform_serves(rec.platform, want)

    def _complete(self, digest: str) -> bool:
        rec = self.catalog.image(digest)
        return rec is not None and all(self.layers.has(lr.diff_id) for lr in rec.layers)

    async def _platform_manifest(self, ref: Reference, body: bytes, media_type: str,
                                 digest: str, want: Platform, pin: Callable[[str], None]
                                 ) -> tuple[str, ImageManifest, str]:
        """Walk an index (nested at most MAX_INDEX_DEPTH deep) down to one image manifest.
        Each document is stored once it parses (one that is refused leaves nothing), pinned
        by `pin` first; a child is read no further than its index entry's size."""
        for _ in range(MAX_INDEX_DEPTH + 1):
            doc = parse_manifest(body, media_type,
                                 max_blob_bytes=self.client.config.max_blob_bytes)
            self.blobs.put_bytes(body, expected=digest, on_digest=pin)
            if isinstance(doc, ImageManifest):
                return digest, doc, media_type
            desc = select_platform(doc, want)
            child = await self.client.get_manifest(ref.with_digest(desc.digest),
                                                   size=desc.size)
            body, media_type, digest = child.body, child.media_type, child.digest
        raise ManifestError(f"{ref.familiar()}: indexes nest more than {MAX_INDEX_DEPTH} "
                            "deep; refusing to follow further")

    async def _install(self, ns: str, tenant: Tenant, digest: str, media_type: str,
                       manifest: ImageManifest,
                       fetch: Callable[[Descriptor], Awaitable[Path]],
                       report: ProgressCallback, *,
                       name: tuple[Reference, str | None, str]) -> str:
        """Config and layers of a verified manifest into the store, then `name` ((reference,
        tag, what the registry served)) given to it in `ns`; returns its digest.

        `fetch(desc)` brings `desc`'s blob from the image's source (verified), records
        that `ns` holds it, and returns its path. Content `ns` holds already is not fetched
        again; a layer already in the store but not held is taken only once this source's
        blob is checked to decompress to it. Within the tenant's byte quota, checked before
        any layer is fetched (from the manifest's sizes) and again once the layers' sizes
        are known. Until the name is given, no image name holds what this brings: gc keeps
        it because it is pinned, before it is fetched or looked for (the manifest itself
        is the caller's to pin before storing it). A full store gets one more try once
        what nothing needs is collected (`_with_room`)."""
        if manifest.config.size > CONFIG_MAX:
            raise ManifestError(f"image config {manifest.config.digest} claims "
                                f"{manifest.config.size} bytes, over the {CONFIG_MAX} cap")

        async def blob(desc: Descriptor) -> Path:
            known = ns == PUBLIC or self.catalog.holds(ns, desc.digest)
            if known and self.blobs.has(desc.digest):
                return self.blobs.path(desc.digest)
            return await fetch(desc)

        with contextlib.ExitStack() as pins:
            pins.enter_context(self._pins.hold(digest, manifest.config.digest,
                                               *(d.digest for d in manifest.layers)))
            await self._with_room(lambda: blob(manifest.config))
            config = parse_config(self.blobs.read(manifest.config.digest, CONFIG_MAX))
            if len(config.diff_ids) != len(manifest.layers):
                raise ManifestError(f"image {digest}: the manifest lists "
                                    f"{len(manifest.layers)} layers, its config "
                                    f"{len(config.diff_ids)} diff_ids")
            pins.enter_context(self._pins.hold(*config.diff_ids))
            pairs = list(zip(manifest.layers, config.diff_ids, strict=True))
            if ns != PUBLIC:
                self._check_quota(tenant, [(i, d.size) for d, i in pairs])
            await self._with_room(lambda: self._layers_in(ns, pairs, blob, report))
            now = time.time()
            self.catalog.add_image(ImageRecord(
                digest, media_type, manifest.config.digest, _platform_of(config),
                manifest.config.size + sum(d.size for d in manifest.layers), now, now,
                tuple(LayerRecord(i, d.digest, d.media_type, d.size) for d, i in pairs)))
            if ns != PUBLIC:
                self.catalog.hold(ns, *config.diff_ids)
                self._check_quota(tenant, [], image=digest)
            ref, tag, target = name
            self.catalog.set_name(ns, str(ref), ref.repository, tag, target, digest)
        return digest

    async def _with_room(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work()`, run once more if the store's filesystem was full and collecting what
        nothing names, leases or pins freed some of it (the caller's pins keep what it has
        stored so far, so the second run takes up where the first stopped)."""
        try:
            with space.reported(self._full):
                return await work()
        except StoreFull:
            if not await self._reclaim():
                raise
            log.info("the image store was full: unused content collected; trying again")
        with space.reported(self._full):
            return await work()

    async def _layers_in(self, ns: str, pairs: list[tuple[Descriptor, str]],
                         blob: Callable[[Descriptor], Awaitable[Path]],
                         report: ProgressCallback) -> None:
        """Every layer of `pairs` (blob descriptor, diff_id). Each runs to its end even when
        another fails: once this returns or raises, nothing of it is still writing, so its
        failure can be handled (collected, retried) without a straggler storing more."""
        results = await asyncio.gather(*(self._layer(ns, d, i, blob, report)
                                         for d, i in pairs), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:  # a full store first: it is what the caller can act on
            raise next((f for f in failures if space.is_full(f)), failures[0])

    async def _layer(self, ns: str, desc: Descriptor, diff_id: str,
                     blob: Callable[[Descriptor], Awaitable[Path]],
                     report: ProgressCallback) -> None:
        """Layer `diff_id` in the store for `ns`, unpacked from `await blob(desc)` if
        missing, or checked against it if `ns` does not hold it yet."""
        proven = ns == PUBLIC or self.catalog.holds(ns, diff_id)
        if proven and self.layers.has(diff_id):
            report(PullProgress(desc.digest, "cached", desc.size, desc.size))
            return
        async with self._parallel:
            unpacked_ours = False

            async def source() -> Path:
                nonlocal unpacked_ours
                unpacked_ours = True
                return await blob(desc)

            _, rep = await self.layers.ensure(diff_id, source)
            if rep is not None:
                self.catalog.record_layer(diff_id, rep.bytes, rep.entries)
            if not (proven or unpacked_ours):
                # The layer was in the store (or another pull was unpacking it): this
                # source's own blob must decompress to it, or a config naming another
                # tenant's diff_id would hand its files over.
                path = await blob(desc)
                found = await asyncio.to_thread(diff_id_of, path,
                                                self.layers.limits.max_bytes + (1 << 30))
                if found != diff_id:
                    raise DigestMismatch(
                        f"layer {desc.digest} decompresses to {found}, but the image config "
                        f"lists {diff_id}: the image is corrupt or was tampered with")
            report(PullProgress(desc.digest, "done", desc.size, desc.size))

    def _check_quota(self, tenant: Tenant, adding: list[tuple[str, int]],
                     image: str | None = None) -> None:
        """QuotaExceeded if the tenant's names would use more than its byte quota with
        `adding` ((diff_id, blob size) of new layers) or with `image` named too."""
        cap = tenant.max_image_bytes
        if cap is None:
            return
        used = self.catalog.usage(tenant.id, plus=image)
        mine = self.catalog.diff_ids_of(tenant.id)
        more = sum(size + self.catalog.layer_bytes(diff_id)
                   for diff_id, size in dict(adding).items() if diff_id not in mine)
        if used + more > cap:
            raise QuotaExceeded(f"this image would bring your images to {used + more} bytes, "
                                f"over your quota of {cap} bytes (max_image_bytes): remove "
                                "images you no longer need (DELETE /v1/images/{ref}, then "
                                "POST /v1/images/gc) and try again")

    # local lookups

    def _lookup(self, reference: str, tenant: Tenant) -> str:
        """The image digest a name, a digest or a config digest stands for, among the names
        `tenant` may see (its own and the public ones)."""
        text = reference.strip()
        if digests.is_digest(text):
            visible = self.catalog.names((tenant.id, PUBLIC))
            for n in visible:
                if text in (n.image, n.target):
                    return n.image
            for n in visible:
                rec = self.catalog.image(n.image)
                if rec is not None and rec.config == text:
                    return rec.digest
            cached = self.catalog.cached_image(tenant.id, text)
            if cached is not None:
                return cached
            raise NotFound(f"no image {text} among your images: pull it by name first")
        ref = parse(text)
        ns = self._namespace(tenant, ref)
        found = self.catalog.lookup(ns, str(ref))
        if found is not None:
            return found.image
        if ref.digest is not None:
            # repo@digest of an image this namespace has under another name of the repo
            for n in self.catalog.names((ns,)):
                if n.repository == ref.repository and ref.digest in (n.image, n.target):
                    return n.image
        raise NotFound(f"image {ref.familiar()} is not in the store: pull it first")

    async def resolve(self, reference: str, *, tenant: Tenant) -> Image:
        """A local image by name or digest, as `tenant` names it, without asking any
        registry.

        Every warm run starts here, so an answer is kept until the catalog next changes
        (a pull, tag, import, remove or gc of this process)."""
        key = (tenant.id, reference)
        cached = self._resolved.get(key)
        if cached is not None and cached[0] == self.catalog.generation:
            return cached[1]
        image = await self._image(self._lookup(reference, tenant), tenant)
        self._resolved[key] = (self.catalog.generation, image)
        return image

    def _names(self, digest: str, tenant: Tenant) -> tuple[str, ...]:
        return tuple(n.name for n in self.catalog.names((tenant.id, PUBLIC), image=digest))

    async def _image(self, digest: str, tenant: Tenant) -> Image:
        rec = self.catalog.image(digest)
        if rec is None or not self._complete(digest):
            raise NotFound(f"image {digest} is not complete in the store: pull it again")
        config = parse_config(self.blobs.read(rec.config, CONFIG_MAX))
        self.catalog.touch(digest)
        if self.overlay:
            layers = tuple(self.layers.path(lr.diff_id) for lr in rec.layers)
        else:
            top = chain_ids([lr.diff_id for lr in rec.layers])[-1]
            with space.reported(self._full):
                layers = (await self.layers.ensure_flat(
                    top, [self.blobs.path(lr.blob) for lr in rec.layers]),)
        return Image(digest, rec.config, config, rec.platform, rec.size, layers,
                     run_defaults(config), self._names(digest, tenant))

    def user_ids(self, image: Image, user: str | None = None) -> tuple[int | None, int | None]:
        """The (uid, gid) a run of `image` uses: `user` if given, else the config's User,
        names looked up in the image's own /etc/passwd and /etc/group; (None, None) means
        the runtime's default."""
        def read(path: str) -> bytes | None:
            return read_from_layers(image.layers, path, MAX_ACCOUNT_FILE_BYTES + 1)
        return resolve_user(image.defaults.user if user is None else user, read)

    def list(self, *, tenant: Tenant) -> list[ImageSummary]:
        """The images `tenant` names, and the public ones, with the names it sees."""
        names: dict[str, list[str]] = {}
        for n in self.catalog.names((tenant.id, PUBLIC)):
            names.setdefault(n.image, []).append(n.name)
        return [ImageSummary(rec.digest, rec.config, tuple(names[rec.digest]), rec.platform,
                             rec.size, rec.created, rec.last_used)
                for rec in self.catalog.images() if rec.digest in names]

    def inspect(self, reference: str, *, tenant: Tenant) -> dict[str, Any]:
        digest = self._lookup(reference, tenant)
        rec = self.catalog.image(digest)
        assert rec is not None
        config = orjson.loads(self.blobs.read(rec.config, CONFIG_MAX))
        return {
            "digest": rec.digest, "media_type": rec.media_type, "config_digest": rec.config,
            "platform": rec.platform, "size": rec.size, "created": rec.created,
            "last_used": rec.last_used, "names": list(self._names(digest, tenant)),
            "layers": [{"digest": lr.blob, "diff_id": lr.diff_id, "media_type": lr.media_type,
                        "size": lr.size, "unpacked_bytes": self.catalog.layer_bytes(lr.diff_id)}
                       for lr in rec.layers],
            "config": config,
        }

    def tag(self, source: str, target: str, *, tenant: Tenant) -> str:
        digest = self._lookup(source, tenant)
        ref = parse(target)
        if ref.digest is not None:
            raise InvalidReference(f"target {target!r}: a tag cannot carry a digest; "
                                   "write it as name:tag")
        ns = self._writable(tenant, ref, "target")
        self._check_quota(tenant, [], image=digest)
        self.catalog.set_name(ns, str(ref), ref.repository, ref.tag, digest, digest)
        return str(ref)

    def remove(self, reference: str, *, tenant: Tenant, force: bool = False) -> list[str]:
        """Remove one of the tenant's names, or by digest all its names of that image. The
        image's files go once no tenant names it and no container uses it. Removing the last
        name of an image a container uses is refused unless `force`, which removes the names
        and leaves the files to gc once the container is gone."""
        text = reference.strip()
        if digests.is_digest(text):
            digest = self._lookup(text, tenant)
            names = [n.name for n in self.catalog.names((tenant.id,), image=digest)]
            if not names:
                raise Forbidden(f"{text} is named only by public names (images.public in the "
                                "service's config), which only the operator removes")
        else:
            ref = parse(text)
            ns = self._writable(tenant, ref, "ref")
            found = self.catalog.lookup(ns, str(ref))
            if found is None:
                raise NotFound(f"image {ref.familiar()} is not in the store")
            digest, names = found.image, [found.name]
        remaining = [n for n in self.catalog.names(image=digest)
                     if n.tenant != tenant.id or n.name not in names]
        in_use = digest in self.catalog.leased()
        if not remaining and in_use and not force:
            raise ImageInUse(f"image {digest} is used by a running container; stop the "
                             "container first or remove with force")
        for name in names:
            self.catalog.remove_name(tenant.id, name)
        # Forced while in use: the names go now, the files once no container uses them (gc).
        # gc removes the record too, unless work under way has pinned it (the same image
        # pulled or imported again).
        if not remaining and not in_use:
            self._collect()
        return names

    def gc(self, budget_bytes: int = 0, *, tenant: Tenant) -> gc.GcReport:
        """Drop the tenant's least recently used images (those no container uses) until its
        images fit `budget_bytes`, then every image nobody names or uses and every blob and
        layer no image needs. Other tenants' names are never touched."""
        evicted = []
        leased = self.catalog.leased()
        for rec in sorted(self.catalog.images(), key=lambda r: r.last_used):
            if self.catalog.usage(tenant.id) <= budget_bytes:
                break
            mine = self.catalog.names((tenant.id,), image=rec.digest)
            if not mine or rec.digest in leased:
                continue
            for n in mine:
                self.catalog.remove_name(tenant.id, n.name)
            evicted.append(rec.digest)
        report = self._collect()
        self._prune_flat()
        # What the caller may learn: its own evictions and its own usage, not the store's.
        return dataclasses.replace(report, images=evicted,
                                   kept_bytes=self.catalog.usage(tenant.id))

    def lease(self, image: str, holder: str) -> None:
        """Keep `image` from gc while `holder` (a container id) lives in this process."""
        self.catalog.lease(holder, image)

    def release(self, holder: str) -> None:
        self.catalog.release(holder)

    # import

    async def import_tar(self, src: Path | BinaryIO, reference: str, *, tenant: Tenant,
                         cmd: Sequence[str] | None = None,
                         entrypoint: Sequence[str] | None = None,
                         env: Mapping[str, str] | None = None, working_dir: str | None = None,
                         user: str | None = None) -> Image:
        """A root-filesystem tar (plain, gzip or zstd) as a one-layer image of `tenant`, as
        `docker import` makes."""
        ref = _tag_reference(reference)
        ns = self._writable(tenant, ref, "reference")
        async with self._writing():
            with self._pins.holding() as pin:
                if isinstance(src, Path):
                    with open(src, "rb") as f:
                        layer_digest, size = await asyncio.to_thread(self.blobs.put_stream, f,
                                                                     on_digest=pin)
                else:
                    layer_digest, size = await asyncio.to_thread(self.blobs.put_stream, src,
                                                                 on_digest=pin)
                path = self.blobs.path(layer_digest)
                with open(path, "rb") as f:
                    kind = detect_compression(f.read(8))
                media_type = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}.get(kind, OCI_LAYER)
                self._check_quota(tenant, [(layer_digest, size)])
                diff_id, _, rep = await self.layers.add(path, on_digest=pin)
                digest = self._add_layer_image(
                    ns, tenant, ref, (), LayerRecord(diff_id, layer_digest, media_type, size),
                    rep, str(self.platform),
                    lambda diff_ids: build_config(diff_ids=diff_ids, cmd=cmd,
                                                  entrypoint=entrypoint, env=env,
                                                  working_dir=working_dir, user=user,
                                                  history_comment="imported"))
        return await self._image(digest, tenant)

    def _add_layer_image(self, ns: str, tenant: Tenant, ref: Reference | None,
                         below: Sequence[LayerRecord], layer: LayerRecord | None,
                         report: UnpackReport | None, platform: str,
                         make_config: Callable[[list[str]], bytes], *,
                         holder: str | None = None) -> str:
        """The image of the layers `below` (a base's, lowest first; none for an import) and
        `layer` (its blob in the store and unpacked, pinned by the caller; None: no new
        layer), with the config `make_config(diff_ids)`, recorded, named `ref` in `ns` (if
        given) and leased to `holder` (if given); returns its digest.

        The tenant sent the new layer and holds `below`'s image: it holds all of the new
        one. Within its byte quota, or QuotaExceeded and no name."""
        layers = (*(dataclasses.replace(lr, media_type=_oci_layer_type(lr.media_type))
                    for lr in below), *((layer,) if layer is not None else ()))
        if layer is not None and report is not None:
            self.catalog.record_layer(layer.diff_id, report.bytes, report.entries)
        config = make_config([lr.diff_id for lr in layers])
        with self._pins.holding() as pin:
            config_digest = self.blobs.put_bytes(config, on_digest=pin)
            manifest = build_oci_manifest(Descriptor(OCI_CONFIG, config_digest, len(config)),
                                          [Descriptor(lr.media_type, lr.blob, lr.size)
                                           for lr in layers])
            digest = self.blobs.put_bytes(manifest, on_digest=pin)
            now = time.time()
            self.catalog.add_image(ImageRecord(
                digest, OCI_MANIFEST, config_digest, platform,
                len(config) + sum(lr.size for lr in layers), now, now, layers))
            self.catalog.hold(ns, config_digest, *(lr.blob for lr in layers),
                              *(lr.diff_id for lr in layers))
            if holder is not None:
                self.catalog.lease(holder, digest)
            self._check_quota(tenant, [], image=digest)
            if ref is not None:
                self.catalog.set_name(ns, str(ref), ref.repository, ref.tag, digest, digest)
        return digest

    # build steps (sandbox/engine/builder.py runs them)

    def build_base(self, base: Image, tenant: Tenant) -> tuple[tuple[LayerRecord, ...],
                                                               ImageConfig]:
        """The layers and config of `base`, an image `tenant` may build on."""
        rec = self._base_record(base, tenant)
        return rec.layers, parse_config(self.blobs.read(rec.config, CONFIG_MAX))

    def tree(self, layers: Sequence[LayerRecord]) -> MergedTree:
        """The merged tree of `layers` (lowest first), as a container of them sees it."""
        return MergedTree([self.layers.path(lr.diff_id) for lr in layers],
                          self.layers.ownership)

    def layers_of(self, image: Image) -> tuple[LayerRecord, ...]:
        rec = self.catalog.image(image.digest)
        if rec is None:
            raise NotFound(f"image {image.digest} is no longer in the store: build again")
        return rec.layers

    def check_tags(self, tags: Sequence[str], tenant: Tenant,
                   field: str = "tag") -> list[Reference]:
        """Names a build may give its image: tags of the tenant's own (not public names)."""
        return [self._check_tag(tag, tenant, field) for tag in tags]

    def _check_tag(self, tag: str, tenant: Tenant, field: str) -> Reference:
        try:
            ref = _tag_reference(tag)
        except InvalidReference as e:
            raise InvalidReference(f"{field}: {e}") from None
        self._writable(tenant, ref, field)
        return ref

    async def cached_step(self, tenant: Tenant, key: str, holder: str) -> Image | None:
        """The image `tenant`'s build step `key` made, if cached and complete, leased to
        `holder` (until `release(holder)`)."""
        digest = self.catalog.cache_get(tenant.id, key)
        if digest is None or not self._complete(digest):
            return None
        self.catalog.lease(holder, digest)
        try:
            return await self._image(digest, tenant)
        except NotFound:  # pruned meanwhile
            self.catalog.release(holder)
            return None

    async def build_step(self, tenant: Tenant, holder: str, below: Sequence[LayerRecord],
                         layer: AsyncIterator[bytes] | None,
                         make_config: Callable[[list[str]], bytes], platform: str, *,
                         key: str | None = None, names: Sequence[Reference] = ()) -> Image:
        """An image of `tenant`: the layers `below` and `layer` (a tar stream, as a commit
        takes it; None: no new layer), the config `make_config(diff_ids)`; unnamed but
        leased to `holder` until released, cached as the step `key` and named `names` when
        given. LayerError for a malformed tar, QuotaExceeded over the tenant's quota."""
        if layer is not None and len(below) >= MAX_LAYERS:
            raise ImageError(f"the image would have more than {MAX_LAYERS} layers: merge "
                             "steps (one RUN with &&, one COPY of a directory)")
        async with self._writing():
            with (self._pins.hold(*(lr.blob for lr in below), *(lr.diff_id for lr in below)),
                  self._pins.holding() as pin):
                new = report = None
                if layer is not None:
                    taken = await take_layer(layer, self.blobs, self.layers, on_digest=pin)
                    new = LayerRecord(taken.diff_id, taken.blob, OCI_LAYER_GZIP, taken.size)
                    report = taken.report
                digest = self._add_layer_image(tenant.id, tenant, None, below, new, report,
                                               platform, make_config, holder=holder)
                if key is not None:
                    self.catalog.cache_put(tenant.id, key, digest)
                for ref in names:
                    self.catalog.set_name(tenant.id, str(ref), ref.repository, ref.tag, digest,
                                          digest)
        return await self._image(digest, tenant)

    def name(self, image: Image, names: Sequence[Reference], tenant: Tenant) -> Image:
        """`image` (the tenant's) also named `names` (from check_tags)."""
        self._check_quota(tenant, [], image=image.digest)
        for ref in names:
            self.catalog.set_name(tenant.id, str(ref), ref.repository, ref.tag, image.digest,
                                  image.digest)
        return dataclasses.replace(image, names=self._names(image.digest, tenant))

    def prune_build_cache(self, tenant: Tenant) -> tuple[int, gc.GcReport]:
        """Forget `tenant`'s build cache, then collect what nothing else keeps."""
        removed = self.catalog.cache_clear(tenant.id)
        return removed, self._collect()

    # commit

    async def commit(self, base: Image, layer: AsyncIterator[bytes], reference: str, *,
                     tenant: Tenant, changes: Sequence[str] = (), message: str = "",
                     author: str = "") -> Image:
        """A new image of `tenant`: `base`'s layers and `layer` on top (a container's
        changes as an uncompressed tar stream: whiteouts for deletions, opaque markers for
        replaced directories), named `reference`, as `docker commit` makes it.

        `changes` are what `docker commit --change` takes (changes.py), applied to `base`'s
        config; `message` and `author` go into the new history entry (and `author` is the
        image's). Everything but the layer is checked before the stream is read: a bad
        change (ImageError naming `changes[i]`), a public `reference` (Forbidden), a base
        the tenant cannot use (NotFound), a quota the base alone would exceed. The layer is
        unpacked with the store's rules (LayerError: the tar is malformed or hostile). On an
        error the stream is left where it stopped: closing it is the caller's.
        """
        ref = _tag_reference(reference)
        ns = self._writable(tenant, ref, "reference")
        rec = self._base_record(base, tenant)
        for field, value in (("message", message), ("author", author)):
            if not isinstance(value, str):
                raise ImageError(f"{field}: expected a string, not {type(value).__name__}")
        if len(rec.layers) >= MAX_LAYERS:
            raise ImageError(f"the base image has {len(rec.layers)} layers, the most an image "
                             "may have; commit a container of an image with fewer layers")
        config = parse_config(self.blobs.read(rec.config, CONFIG_MAX))  # the store's own
        run = apply_changes(config.raw.get("config"), parse_changes(changes))
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        def make_config(diff_ids: list[str]) -> bytes:
            return build_config(diff_ids=diff_ids, base=config, run=run, created=created,
                                history_comment=message, created_by="sandboxd commit",
                                author=author)

        # A config that would be refused (too large) is refused before the stream is read.
        make_config([*config.diff_ids, digests.of_bytes(b"")])
        self._check_quota(tenant, [], image=rec.digest)
        async with self._writing():
            with (self._pins.hold(*(lr.blob for lr in rec.layers),
                                  *(lr.diff_id for lr in rec.layers)),
                  self._pins.holding() as pin):
                taken = await take_layer(layer, self.blobs, self.layers, on_digest=pin)
                digest = self._add_layer_image(
                    ns, tenant, ref, rec.layers,
                    LayerRecord(taken.diff_id, taken.blob, OCI_LAYER_GZIP, taken.size),
                    taken.report, rec.platform, make_config)
        return await self._image(digest, tenant)

    def _base_record(self, base: Image, tenant: Tenant) -> ImageRecord:
        """`base`'s record, if `tenant` may build on it: a public image, or one whose
        content it holds (its own, even if no name of its own is left)."""
        rec = self.catalog.image(base.digest)
        if rec is None:
            raise NotFound(f"image {base.digest} is no longer in the store: pull it again, "
                           "then commit a container of it")
        public = bool(self.catalog.names((PUBLIC,), image=rec.digest))
        if not public and not all(self.catalog.holds(tenant.id, d)
                                  for d in (rec.config, *(lr.diff_id for lr in rec.layers))):
            raise NotFound(f"no image {base.digest} among your images: pull it by name first")
        return rec

    async def import_layout(self, layout: Path, reference: str, *, tenant: Tenant,
                            name: str | None = None, platform: Platform | None = None,
                            on_progress: ProgressCallback | None = None) -> Image:
        """An OCI image layout directory (as umoci and `skopeo copy … oci:DIR` write) as a
        tagged image of `tenant`. `name` picks the index entry by its ref.name annotation."""
        ref = _tag_reference(reference)
        ns = self._writable(tenant, ref, "reference")
        report = on_progress or _no_progress
        index_body = _read_layout_file(layout / "index.json", INDEX_JSON_MAX)
        doc = parse_manifest(index_body, OCI_INDEX)
        if not isinstance(doc, ImageIndex):
            raise ManifestError(f"{layout}/index.json is not an image index")
        entries = [d for d in doc.manifests
                   if name is None
                   or d.annotations.get("org.opencontainers.image.ref.name") == name]
        if not entries:
            raise NotFound(f"{layout}: no index entry named {name!r}")
        desc = entries[0] if len(entries) == 1 else select_platform(
            ImageIndex(doc.media_type, tuple(entries), {}), platform or self.platform)

        def copy_in(d: Descriptor) -> Path:
            # Always read from the layout, even for a blob the store has: that is what
            # proves the caller holds it.
            with _open_layout_blob(layout, d.digest) as f:
                self.blobs.put_stream(f, expected=d.digest, expected_size=d.size)
            self.catalog.hold(ns, d.digest)
            return self.blobs.path(d.digest)

        async def fetch(d: Descriptor) -> Path:
            return await asyncio.to_thread(copy_in, d)

        body = _read_layout_file(_layout_blob(layout, desc.digest), MANIFEST_MAX)
        if digests.of_bytes(body) != desc.digest:
            raise ManifestError(f"{layout}: blob {desc.digest} does not match its digest")
        async with self._writing():
            with self._pins.holding() as pin:  # the manifests, until the image is named
                self.blobs.put_bytes(body, expected=desc.digest, on_digest=pin)
                digest, manifest, media_type = desc.digest, None, desc.media_type
                for _ in range(MAX_INDEX_DEPTH + 1):
                    parsed = parse_manifest(body, media_type)
                    if isinstance(parsed, ImageManifest):
                        manifest = parsed
                        break
                    child = select_platform(parsed, platform or self.platform)
                    body = _read_layout_file(_layout_blob(layout, child.digest), MANIFEST_MAX)
                    self.blobs.put_bytes(body, expected=child.digest, on_digest=pin)
                    digest, media_type = child.digest, child.media_type
                if manifest is None:
                    raise ManifestError(f"{layout}: indexes nest more than {MAX_INDEX_DEPTH} "
                                        "deep")
                image = await self._install(ns, tenant, digest, media_type, manifest, fetch,
                                            report, name=(ref, ref.tag, digest))
        return await self._image(image, tenant)

    # push

    async def push(self, source: str, target: str | None = None, *, tenant: Tenant,
                   on_progress: ProgressCallback | None = None) -> str:
        """Push an image `tenant` names (or a public one) to a registry; returns the manifest
        digest the registry has. Cross-repository mounts are tried only from repositories
        this tenant pulled the blob from or pushed it to."""
        report = on_progress or _no_progress
        digest = self._lookup(source, tenant)
        rec = self.catalog.image(digest)
        assert rec is not None
        dest = parse(target if target is not None else source)
        if dest.digest is not None and dest.digest != digest:
            raise InvalidReference(f"target {target!r} names digest {dest.digest}, but the "
                                   f"image is {digest}; push to a tag instead")
        blobs = [(lr.blob, lr.size) for lr in rec.layers]
        config_size = self.blobs.size(rec.config)
        blobs.append((rec.config, config_size))

        async def push_blob(blob: str, size: int) -> None:
            if not self.blobs.has(blob):
                raise NotFound(f"blob {blob} of {source} is no longer in the store; pull the "
                               "image again before pushing it")
            async with self._parallel:
                if await self.client.blob_exists(dest, blob):
                    report(PullProgress(blob, "exists", size, size))
                else:
                    mounted = False
                    for repo in self.catalog.sources(tenant.id, blob):
                        domain, _, path = repo.partition("/")
                        if domain == dest.domain and path != dest.path:
                            mounted = await self.client.mount_blob(dest, blob, path)
                            if mounted:
                                report(PullProgress(blob, "mounted", size, size))
                                break
                    if not mounted:
                        await self.client.upload_blob(dest, blob, size, self.blobs.path(blob))
                        report(PullProgress(blob, "pushed", size, size))
            self.catalog.add_source(tenant.id, blob, dest.repository)

        await asyncio.gather(*(push_blob(b, s) for b, s in blobs))
        body = self.blobs.read(digest, MANIFEST_MAX)
        pushed = await self.client.put_manifest(dest, rec.media_type, body)
        if pushed != digest:
            raise ManifestError(f"the registry stored the manifest as {pushed}, not {digest}")
        if dest.digest is None and not self.public.covers(dest):
            self.catalog.set_name(tenant.id, str(dest), dest.repository, dest.tag, digest,
                                  digest)
        return digest


def _tag_reference(reference: str) -> Reference:
    ref = parse(reference)
    if ref.digest is not None:
        raise InvalidReference(f"{reference!r}: a new image is named by a tag, not a digest "
                               "(its digest is computed)")
    return ref


# A base's layers keep their blobs in a manifest we write, which is OCI: Docker's media types
# become their OCI equivalents (the same tar, gzip or zstd bytes).
_OCI_LAYER_TYPES = {
    DOCKER_LAYER: OCI_LAYER, DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_ZSTD: OCI_LAYER_ZSTD, DOCKER_FOREIGN: OCI_LAYER_ND,
    DOCKER_FOREIGN_GZIP: OCI_LAYER_ND_GZIP,
}


def _oci_layer_type(media_type: str) -> str:
    return _OCI_LAYER_TYPES.get(media_type, media_type)


def _platform_of(config: ImageConfig) -> str:
    return "/".join(p for p in (config.os, config.architecture, config.variant) if p)


def _layout_blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digests.hex_part(digest)


def _open_layout_blob(layout: Path, digest: str) -> BinaryIO:
    # A layout is input like a registry: a blob that is a symlink is refused, not followed.
    try:
        fd = os.open(_layout_blob(layout, digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{layout}: blob {digest} is missing from the layout") from None
    except OSError as e:
        raise ManifestError(f"{layout}: blob {digest} cannot be read: {e.strerror}") from None
    return os.fdopen(fd, "rb")


def _read_layout_file(path: Path, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist: is this an OCI image layout?") from None
    except OSError as e:
        raise ManifestError(f"{path} cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ManifestError(f"{path} is over {limit} bytes")
    return data
