"""OCI and Docker schema 2 manifests, indexes (manifest lists), descriptors and platforms.

Every body is hostile: sizes, types, digests and media types are checked before anything
else reads them, and a body must be unambiguously a manifest or an index (CVE-2021-41190).
"""

from __future__ import annotations

import platform as _host
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from sandbox.errors import ImageError, InvalidReference, ManifestError, NotFound
from sandbox.images import digests
from sandbox.images.store.unpack import UnpackLimits

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# Without a full Accept list registries fall back to schema 1 (content-negotiation.md).
MANIFEST_ACCEPT: tuple[str, ...] = (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
_GZIP_LAYERS = frozenset({OCI_LAYER_GZIP, OCI_LAYER_ND_GZIP, DOCKER_LAYER_GZIP,
                          DOCKER_FOREIGN_GZIP})
_ZSTD_LAYERS = frozenset({OCI_LAYER_ZSTD, OCI_LAYER_ND_ZSTD, DOCKER_LAYER_ZSTD})
_PLAIN_LAYERS = frozenset({OCI_LAYER, OCI_LAYER_ND, DOCKER_LAYER, DOCKER_FOREIGN})
LAYER_TYPES = _GZIP_LAYERS | _ZSTD_LAYERS | _PLAIN_LAYERS
_SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
# Content-Types that say nothing: the body's own mediaType (or its shape) decides.
_GENERIC_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # containers/image's limit; registries accept >= 4 MB
MAX_LAYERS = 1000
MAX_INDEX_ENTRIES = 10000
# The largest blob a descriptor may claim, unless configured otherwise: the most a layer may
# unpack to. A compressed layer is smaller than its files, so a larger one could only fail at
# unpack, after its whole download; it is refused before anything is fetched instead.
MAX_BLOB_BYTES = UnpackLimits().max_bytes
MAX_INDEX_DEPTH = 4  # nested indexes the caller follows before giving up

_ATTESTATION_KEY = "vnd.docker.reference.type"
_PLATFORM_WORD = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_URL = re.compile(r"https?://[^\s]+", re.IGNORECASE)

_MACHINE_TO_GOARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"), "armv5tejl": ("arm", "v5"),
    "i386": ("386", None), "i486": ("386", None), "i586": ("386", None),
    "i686": ("386", None), "ppc64le": ("ppc64le", None), "ppc64": ("ppc64", None),
    "s390x": ("s390x", None), "riscv64": ("riscv64", None), "mips64": ("mips64le", None),
    "loongarch64": ("loong64", None),
}
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}
# Variants an architecture can run, most capable first (containers/image platform_matcher.go;
# amd64 micro-architecture levels as containerd orders them).
_VARIANT_ORDER = {"arm": ("v8", "v7", "v6", "v5"), "arm64": ("v8",),
                  "amd64": ("v4", "v3", "v2", "v1")}
