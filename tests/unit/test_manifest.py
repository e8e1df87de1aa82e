"""Manifest, index and platform handling against realistic and hostile documents."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from sandbox.errors import ImageError, ManifestError, NotFound
from sandbox.images import digests
from sandbox.images import manifest as m
from sandbox.images.manifest import Descriptor, ImageIndex, ImageManifest, Platform
from sandbox.images.store.unpack import UnpackLimits


def dg(n: int) -> str:
    return digests.of_bytes(str(n).encode())


def entry(media_type: str, n: int, plat: dict[str, str] | None = None, **extra: Any) -> dict:
    out: dict[str, Any] = {"mediaType": media_type, "digest": dg(n), "size": 1000 + n}
    if plat is not None:
        out["platform"] = plat
    out.update(extra)
    return out


def attestation(n: int, ref: int) -> dict:
    return entry(m.OCI_MANIFEST, n, {"architecture": "unknown", "os": "unknown"},
                 annotations={"vnd.docker.reference.digest": dg(ref),
                              "vnd.docker.reference.type": "attestation-manifest"})


# Shaped like docker.io/library/python:3.12-slim: an OCI index from buildx, each image
# followed by its attestation manifest.
PYTHON_SLIM_INDEX = {
    "schemaVersion": 2,
    "mediaType": m.OCI_INDEX,
    "manifests": [
        entry(m.OCI_MANIFEST, 1, {"architecture": "amd64", "os": "linux"}),
        entry(m.OCI_MANIFEST, 2, {"architecture": "arm", "os": "linux", "variant": "v5"}),
        entry(m.OCI_MANIFEST, 3, {"architecture": "arm", "os": "linux", "variant": "v7"}),
        entry(m.OCI_MANIFEST, 4, {"architecture": "arm64", "os": "linux", "variant": "v8"}),
        entry(m.OCI_MANIFEST, 5, {"architecture": "386", "os": "linux"}),
        entry(m.OCI_MANIFEST, 6, {"architecture": "ppc64le", "os": "linux"}),
        entry(m.OCI_MANIFEST, 7, {"architecture": "s390x", "os": "linux"}),
        attestation(11, 1), attestation(12, 2), attestation(13, 3), attestation(14, 4),
        attestation(15, 5), attestation(16, 6), attestation(17, 7),
    ],
}

# A Docker schema 2 manifest as `docker push` writes it.
DOCKER_V2S2 = {
    "schemaVersion": 2,
    "mediaType": m.DOCKER_MANIFEST,
    "config": {"mediaType": m.DOCKER_CONFIG, "size": 7023, "digest": dg(100)},
    "layers": [
        {"mediaType": m.DOCKER_LAYER_GZIP, "size": 32654, "digest": dg(101)},
        {"mediaType": m.DOCKER_LAYER_GZIP, "size": 16724, "digest": dg(102)},
        {"mediaType": m.DOCKER_FOREIGN_GZIP, "size": 73109, "digest": dg(103),
         "urls": ["https://go.microsoft.com/fwlink/?linkid=837858"]},
    ],
}

# An OCI manifest with zstd layers, as `skopeo copy --dest-compress-format zstd` writes it.
OCI_ZSTD = {
    "schemaVersion": 2,
    "mediaType": m.OCI_MANIFEST,
    "config": {"mediaType": m.OCI_CONFIG, "digest": dg(200), "size": 585},
    "layers": [
        {"mediaType": m.OCI_LAYER_ZSTD, "digest": dg(201), "size": 1021034,
         "annotations": {"io.github.containers.zstd-chunked.manifest-position": "1:2:3:1"}},
        {"mediaType": m.OCI_LAYER_GZIP, "digest": dg(202), "size": 123},
    ],
    "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
}


def body(doc: dict) -> bytes:
    return orjson.dumps(doc)


def test_python_slim_index() -> None:
    index = m.parse_manifest(body(PYTHON_SLIM_INDEX), m.OCI_INDEX)
    assert isinstance(index, ImageIndex)
    assert len(index.manifests) == 14
    assert index.manifests[3].platform == Platform("linux", "arm64", "v8")
    assert m.select_platform(index, Platform("linux", "amd64")).digest == dg(1)
    assert m.select_platform(index, Platform("linux", "arm64")).digest == dg(4)
    assert m.select_platform(index, Platform("linux", "arm64", "v8")).digest == dg(4)
    assert m.select_platform(index, Platform("linux", "arm", "v7")).digest == dg(3)
    assert m.select_platform(index, Platform("linux", "arm", "v6")).digest == dg(2)
    assert m.select_platform(index, Platform("linux", "arm", "v8")).digest == dg(3)
    with pytest.raises(NotFound) as info:
        m.select_platform(index, Platform("linux", "riscv64"))
    message = str(info.value)
    assert "linux/riscv64" in message and "linux/arm64/v8" in message
    assert "unknown" not in message  # attestations are not offered as platforms


def test_docker_v2s2_manifest() -> None:
    man = m.parse_manifest(body(DOCKER_V2S2), m.DOCKER_MANIFEST + "; charset=utf-8")
    assert isinstance(man, ImageManifest)
    assert man.media_type == m.DOCKER_MANIFEST
    assert man.config == Descriptor(m.DOCKER_CONFIG, dg(100), 7023)
    assert [layer.size for layer in man.layers] == [32654, 16724, 73109]
    assert man.layers[2].urls == ("https://go.microsoft.com/fwlink/?linkid=837858",)
    assert [m.layer_compression(layer.media_type) for layer in man.layers] == ["gzip"] * 3


def test_oci_manifest_with_zstd_layers() -> None:
    man = m.parse_manifest(body(OCI_ZSTD), m.OCI_MANIFEST)
    assert isinstance(man, ImageManifest)
    assert [m.layer_compression(layer.media_type) for layer in man.layers] == ["zstd", "gzip"]
    assert man.annotations["org.opencontainers.image.created"] == "2024-01-01T00:00:00Z"
    assert "manifest-position" in next(iter(man.layers[0].annotations))


def test_docker_manifest_list() -> None:
    doc = {"schemaVersion": 2, "mediaType": m.DOCKER_LIST, "manifests": [
        entry(m.DOCKER_MANIFEST, 1, {"architecture": "amd64", "os": "linux"}),
        entry(m.DOCKER_MANIFEST, 2, {"architecture": "arm64", "os": "linux", "variant": "v8"}),
        entry(m.DOCKER_MANIFEST, 3, {"architecture": "amd64", "os": "windows",
                                     "os.version": "10.0.17763.5576"}),
    ]}
    index = m.parse_manifest(body(doc), m.DOCKER_LIST)
    assert isinstance(index, ImageIndex)
    assert index.manifests[2].platform == Platform("windows", "amd64", None, "10.0.17763.5576")
    assert m.select_platform(index, Platform("linux", "amd64")).digest == dg(1)


def test_accept_list_and_type_sets() -> None:
    assert m.MANIFEST_ACCEPT == (m.OCI_MANIFEST, m.DOCKER_MANIFEST, m.OCI_INDEX, m.DOCKER_LIST)
    assert {m.OCI_INDEX, m.DOCKER_LIST} == m.INDEX_TYPES
    assert {m.OCI_MANIFEST, m.DOCKER_MANIFEST} == m.IMAGE_MANIFEST_TYPES
    assert m.OCI_LAYER_ND_ZSTD in m.LAYER_TYPES and m.OCI_CONFIG not in m.LAYER_TYPES


@pytest.mark.parametrize(("media_type", "expected"), [
    (m.OCI_LAYER, "none"), (m.OCI_LAYER_GZIP, "gzip"), (m.OCI_LAYER_ZSTD, "zstd"),
    (m.OCI_LAYER_ND, "none"), (m.OCI_LAYER_ND_GZIP, "gzip"), (m.OCI_LAYER_ND_ZSTD, "zstd"),
    (m.DOCKER_LAYER, "none"), (m.DOCKER_LAYER_GZIP, "gzip"), (m.DOCKER_LAYER_ZSTD, "zstd"),
    (m.DOCKER_FOREIGN, "none"), (m.DOCKER_FOREIGN_GZIP, "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+bzip2", "unknown"), (m.OCI_CONFIG, "unknown"),
])
def test_layer_compression(media_type: str, expected: str) -> None:
    assert m.layer_compression(media_type) == expected


# --- media type resolution -------------------------------------------------------------

def without_media_type(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    del doc["mediaType"]
    return doc


@pytest.mark.parametrize(("doc", "content_type", "expected"), [
    (without_media_type(OCI_ZSTD), m.OCI_MANIFEST, m.OCI_MANIFEST),
    (without_media_type(PYTHON_SLIM_INDEX), m.OCI_INDEX, m.OCI_INDEX),
    (without_media_type(OCI_ZSTD), "application/json", m.OCI_MANIFEST),
    (without_media_type(PYTHON_SLIM_INDEX), "", m.OCI_INDEX),
    (DOCKER_V2S2, "application/octet-stream", m.DOCKER_MANIFEST),
    (OCI_ZSTD, "Application/VND.OCI.Image.Manifest.v1+JSON", m.OCI_MANIFEST),
])
def test_media_type_from_content_type_body_or_shape(doc: dict, content_type: str,
                                                    expected: str) -> None:
    assert m.parse_manifest(body(doc), content_type).media_type == expected


def mutate(doc: dict, path: tuple, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()
BIG_HEX_DIGEST = "sha256:" + "A" * 64

# (document bytes, content type, fragment of the error message)
HOSTILE: dict[str, tuple[bytes, str, str]] = {
    "too big": (b" " * (4 * 1024 * 1024 + 1), m.OCI_MANIFEST, "byte limit"),
    "not json": (b"{not json", m.OCI_MANIFEST, "not valid JSON"),
    "json array": (b"[]", m.OCI_MANIFEST, "not a JSON object"),
    "json string": (b'"x"', m.OCI_MANIFEST, "not a JSON object"),
    "deep nesting": (b"[" * 100000 + b"]" * 100000, m.OCI_MANIFEST, "not valid JSON"),
    "no schemaVersion": (body(mutate(OCI_ZSTD, ("schemaVersion",), _DELETE)), m.OCI_MANIFEST,
                         "schemaVersion is None"),
    "schemaVersion true": (body(mutate(OCI_ZSTD, ("schemaVersion",), True)), m.OCI_MANIFEST,
                           "schemaVersion is True"),
    "schemaVersion '2'": (body(mutate(OCI_ZSTD, ("schemaVersion",), "2")), m.OCI_MANIFEST,
                          "expected 2"),
    "schema1 by content type": (b'{"schemaVersion": 1}', m.DOCKER_SCHEMA1_SIGNED,
                                "schema 1, which is no longer supported"),
    "schema1 v1+json": (b"{}", m.DOCKER_SCHEMA1, "no longer supported"),
    "schema1 by version": (b'{"schemaVersion": 1, "name": "x", "fsLayers": []}',
                           "application/json", "re-push"),
    "schema1 by body type": (body({"schemaVersion": 2, "mediaType": m.DOCKER_SCHEMA1}),
                             "application/json", "no longer supported"),
    "body says index, header manifest": (body(PYTHON_SLIM_INDEX), m.OCI_MANIFEST,
                                         "CVE-2021-41190"),
    "body says oci, header docker": (body(OCI_ZSTD), m.DOCKER_MANIFEST, "mismatch"),
    "both manifests and layers": (body({**OCI_ZSTD, "manifests": []}), m.OCI_MANIFEST,
                                  "ambiguous"),
    "both, no mediaType": (body({**without_media_type(OCI_ZSTD), "manifests": []}),
                           "application/json", "ambiguous"),
    "index shape as manifest type": (body(without_media_type(PYTHON_SLIM_INDEX)),
                                     m.OCI_MANIFEST, "must have 'config' and 'layers'"),
    "manifest shape as index type": (body(without_media_type(OCI_ZSTD)), m.OCI_INDEX,
                                     "must have 'manifests'"),
    "config without layers": (body(mutate(OCI_ZSTD, ("layers",), _DELETE)), m.OCI_MANIFEST,
                              "must have 'config' and 'layers'"),
    "shapeless": (b'{"schemaVersion": 2}', "application/json", "neither"),
    "unknown content type": (body(without_media_type(OCI_ZSTD)), "application/x-foo",
                             "unsupported manifest media type"),
    "mediaType not a string": (body(mutate(OCI_ZSTD, ("mediaType",), 7)), m.OCI_MANIFEST,
                               "not a string"),
    "artifact config": (body(mutate(OCI_ZSTD, ("config", "mediaType"),
                                    "application/vnd.cncf.helm.config.v1+json")),
                        m.OCI_MANIFEST, "not a container image"),
    "empty config (artifact)": (body(mutate(OCI_ZSTD, ("config", "mediaType"), m.OCI_EMPTY)),
                                m.OCI_MANIFEST, "not a container image"),
    "unknown layer type": (body(mutate(OCI_ZSTD, ("layers", 1, "mediaType"),
                                       "application/vnd.in-toto+json")), m.OCI_MANIFEST,
                           "'application/vnd.in-toto+json'"),
    "layers not a list": (body(mutate(OCI_ZSTD, ("layers",), {"a": 1})), m.OCI_MANIFEST,
                          "not a list"),
    "too many layers": (body(mutate(OCI_ZSTD, ("layers",),
                                    [OCI_ZSTD["layers"][1]] * 1001)), m.OCI_MANIFEST,
                        "over the limit of 1000"),
    "too many index entries": (body(mutate(PYTHON_SLIM_INDEX, ("manifests",),
                                           [PYTHON_SLIM_INDEX["manifests"][0]] * 10001)),
                               m.OCI_INDEX, "over the limit of 10000"),
    "manifests not a list": (body(mutate(PYTHON_SLIM_INDEX, ("manifests",), "x")),
                             m.OCI_INDEX, "not a list"),
    "descriptor not an object": (body(mutate(OCI_ZSTD, ("layers", 0), "x")), m.OCI_MANIFEST,
                                 "not a descriptor"),
    "descriptor mediaType missing": (body(mutate(OCI_ZSTD, ("config", "mediaType"), _DELETE)),
                                     m.OCI_MANIFEST, "mediaType is None"),
    "negative size": (body(mutate(OCI_ZSTD, ("layers", 0, "size"), -1)), m.OCI_MANIFEST,
                      "size is -1"),
    "huge size": (body(mutate(OCI_ZSTD, ("layers", 0, "size"), 1 << 62)), m.OCI_MANIFEST,
                  "over the 17179869184 byte limit"),
    "float size": (body(mutate(OCI_ZSTD, ("layers", 0, "size"), 1.5)), m.OCI_MANIFEST,
                   "size is 1.5"),
    "bool size": (body(mutate(OCI_ZSTD, ("layers", 0, "size"), True)), m.OCI_MANIFEST,
                  "size is True"),
    "string size": (body(mutate(OCI_ZSTD, ("config", "size"), "585")), m.OCI_MANIFEST,
                    "size is '585'"),
    "missing digest": (body(mutate(OCI_ZSTD, ("layers", 0, "digest"), _DELETE)),
                       m.OCI_MANIFEST, "not a digest"),
    "traversal digest": (body(mutate(OCI_ZSTD, ("layers", 0, "digest"),
                                     "sha256:../../../../etc/passwd")), m.OCI_MANIFEST,
                         "not a digest"),
    "uppercase digest": (body(mutate(OCI_ZSTD, ("config", "digest"), BIG_HEX_DIGEST)),
                         m.OCI_MANIFEST, "'sha256:AAAA"),
    "sha512 digest": (body(mutate(OCI_ZSTD, ("config", "digest"), "sha512:" + "a" * 128)),
                      m.OCI_MANIFEST, "only sha256"),
    "urls not http": (body(mutate(DOCKER_V2S2, ("layers", 2, "urls"), ["file:///etc/shadow"])),
                      m.DOCKER_MANIFEST, "http(s) URLs"),
    "urls not a list": (body(mutate(DOCKER_V2S2, ("layers", 2, "urls"), "https://x")),
                        m.DOCKER_MANIFEST, "http(s) URLs"),
    "annotation values not strings": (body(mutate(OCI_ZSTD, ("annotations",), {"a": 1})),
                                      m.OCI_MANIFEST, "annotations"),
    "platform without os": (body(mutate(PYTHON_SLIM_INDEX, ("manifests", 0, "platform"),
                                        {"architecture": "amd64"})), m.OCI_INDEX,
                            "both 'os' and 'architecture'"),
    "platform variant not a string": (body(mutate(PYTHON_SLIM_INDEX,
                                                  ("manifests", 0, "platform", "variant"), 8)),
                                      m.OCI_INDEX, "variant is 8"),
    "artifactType not a string": (body(mutate(PYTHON_SLIM_INDEX,
                                              ("manifests", 0, "artifactType"), [])),
                                  m.OCI_INDEX, "artifactType"),
}


@pytest.mark.parametrize(("data", "content_type", "fragment"), HOSTILE.values(),
                         ids=list(HOSTILE))
def test_hostile_documents_are_refused_clearly(data: bytes, content_type: str,
                                               fragment: str) -> None:
    with pytest.raises(ManifestError) as info:
        m.parse_manifest(data, content_type)
    assert fragment in str(info.value)


def test_the_blob_cap_is_the_unpack_limit_and_can_be_set() -> None:
    assert m.MAX_BLOB_BYTES == UnpackLimits().max_bytes == 16 << 30
    doc = body(mutate(OCI_ZSTD, ("layers", 1, "size"), 1021035))
    with pytest.raises(ManifestError, match=r"layer 1: sha256:\w+ claims 1021035 bytes, over "
                                             "the 1021034 byte limit"):
        m.parse_manifest(doc, m.OCI_MANIFEST, max_blob_bytes=1021034)
    assert m.parse_manifest(doc, m.OCI_MANIFEST, max_blob_bytes=1021035)
    index = body({"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": [
        {"mediaType": m.OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 1 << 40}]})
    with pytest.raises(ManifestError, match="index entry 0"):
        m.parse_manifest(index, m.OCI_INDEX)


def test_descriptor_limits_are_inclusive() -> None:
    doc = mutate(OCI_ZSTD, ("layers", 0, "size"), m.MAX_BLOB_BYTES)
    doc = mutate(doc, ("config", "size"), 0)
    man = m.parse_manifest(body(doc), m.OCI_MANIFEST)
    assert isinstance(man, ImageManifest)
    assert (man.layers[0].size, man.config.size) == (m.MAX_BLOB_BYTES, 0)
    many = mutate(OCI_ZSTD, ("layers",), [OCI_ZSTD["layers"][1]] * 1000)
    assert len(m.parse_manifest(body(many), m.OCI_MANIFEST).layers) == 1000  # type: ignore[union-attr]


# --- platform selection ------------------------------------------------------------------

def index_of(*platforms: dict | None, media_type: str = m.OCI_MANIFEST) -> ImageIndex:
    doc = {"schemaVersion": 2, "mediaType": m.OCI_INDEX,
           "manifests": [entry(media_type, i, p) for i, p in enumerate(platforms)]}
    result = m.parse_manifest(body(doc), m.OCI_INDEX)
    assert isinstance(result, ImageIndex)
    return result


def linux(arch: str, variant: str | None = None) -> dict[str, str]:
    out = {"os": "linux", "architecture": arch}
    if variant:
        out["variant"] = variant
    return out


@pytest.mark.parametrize(("entries", "want", "chosen"), [
    # exact match wins over document order
    ([linux("arm", "v6"), linux("arm", "v7")], Platform("linux", "arm", "v7"), 1),
    # arm falls back downwards from the wanted variant, then to no variant
    ([linux("arm", "v5"), linux("arm", "v6")], Platform("linux", "arm", "v7"), 1),
    ([linux("arm"), linux("arm", "v5")], Platform("linux", "arm", "v7"), 1),
    ([linux("arm")], Platform("linux", "arm", "v7"), 0),
    # arm64: v8 and no variant are the same thing, no variant preferred when none is wanted
    ([linux("arm64", "v8"), linux("arm64")], Platform("linux", "arm64"), 1),
    ([linux("arm64", "v8")], Platform("linux", "arm64"), 0),
    ([linux("arm64")], Platform("linux", "arm64", "v8"), 0),
    # amd64: plain wanted takes no variant or v1, never a higher level it may not run
    ([linux("amd64", "v3"), linux("amd64")], Platform("linux", "amd64"), 1),
    ([linux("amd64", "v1")], Platform("linux", "amd64"), 0),
    ([linux("amd64", "v2"), linux("amd64", "v3")], Platform("linux", "amd64", "v3"), 1),
    ([linux("amd64", "v2"), linux("amd64")], Platform("linux", "amd64", "v3"), 0),
    # an unknown wanted variant: that variant, then no variant
    ([linux("riscv64"), linux("riscv64", "rva23")], Platform("linux", "riscv64", "rva23"), 1),
    # os must match
    ([{"os": "windows", "architecture": "amd64"}, linux("amd64")],
     Platform("linux", "amd64"), 1),
    # platform-less entries are the last resort
    ([None, linux("amd64")], Platform("linux", "amd64"), 1),
    ([linux("arm64"), None], Platform("linux", "amd64"), 1),
])
def test_select_platform(entries: list, want: Platform, chosen: int) -> None:
    assert m.select_platform(index_of(*entries), want).digest == dg(chosen)


@pytest.mark.parametrize(("entries", "want"), [
    ([linux("arm", "v7")], Platform("linux", "arm", "v6")),   # never a more capable variant
    ([linux("amd64", "v2")], Platform("linux", "amd64")),
    ([linux("arm64", "v9")], Platform("linux", "arm64")),
    ([{"os": "windows", "architecture": "amd64"}], Platform("linux", "amd64")),
    ([], Platform("linux", "amd64")),
])
def test_select_platform_not_found(entries: list, want: Platform) -> None:
    with pytest.raises(NotFound, match="no image for platform"):
        m.select_platform(index_of(*entries), want)


def test_select_skips_attestations_artifacts_and_unknown_types() -> None:
    doc = {"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": [
        attestation(1, 9),
        entry(m.OCI_MANIFEST, 2, linux("amd64"), artifactType="application/vnd.example+json"),
        entry("application/vnd.in-toto+json", 3, linux("amd64")),
        entry("application/vnd.oci.image.manifest.v2+json", 4, linux("amd64")),
        entry(m.DOCKER_MANIFEST, 5, None,
              annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        entry(m.OCI_MANIFEST, 6, linux("amd64")),
    ]}
    index = m.parse_manifest(body(doc), m.OCI_INDEX)
    assert isinstance(index, ImageIndex)
    assert len(index.manifests) == 6  # kept in the index, only skipped when selecting
    assert m.select_platform(index, Platform("linux", "amd64")).digest == dg(6)
    with pytest.raises(NotFound, match="no runnable images"):
        m.select_platform(ImageIndex(m.OCI_INDEX, index.manifests[:5]),
                          Platform("linux", "amd64"))


def test_select_returns_nested_indexes_for_the_caller() -> None:
    nested = index_of(linux("arm64"), None, media_type=m.OCI_INDEX)
    assert m.select_platform(nested, Platform("linux", "arm64")).media_type == m.OCI_INDEX
    assert m.select_platform(nested, Platform("linux", "amd64")).digest == dg(1)
    assert m.MAX_INDEX_DEPTH == 4


@pytest.mark.parametrize(("text", "expected"), [
    ("linux/amd64", Platform("linux", "amd64")),
    ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
    ("linux/arm/v7", Platform("linux", "arm", "v7")),
    ("Linux/X86_64", Platform("linux", "amd64")),
    ("linux/aarch64", Platform("linux", "arm64")),
])
def test_platform_parse(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected
    assert Platform.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "linux", "linux/", "/amd64", "linux/amd64/v8/x",
                                  "linux/amd 64", "linux/../x", 3])
def test_platform_parse_rejects(text: Any) -> None:
    with pytest.raises(ImageError, match="os/arch"):
        Platform.parse(text)


def test_platform_host_is_goarch(monkeypatch: pytest.MonkeyPatch) -> None:
    for machine, expected in [("x86_64", Platform("linux", "amd64")),
                              ("aarch64", Platform("linux", "arm64", "v8")),
                              ("armv7l", Platform("linux", "arm", "v7")),
                              ("i686", Platform("linux", "386"))]:
        monkeypatch.setattr(m._host, "machine", lambda machine=machine: machine)
        assert Platform.host() == expected
    monkeypatch.undo()
    assert Platform.host().os == "linux"


# --- building ----------------------------------------------------------------------------

def test_build_oci_manifest_round_trips_deterministically() -> None:
    config = Descriptor(m.OCI_CONFIG, dg(1), 100)
    layers = [Descriptor(m.OCI_LAYER_GZIP, dg(2), 200),
              Descriptor(m.OCI_LAYER_ZSTD, dg(3), 300, annotations={"b": "2", "a": "1"})]
    data = m.build_oci_manifest(config, layers, {"z": "1", "org.example": "x"})
    assert data == m.build_oci_manifest(config, list(layers), {"org.example": "x", "z": "1"})
    parsed = m.parse_manifest(data, m.OCI_MANIFEST)
    assert isinstance(parsed, ImageManifest)
    assert parsed.config == config
    assert parsed.layers == tuple(layers)
    assert dict(parsed.annotations) == {"org.example": "x", "z": "1"}
    doc = orjson.loads(data)
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == m.OCI_MANIFEST
    assert "urls" not in doc["layers"][0] and "annotations" not in doc["layers"][0]
    assert list(doc["layers"][1]["annotations"]) == ["a", "b"]


@pytest.mark.parametrize(("config", "layers", "fragment"), [
    (Descriptor(m.OCI_EMPTY, dg(1), 2), [], "not an image config"),
    (Descriptor(m.OCI_CONFIG, dg(1), 2), [Descriptor("text/plain", dg(2), 1)],
     "not a tar layer"),
    (Descriptor(m.OCI_CONFIG, "sha256:bad", 2), [], "not a digest"),
    (Descriptor(m.OCI_CONFIG, dg(1), -5), [], "size is -5"),
])
def test_build_oci_manifest_refuses_what_it_would_not_parse(config: Descriptor,
                                                            layers: list[Descriptor],
                                                            fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment):
        m.build_oci_manifest(config, layers)


def test_descriptors_are_hashable_values() -> None:
    a = Descriptor(m.OCI_LAYER_GZIP, dg(2), 200, annotations={"x": "1"})
    assert hash(a) == hash(Descriptor(m.OCI_LAYER_GZIP, dg(2), 200))
    assert a != Descriptor(m.OCI_LAYER_GZIP, dg(2), 200)
