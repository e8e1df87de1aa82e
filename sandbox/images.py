"""The image API the service uses: pull, resolve, list, inspect, tag, remove, import, push
and gc, over a registry client and a store under the state directory.

    state_dir/images/blobs/sha256/<hex>     verified blobs (manifests, configs, layer tars)
    state_dir/images/layers/sha256/<hex>    unpacked layers, by diff_id (overlay lower dirs)
    state_dir/images/catalog.db             names, images, layers, leases (SQLite)

An `Image` carries what a container needs: its layer directories (lowest first) and the
run defaults of its config (argv, env, cwd, user).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from sandbox import digests
from sandbox.errors import ImageInUse, InvalidReference, ManifestError, NotFound
from sandbox.imageconfig import (
    MAX_ACCOUNT_FILE_BYTES,
    ImageConfig,
    RunDefaults,
    build_config,
    chain_ids,
    parse_config,
    resolve_user,
    run_defaults,
)
from sandbox.manifest import (
    MAX_INDEX_DEPTH,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    build_oci_manifest,
    parse_manifest,
    select_platform,
)
from sandbox.reference import Reference, parse
from sandbox.registry.client import RegistryClient
from sandbox.registry.config import RegistriesConfig
from sandbox.store import gc
from sandbox.store.blobs import BlobStore
from sandbox.store.catalog import Catalog, ImageRecord, LayerRecord
from sandbox.store.layers import LayerStore
from sandbox.store.peek import read_from_layers
from sandbox.store.unpack import Ownership, UnpackLimits, detect_compression

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
    def __init__(self, state_dir: Path, *, registries: RegistriesConfig | None = None,
                 ownership: Ownership | None = None, platform: Platform | None = None,
                 overlay: bool = True, unpack_limits: UnpackLimits | None = None,
                 client: RegistryClient | None = None, parallel_layers: int = 4) -> None:
        root = state_dir / "images"
        root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(root / "blobs")
        self.layers = LayerStore(root / "layers", ownership=ownership or Ownership("squash"),
                                 limits=unpack_limits)
        self.catalog = Catalog(root / "catalog.db")
        self.client = client or RegistryClient(registries)
        self.platform = platform or Platform.host()
        self.overlay = overlay
        self._parallel = asyncio.Semaphore(parallel_layers)
        self._resolved: dict[str, tuple[int, Image]] = {}
        self.blobs.clean_temps()
        self.layers.clean_temps()

    async def close(self) -> None:
        await self.client.close()
        self.catalog.close()

    async def __aenter__(self) -> ImageService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # pull

    async def pull(self, reference: str, *, platform: Platform | None = None,
                   on_progress: ProgressCallback | None = None) -> Image:
        """Fetch an image (or find it up to date) and record its name."""
        ref = parse(reference)
        want = platform or self.platform
        report = on_progress or _no_progress
        name = str(ref)
        if ref.digest is not None:
            known = self._known_target(ref.digest, want)
            if known is not None:  # content-addressed: nothing to ask the registry
                self.catalog.set_name(name, ref.repository, None, ref.digest, known)
                report(PullProgress("", "up to date"))
                return await self._image(known)
        else:
            head = await self.client.head_manifest(ref)
            if head is not None and head.digest is not None:
                known = self._known_target(head.digest, want)
                if known is not None:
                    self.catalog.set_name(name, ref.repository, ref.tag, head.digest, known)
                    report(PullProgress("", "up to date"))
                    return await self._image(known)
            elif head is None:
                raise NotFound(f"{ref.familiar()} was not found in {ref.domain}: check the "
                               "name and tag, and that you may pull it")
        report(PullProgress("", "resolving"))
        fetched = await self.client.get_manifest(ref)
        target = fetched.digest
        self.blobs.put_bytes(fetched.body, expected=target)
        digest, manifest, media_type = await self._platform_manifest(
            ref, fetched.body, fetched.media_type, target, want)

        async def fetch(desc: Descriptor) -> Path:
            async def download(dest: Path) -> None:
                def progress(done: int) -> None:
                    report(PullProgress(desc.digest, "downloading", done, desc.size))
                await self.client.fetch_blob(ref, desc.digest, desc.size, dest,
                                             on_progress=progress, urls=desc.urls)
            path, _ = await self.blobs.ensure(desc.digest, download)
            self.catalog.add_source(desc.digest, ref.repository)
            return path

        image = await self._install(digest, media_type, manifest, fetch, report)
        self.catalog.set_name(name, ref.repository, None if ref.digest else ref.tag, target,
                              image)
        return await self._image(image)

    def _known_target(self, target: str, want: Platform | None = None) -> str | None:
        """The complete local image a registry digest stands for: the image itself, or the
        image an index of that digest was resolved to for this platform."""
        if self._complete(target):
            return target
        for rec in self.catalog.names():
            if rec.target != target or not self._complete(rec.image):
                continue
            image = self.catalog.image(rec.image)
            if image is not None and (want is None or image.platform.split("/")[:2]
                                      == [want.os, want.architecture]):
                return rec.image
        return None

    def _complete(self, digest: str) -> bool:
        rec = self.catalog.image(digest)
        return rec is not None and all(self.layers.has(lr.diff_id) for lr in rec.layers)

    async def _platform_manifest(self, ref: Reference, body: bytes, media_type: str,
                                 digest: str, want: Platform
                                 ) -> tuple[str, ImageManifest, str]:
        """Walk an index (nested at most MAX_INDEX_DEPTH deep) down to one image manifest."""
        for _ in range(MAX_INDEX_DEPTH + 1):
            doc = parse_manifest(body, media_type)
            if isinstance(doc, ImageManifest):
                return digest, doc, media_type
            desc = select_platform(doc, want)
            if desc.size > MANIFEST_MAX:
                raise ManifestError(f"{ref.familiar()}: the manifest for {want} claims "
                                    f"{desc.size} bytes, over the {MANIFEST_MAX} byte cap")
            child = await self.client.get_manifest(ref.with_digest(desc.digest))
            if len(child.body) != desc.size:
                raise ManifestError(f"{ref.familiar()}: the index says {desc.digest} is "
                                    f"{desc.size} bytes, the registry served "
                                    f"{len(child.body)}")
            body, media_type, digest = child.body, child.media_type, child.digest
            self.blobs.put_bytes(body, expected=digest)
        raise ManifestError(f"{ref.familiar()}: indexes nest more than {MAX_INDEX_DEPTH} "
                            "deep; refusing to follow further")

    async def _install(self, digest: str, media_type: str, manifest: ImageManifest,
                       fetch: Callable[[Descriptor], Awaitable[Path]],
                       report: ProgressCallback) -> str:
        """Config and layers of a verified manifest into the store; returns its digest."""
        if manifest.config.size > CONFIG_MAX:
            raise ManifestError(f"image config {manifest.config.digest} claims "
                                f"{manifest.config.size} bytes, over the {CONFIG_MAX} cap")
        await fetch(manifest.config)
        config = parse_config(self.blobs.read(manifest.config.digest, CONFIG_MAX))
        if len(config.diff_ids) != len(manifest.layers):
            raise ManifestError(f"image {digest}: the manifest lists {len(manifest.layers)} "
                                f"layers, its config {len(config.diff_ids)} diff_ids")

        async def one(desc: Descriptor, diff_id: str) -> None:
            if self.layers.has(diff_id):
                report(PullProgress(desc.digest, "cached", desc.size, desc.size))
                return
            async with self._parallel:
                async def blob() -> Path:
                    return await fetch(desc)
                _, rep = await self.layers.ensure(diff_id, blob)
                if rep is not None:
                    self.catalog.record_layer(diff_id, rep.bytes, rep.entries)
                report(PullProgress(desc.digest, "done", desc.size, desc.size))

        await asyncio.gather(*(one(d, i) for d, i in zip(manifest.layers, config.diff_ids,
                                                          strict=True)))
        now = time.time()
        self.catalog.add_image(ImageRecord(
            digest, media_type, manifest.config.digest, _platform_of(config),
            manifest.config.size + sum(d.size for d in manifest.layers), now, now,
            tuple(LayerRecord(i, d.digest, d.media_type, d.size)
                  for d, i in zip(manifest.layers, config.diff_ids, strict=True))))
        return digest

    # local lookups

    def _lookup(self, reference: str) -> str:
        """The image digest a name, a digest or a config digest stands for, locally."""
        text = reference.strip()
        if digests.is_digest(text):
            if self.catalog.image(text) is not None:
                return text
            rec = self.catalog.image_by_config(text)
            if rec is not None:
                return rec.digest
            raise NotFound(f"no image {text} in the store")
        ref = parse(text)
        found = self.catalog.lookup(str(ref))
        if found is None and ref.digest is not None:
            known = self._known_target(ref.digest)
            if known is not None:
                return known
        if found is None:
            raise NotFound(f"image {ref.familiar()} is not in the store: pull it first")
        return found.image

    async def resolve(self, reference: str) -> Image:
        """A local image by name or digest, without asking any registry.

        Every warm run starts here, so an answer is kept until the catalog next changes
        (a pull, tag, import, remove or gc of this process)."""
        cached = self._resolved.get(reference)
        if cached is not None and cached[0] == self.catalog.generation:
            return cached[1]
        image = await self._image(self._lookup(reference))
        self._resolved[reference] = (self.catalog.generation, image)
        return image

    async def _image(self, digest: str) -> Image:
        rec = self.catalog.image(digest)
        if rec is None or not self._complete(digest):
            raise NotFound(f"image {digest} is not complete in the store: pull it again")
        config = parse_config(self.blobs.read(rec.config, CONFIG_MAX))
        self.catalog.touch(digest)
        if self.overlay:
            layers = tuple(self.layers.path(lr.diff_id) for lr in rec.layers)
        else:
            top = chain_ids([lr.diff_id for lr in rec.layers])[-1]
            layers = (await self.layers.ensure_flat(
                top, [self.blobs.path(lr.blob) for lr in rec.layers]),)
        return Image(digest, rec.config, config, rec.platform, rec.size, layers,
                     run_defaults(config), tuple(n.name for n in self.catalog.names(digest)))

    def user_ids(self, image: Image, user: str | None = None) -> tuple[int | None, int | None]:
        """The (uid, gid) a run of `image` uses: `user` if given, else the config's User,
        names looked up in the image's own /etc/passwd and /etc/group; (None, None) means
        the runtime's default."""
        def read(path: str) -> bytes | None:
            return read_from_layers(image.layers, path, MAX_ACCOUNT_FILE_BYTES + 1)
        return resolve_user(image.defaults.user if user is None else user, read)

    def list(self) -> list[ImageSummary]:
        return [ImageSummary(rec.digest, rec.config,
                             tuple(n.name for n in self.catalog.names(rec.digest)),
                             rec.platform, rec.size, rec.created, rec.last_used)
                for rec in self.catalog.images()]

    def inspect(self, reference: str) -> dict[str, Any]:
        digest = self._lookup(reference)
        rec = self.catalog.image(digest)
        assert rec is not None
        config = orjson.loads(self.blobs.read(rec.config, CONFIG_MAX))
        return {
            "digest": rec.digest, "media_type": rec.media_type, "config_digest": rec.config,
            "platform": rec.platform, "size": rec.size, "created": rec.created,
            "last_used": rec.last_used,
            "names": [n.name for n in self.catalog.names(digest)],
            "layers": [{"digest": lr.blob, "diff_id": lr.diff_id, "media_type": lr.media_type,
                        "size": lr.size, "unpacked_bytes": self.catalog.layer_bytes(lr.diff_id)}
                       for lr in rec.layers],
            "config": config,
        }

    def tag(self, source: str, target: str) -> str:
        digest = self._lookup(source)
        ref = parse(target)
        if ref.digest is not None:
            raise InvalidReference(f"target {target!r}: a tag cannot carry a digest; "
                                   "write it as name:tag")
        self.catalog.set_name(str(ref), ref.repository, ref.tag, digest, digest)
        return str(ref)

    def remove(self, reference: str, *, force: bool = False) -> list[str]:
        """Untag a name, or remove an image by digest with all its names; the image's files
        go once nothing names it. An image a container uses is refused unless `force`, which
        removes its names and leaves its files to gc once the container is gone."""
        text = reference.strip()
        if digests.is_digest(text):
            digest = self._lookup(text)
            names = [n.name for n in self.catalog.names(digest)]
        else:
            ref = parse(text)
            found = self.catalog.lookup(str(ref))
            if found is None:
                raise NotFound(f"image {ref.familiar()} is not in the store")
            digest, names = found.image, [found.name]
        remaining = {n.name for n in self.catalog.names(digest)} - set(names)
        in_use = digest in self.catalog.leased()
        if not remaining and in_use and not force:
            raise ImageInUse(f"image {digest} is used by a running container; stop the "
                             "container first or remove with force")
        for name in names:
            self.catalog.remove_name(name)
        # Forced while in use: the names go now, the files once no container uses them (gc).
        if not remaining and not in_use:
            self.catalog.remove_image(digest)
            self._sweep()
        return names

    def _sweep(self) -> None:
        gc.collect(self.catalog, self.blobs, self.layers, budget_bytes=sys.maxsize)

    def gc(self, budget_bytes: int = 0) -> gc.GcReport:
        report = gc.collect(self.catalog, self.blobs, self.layers, budget_bytes)
        keep = {chain_ids([lr.diff_id for lr in rec.layers])[-1]
                for rec in self.catalog.images() if rec.layers}
        for entry in self.layers.flat.iterdir():
            if "sha256:" + entry.name not in keep:
                self.layers.remove_flat("sha256:" + entry.name)
        return report

    def lease(self, image: str, holder: str) -> None:
        """Keep `image` from gc while `holder` (a container id) lives in this process."""
        self.catalog.lease(holder, image)

    def release(self, holder: str) -> None:
        self.catalog.release(holder)

    # import

    async def import_tar(self, src: Path | BinaryIO, reference: str, *,
                         cmd: Sequence[str] | None = None,
                         entrypoint: Sequence[str] | None = None,
                         env: Mapping[str, str] | None = None, working_dir: str | None = None,
                         user: str | None = None) -> Image:
        """A root-filesystem tar (plain, gzip or zstd) as a one-layer image, as
        `docker import` makes."""
        ref = _tag_reference(reference)
        if isinstance(src, Path):
            with open(src, "rb") as f:
                layer_digest, size = await asyncio.to_thread(self.blobs.put_stream, f)
        else:
            layer_digest, size = await asyncio.to_thread(self.blobs.put_stream, src)
        path = self.blobs.path(layer_digest)
        with open(path, "rb") as f:
            kind = detect_compression(f.read(8))
        media_type = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}.get(kind, OCI_LAYER)
        diff_id, _, rep = await self.layers.add(path)
        self.catalog.record_layer(diff_id, rep.bytes, rep.entries)
        config = build_config(diff_ids=[diff_id], cmd=cmd, entrypoint=entrypoint, env=env,
                              working_dir=working_dir, user=user, history_comment="imported")
        config_digest = self.blobs.put_bytes(config)
        manifest = build_oci_manifest(Descriptor(OCI_CONFIG, config_digest, len(config)),
                                      [Descriptor(media_type, layer_digest, size)])
        digest = self.blobs.put_bytes(manifest)
        now = time.time()
        self.catalog.add_image(ImageRecord(
            digest, OCI_MANIFEST, config_digest, str(self.platform), len(config) + size, now,
            now, (LayerRecord(diff_id, layer_digest, media_type, size),)))
        self.catalog.set_name(str(ref), ref.repository, ref.tag, digest, digest)
        return await self._image(digest)

    async def import_layout(self, layout: Path, reference: str, *, name: str | None = None,
                            platform: Platform | None = None,
                            on_progress: ProgressCallback | None = None) -> Image:
        """An OCI image layout directory (as umoci and `skopeo copy … oci:DIR` write) as a
        tagged image. `name` picks the index entry by its ref.name annotation."""
        ref = _tag_reference(reference)
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
            with _open_layout_blob(layout, d.digest) as f:
                self.blobs.put_stream(f, expected=d.digest, expected_size=d.size)
            return self.blobs.path(d.digest)

        body = _read_layout_file(_layout_blob(layout, desc.digest), MANIFEST_MAX)
        if digests.of_bytes(body) != desc.digest:
            raise ManifestError(f"{layout}: blob {desc.digest} does not match its digest")
        self.blobs.put_bytes(body, expected=desc.digest)
        digest, manifest, media_type = desc.digest, None, desc.media_type
        for _ in range(MAX_INDEX_DEPTH + 1):
            parsed = parse_manifest(body, media_type)
            if isinstance(parsed, ImageManifest):
                manifest = parsed
                break
            child = select_platform(parsed, platform or self.platform)
            body = _read_layout_file(_layout_blob(layout, child.digest), MANIFEST_MAX)
            self.blobs.put_bytes(body, expected=child.digest)
            digest, media_type = child.digest, child.media_type
        if manifest is None:
            raise ManifestError(f"{layout}: indexes nest more than {MAX_INDEX_DEPTH} deep")

        async def fetch(d: Descriptor) -> Path:
            if self.blobs.has(d.digest):
                return self.blobs.path(d.digest)
            return await asyncio.to_thread(copy_in, d)

        image = await self._install(digest, media_type, manifest, fetch, report)
        self.catalog.set_name(str(ref), ref.repository, ref.tag, digest, image)
        return await self._image(image)

    # push

    async def push(self, source: str, target: str | None = None, *,
                   on_progress: ProgressCallback | None = None) -> str:
        """Push a local image to a registry; returns the manifest digest the registry has."""
        report = on_progress or _no_progress
        digest = self._lookup(source)
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
                    for repo in self.catalog.sources(blob):
                        domain, _, path = repo.partition("/")
                        if domain == dest.domain and path != dest.path:
                            mounted = await self.client.mount_blob(dest, blob, path)
                            if mounted:
                                report(PullProgress(blob, "mounted", size, size))
                                break
                    if not mounted:
                        await self.client.upload_blob(dest, blob, size, self.blobs.path(blob))
                        report(PullProgress(blob, "pushed", size, size))
            self.catalog.add_source(blob, dest.repository)

        await asyncio.gather(*(push_blob(b, s) for b, s in blobs))
        body = self.blobs.read(digest, MANIFEST_MAX)
        pushed = await self.client.put_manifest(dest, rec.media_type, body)
        if pushed != digest:
            raise ManifestError(f"the registry stored the manifest as {pushed}, not {digest}")
        if dest.digest is None:
            self.catalog.set_name(str(dest), dest.repository, dest.tag, digest, digest)
        return digest


def _tag_reference(reference: str) -> Reference:
    ref = parse(reference)
    if ref.digest is not None:
        raise InvalidReference(f"{reference!r}: an imported image is named by a tag, not a "
                               "digest (its digest is computed)")
    return ref


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