# The variant every machine of an architecture has: equivalent to "no variant".
_BASE_VARIANT = {"arm64": "v8", "amd64": "v1"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def host(cls) -> Platform:
        """This machine as Go names it (GOOS/GOARCH/variant)."""
        machine = _host.machine().lower()
        arch, variant = _MACHINE_TO_GOARCH.get(machine, (machine, None))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/arch[/variant]`, e.g. `linux/arm64/v8`; `x86_64` and `aarch64` are accepted."""
        parts = text.strip().lower().split("/") if isinstance(text, str) else []
        if not 2 <= len(parts) <= 3 or not all(_PLATFORM_WORD.fullmatch(p) for p in parts):
            raise ImageError(f"platform {str(text)[:100]!r} is not 'os/arch[/variant]'; "
                             "write e.g. 'linux/amd64' or 'linux/arm64/v8'")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def platform_serves(recorded: str, want: Platform) -> bool:
    """Whether an image the store records as `recorded` ("os/arch[/variant]", from its
    config) is what a pull for `want` gets: the same os and architecture, and the same
    variant when both name one (a config often names none). A run asks this with the host
    and no variant: sandboxd emulates nothing, and its seccomp filters judge the host's own
    system call table only, so an image runs here when it serves this os/architecture."""
    os_name, _, rest = recorded.partition("/")
    arch, _, variant = rest.partition("/")
    return (os_name, arch) == (want.os, want.architecture) and (
        want.variant is None or variant in ("", want.variant))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    artifact_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.platform:
            plat: dict[str, Any] = {"architecture": self.platform.architecture,
                                    "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            if self.platform.os_version:
                plat["os.version"] = self.platform.os_version
            out["platform"] = plat
        return out


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


def parse_manifest(body: bytes, media_type: str, *,
                   max_blob_bytes: int = MAX_BLOB_BYTES) -> ImageManifest | ImageIndex:
    """Parse and validate a manifest or index; `media_type` is the response's Content-Type.
    A descriptor whose size is over `max_blob_bytes` is refused."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(body)} bytes, over the {MAX_MANIFEST_BYTES} "
                            "byte limit; this is not an image manifest sandboxd can use")
    given = media_type.split(";", 1)[0].strip().lower()
    if given in _SCHEMA1_TYPES:
        raise _schema1()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ManifestError(f"manifest is not valid JSON ({exc}); the registry sent something "
                            "else than a manifest") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    version = doc.get("schemaVersion")
    if version == 1 and not isinstance(version, bool):
        raise _schema1()
    if version != 2 or isinstance(version, bool):
        raise ManifestError(f"manifest schemaVersion is {_show(version)}, expected 2")

    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestError(f"manifest mediaType is {_show(declared)}, not a string")
    if declared in _SCHEMA1_TYPES:
        raise _schema1()
    kind = _resolve_type(given, declared, doc)

    if kind in INDEX_TYPES:
        return _parse_index(doc, kind, max_blob_bytes)
    return _parse_image_manifest(doc, kind, max_blob_bytes)


def _schema1() -> ManifestError:
    return ManifestError("this image uses Docker manifest schema 1, which is no longer "
                         "supported; re-push it with a current Docker, skopeo or crane")


def _resolve_type(given: str, declared: str | None, doc: dict[str, Any]) -> str:
    """The media type the body is, checked three ways: Content-Type, mediaType, shape."""
    looks_index = "manifests" in doc
    looks_manifest = "config" in doc or "layers" in doc
    if looks_index and looks_manifest:
        raise ManifestError("manifest has both 'manifests' and 'config'/'layers'; an ambiguous "
                            "document is refused (CVE-2021-41190)")
    if given in _GENERIC_TYPES:
        if declared is not None:
            kind = declared
        elif looks_index:
            kind = OCI_INDEX
        elif looks_manifest:
            kind = OCI_MANIFEST
        else:
            raise ManifestError("document has neither 'manifests' nor 'config' and 'layers'; "
                                "it is not a manifest or an index")
    else:
        kind = given
        if declared is not None and declared != given:
            raise ManifestError(f"manifest says its mediaType is {_show(declared)} but the "
                                f"registry sent it as {given!r}; refusing the mismatch "
                                "(CVE-2021-41190)")
    if kind not in INDEX_TYPES and kind not in IMAGE_MANIFEST_TYPES:
        raise ManifestError(f"unsupported manifest media type {_show(kind)}; sandboxd pulls "
                            f"{', '.join(MANIFEST_ACCEPT)}")
    if kind in INDEX_TYPES and not looks_index:
        raise ManifestError(f"a {kind} must have 'manifests'")
    if kind in IMAGE_MANIFEST_TYPES and not ("config" in doc and "layers" in doc):
        raise ManifestError(f"a {kind} must have 'config' and 'layers'")
    return kind


def _parse_image_manifest(doc: dict[str, Any], kind: str, max_size: int) -> ImageManifest:
    config = _descriptor(doc["config"], "config", max_size)
    if config.media_type not in CONFIG_TYPES:
        raise ManifestError(f"config media type is {config.media_type!r}: this is not a "
                            "container image (an artifact, a signature or a Helm chart?); "
                            "sandboxd runs images whose config is "
                            f"{OCI_CONFIG} or {DOCKER_CONFIG}")
    raw_layers = doc["layers"]
    if not isinstance(raw_layers, list):
        raise ManifestError(f"manifest 'layers' is {_show(raw_layers)}, not a list")
    if len(raw_layers) > MAX_LAYERS:
        raise ManifestError(f"manifest has {len(raw_layers)} layers, over the limit of "
                            f"{MAX_LAYERS}")
    layers = tuple(_descriptor(item, f"layer {i}", max_size)
                   for i, item in enumerate(raw_layers))
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(f"layer {i} has media type {layer.media_type!r}, which is not "
                                "a tar layer sandboxd can unpack")
    return ImageManifest(kind, config, layers, _annotations(doc.get("annotations"), "manifest"))


def _parse_index(doc: dict[str, Any], kind: str, max_size: int) -> ImageIndex:
    raw = doc["manifests"]
    if not isinstance(raw, list):
        raise ManifestError(f"index 'manifests' is {_show(raw)}, not a list")
    if len(raw) > MAX_INDEX_ENTRIES:
        raise ManifestError(f"index has {len(raw)} entries, over the limit of "
                            f"{MAX_INDEX_ENTRIES}")
    entries = tuple(_descriptor(item, f"index entry {i}", max_size)
                    for i, item in enumerate(raw))
    return ImageIndex(kind, entries, _annotations(doc.get("annotations"), "index"))


def _descriptor(obj: object, where: str, max_size: int) -> Descriptor:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where} is {_show(obj)}, not a descriptor object")
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{where}: mediaType is {_show(media_type)}, not a string")
    try:
        digest = digests.validate(obj.get("digest"), f"{where} digest")
    except InvalidReference as exc:
        raise ManifestError(str(exc)) from None
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: size is {_show(size)}; expected a whole number of "
                            "bytes")
    if size > max_size:
        raise ManifestError(f"{where}: {digest} claims {size} bytes, over the {max_size} byte "
                            "limit for one blob, and is refused before it is fetched; if the "
                            "image is genuine, raise registries.max_blob_bytes")
    urls = obj.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) and _URL.fullmatch(u)
                                             for u in urls):
        raise ManifestError(f"{where}: urls must be a list of http(s) URLs, not {_show(urls)}")
    artifact_type = obj.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestError(f"{where}: artifactType is {_show(artifact_type)}, not a string")
    return Descriptor(media_type, digest, size, _platform(obj.get("platform"), where),
                      tuple(urls), _annotations(obj.get("annotations"), where), artifact_type)


def _platform(obj: object, where: str) -> Platform | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: platform is {_show(obj)}, not an object")
    values = {}
    for key in ("os", "architecture", "variant", "os.version"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise ManifestError(f"{where}: platform {key} is {_show(value)}, not a string")
        values[key] = value or None
    if values["os"] is None or values["architecture"] is None:
        raise ManifestError(f"{where}: platform must give both 'os' and 'architecture'")
    return Platform(values["os"], values["architecture"], values["variant"],
                    values["os.version"])


def _annotations(obj: object, where: str) -> Mapping[str, str]:
    if obj is None:
        return MappingProxyType({})
    if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
        raise ManifestError(f"{where}: annotations must map strings to strings")
    return MappingProxyType(obj)


def _show(value: object) -> str:
    return repr(value)[:80]


def _wanted_variants(want: Platform) -> tuple[str | None, ...]:
    """Variants that run on `want`, best first; None means an entry with no variant."""
    base = _BASE_VARIANT.get(want.architecture)
    order = _VARIANT_ORDER.get(want.architecture, ())
    if want.variant is None or want.variant == base:
        return (None, base) if base else (None,)
    if want.variant in order:
        return (*order[order.index(want.variant):], None)
    return (want.variant, None)


def _is_candidate(desc: Descriptor) -> bool:
    """Image manifests and nested indexes; attestations and artifacts are not candidates."""
    return ((desc.media_type in IMAGE_MANIFEST_TYPES or desc.media_type in INDEX_TYPES)
            and desc.artifact_type is None and _ATTESTATION_KEY not in desc.annotations)


def select_platform(index: ImageIndex, want: Platform) -> Descriptor:
    """The entry of `index` to pull for `want`.

    Entries whose os/architecture/variant fit are preferred, best variant first, in document
    order. Failing those, the first entry with no platform at all is returned (containerd
    treats it as matching; the caller must check the image config's os/architecture, or
    select again inside it when it is a nested index). Attestations, artifacts and unknown
    media types are skipped. A returned index descriptor is for the caller to fetch and
    select within, at most MAX_INDEX_DEPTH deep.
    """
    candidates = [d for d in index.manifests if _is_candidate(d)]
    for variant in _wanted_variants(want):
        for desc in candidates:
            plat = desc.platform
            if (plat is not None and plat.os == want.os
                    and plat.architecture == want.architecture and plat.variant == variant):
                return desc
    for desc in candidates:
        if desc.platform is None:
            return desc
    available = sorted({str(d.platform) for d in candidates if d.platform})
    raise NotFound(f"no image for platform {want} in this index; it has "
                   f"{', '.join(available) or 'no runnable images'}. Pick one of those with "
                   "a platform option, or use an image built for this machine")


def layer_compression(media_type: str) -> str:
    """'gzip', 'zstd', 'none' or 'unknown' by media type (unpacking checks magic bytes too)."""
    if media_type in _GZIP_LAYERS:
        return "gzip"
    if media_type in _ZSTD_LAYERS:
        return "zstd"
    if media_type in _PLAIN_LAYERS:
        return "none"
    return "unknown"


def build_oci_manifest(config: Descriptor, layers: Sequence[Descriptor],
                       annotations: Mapping[str, str] | None = None) -> bytes:
    """An OCI image manifest as bytes; the same inputs always give the same bytes."""
    if config.media_type not in CONFIG_TYPES:
        raise ManifestError(f"config media type {config.media_type!r} is not an image config")
    if len(layers) > MAX_LAYERS:
        raise ManifestError(f"{len(layers)} layers is over the limit of {MAX_LAYERS}")
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(f"layer media type {layer.media_type!r} is not a tar layer")
    for desc in (config, *layers):
        # Round-trip through the parser's own checks: we never emit what we would refuse.
        _descriptor(desc.to_json(), f"descriptor {desc.digest[:80]!r}", MAX_BLOB_BYTES)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    return orjson.dumps(doc)
