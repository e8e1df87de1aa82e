"""Commit: a container's changes (an uncompressed layer tar stream, made by hand here: a new
file, a whiteout of a base file, an opaque directory) on top of an image pulled from the
real test registry, named for one tenant; read back by our runtime, by skopeo and by umoci.
Nothing here is faked."""

from __future__ import annotations

import datetime
import gzip
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbox.errors import Forbidden, ImageError, LayerError, NotFound, QuotaExceeded
from sandbox.images import Image, ImageService, PublicNames, digests
from sandbox.images.manifest import DOCKER_MANIFEST, OCI_LAYER_GZIP, OCI_MANIFEST
from sandbox.tenants import Tenant
from tests.conftest import Session
from tests.integration.test_images import make_service
from tests.support.images import Tools

A = Tenant("tenant-a")
B = Tenant("tenant-b")
EMPTY_LAYER = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
HELLO = b"hello from the commit\n"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"
CHANGES = [
    'CMD ["/bin/sh", "-c", "cat /app/hello.txt; ls /etc; test -e /bin/vi || echo no vi"]',
    "ENV GREETING=hello PATH=/bin:$PATH",
    "WORKDIR /app",
    'LABEL org.example.made-by="sandboxd commit"',
    "EXPOSE 8080 53/udp",
    "STOPSIGNAL SIGINT",
]


def _entry(tar: tarfile.TarFile, name: str, data: bytes | None = None, *,
           kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else mode
    info.size = len(data or b"")
    tar.addfile(info, io.BytesIO(data or b""))


def _layer_tar(*entries: tuple[Any, ...]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, *rest in entries:
            _entry(tar, name, data, **(rest[0] if rest else {}))
    return buf.getvalue()


def changes_tar() -> bytes:
    """What a container that wrote /app/hello.txt, deleted /bin/vi and replaced /etc with a
    directory holding only a new passwd would commit."""
    return _layer_tar(
        ("app", None, {"kind": tarfile.DIRTYPE}),
        ("app/hello.txt", HELLO),
        ("bin", None, {"kind": tarfile.DIRTYPE}),
        ("bin/.wh.vi", b""),
        ("etc", None, {"kind": tarfile.DIRTYPE}),
        ("etc/.wh..wh..opq", b""),
        ("etc/passwd", PASSWD),
    )


class Stream:
    """The layer as the runtime hands it over: chunks of a tar; counts what was read."""

    def __init__(self, data: bytes, chunk: int = 7000) -> None:
        self.data = data
        self.chunk = chunk
        self.handed = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.chunk):
            self.handed += 1
            yield self.data[i:i + self.chunk]


@pytest.fixture
def svc(session: Session, tmp_path: Path) -> ImageService:
    s = make_service(tmp_path / "state")
    yield s
    session.run(s.close())


def _manifest(svc: ImageService, digest: str) -> dict[str, Any]:
    return orjson.loads(svc.blobs.read(digest, 1 << 20))


def _run(session: Session, image: Image, argv: list[str] | None = None) -> str:
    """`argv` (by default the image's own Entrypoint + Cmd) with the image's env and working
    directory, in our runtime."""
    c = session.container(list(image.layers))
    try:
        res = session.exec(c, argv or list(image.defaults.argv), env=dict(image.defaults.env),
                           cwd=image.defaults.cwd)
    finally:
        session.run(c.destroy())
        session.containers.remove(c)
    assert res.exit_code == 0, res
    return res.stdout.decode()


def test_commit_onto_a_pulled_image(session: Session, svc: ImageService, images: Any) -> None:
    base = session.run(svc.pull(images.oci, tenant=A))
    tar = changes_tar()
    stream = Stream(tar)
    image = session.run(svc.commit(base, stream.chunks(), "a/committed:1", tenant=A,
                                   changes=CHANGES, message="add hello",
                                   author="Ann <ann@example.com>"))
    diff_id = digests.of_bytes(tar)
    # The manifest: the base's layers as they were, then the new one, gzip.
    manifest = _manifest(svc, image.digest)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["layers"][:-1] == _manifest(svc, base.digest)["layers"]
    new = manifest["layers"][-1]
    blob = svc.blobs.path(new["digest"]).read_bytes()
    assert new["mediaType"] == OCI_LAYER_GZIP
    assert digests.of_bytes(blob) == new["digest"] and len(blob) == new["size"]
    assert gzip.decompress(blob) == tar
    assert manifest["config"]["digest"] == image.config_digest
    assert digests.of_bytes(svc.blobs.read(image.config_digest, 1 << 20)) == image.config_digest
    # The config: the base's layers and history extended, the changes applied.
    assert image.config.diff_ids == (*base.config.diff_ids, diff_id)
    history = image.config.raw["history"]
    assert history[:-1] == base.config.raw["history"]
    entry = history[-1]
    assert {k: v for k, v in entry.items() if k != "created"} == {
        "created_by": "sandboxd commit", "comment": "add hello",
        "author": "Ann <ann@example.com>"}
    created = datetime.datetime.fromisoformat(entry["created"].replace("Z", "+00:00"))
    assert abs(datetime.datetime.now(datetime.UTC) - created) < datetime.timedelta(minutes=5)
    assert image.config.raw["created"] == entry["created"]
    assert image.config.raw["author"] == "Ann <ann@example.com>"
    run = image.config.raw["config"]
    assert run["Cmd"] == json.loads(CHANGES[0][4:])
    assert "GREETING=hello" in run["Env"] and "PATH=/bin:/bin" in run["Env"]
    assert run["WorkingDir"] == "/app" and run["StopSignal"] == "SIGINT"
    assert run["Labels"] == {"org.example.made-by": "sandboxd commit"}
    assert run["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert (image.platform, image.config.platform) == (base.platform, base.config.platform)
    assert image.names == ("docker.io/a/committed:1",)
    # It runs at once, with its own config: the file, the whiteout and the opaque /etc
    # (which shows the runtime's own files beside the image's passwd).
    assert _run(session, image) == "hello from the commit\nhostname\nhosts\npasswd\nno vi\n"
    # It is the tenant's: A resolves it, B does not, by name or digest.
    assert session.run(svc.resolve("a/committed:1", tenant=A)).digest == image.digest
    for ref in ("a/committed:1", image.digest, image.config_digest):
        with pytest.raises(NotFound):
            session.run(svc.resolve(ref, tenant=B))
    assert svc.list(tenant=B) == []
    # The base is untouched and the new layer counts once in A's usage.
    assert session.run(svc.resolve(images.oci, tenant=A)).digest == base.digest
    assert svc.catalog.holds(A.id, diff_id) and svc.catalog.holds(A.id, new["digest"])


def test_skopeo_and_umoci_read_a_commit_back(session: Session, svc: ImageService, images: Any,
                                             registry: Any, tmp_path: Path) -> None:
    """On a Docker v2s2 base (its layers become OCI media types in the new manifest):
    pushed, inspected by skopeo, copied to an OCI layout and unpacked by umoci."""
    base = session.run(svc.pull(images.v2s2, tenant=A))
    assert base.digest == images.digests["v2s2"]
    assert _manifest(svc, base.digest)["mediaType"] == DOCKER_MANIFEST
    tar = changes_tar()
    image = session.run(svc.commit(base, Stream(tar).chunks(), "a/readback:1", tenant=A,
                                   changes=['CMD ["/bin/sh"]'], message="read me back"))
    target = f"{registry.host}/committed/readback:1"
    assert session.run(svc.push("a/readback:1", target, tenant=A)) == image.digest

    tools = Tools(tmp_path / "tools")
    raw = tools.run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{target}")
    assert digests.of_bytes(raw.encode()) == image.digest
    assert {layer["mediaType"] for layer in json.loads(raw)["layers"]} == {OCI_LAYER_GZIP}
    config = json.loads(tools.run("skopeo", "inspect", "--config", "--tls-verify=false",
                                  f"docker://{target}"))
    assert config["rootfs"]["diff_ids"] == [*base.config.diff_ids, digests.of_bytes(tar)]
    assert config["history"][-1]["comment"] == "read me back"
    assert config["config"]["Cmd"] == ["/bin/sh"]

    layout = tmp_path / "layout"
    tools.skopeo_copy(f"docker://{target}", f"oci:{layout}:c", "--src-tls-verify=false")
    bundle = tmp_path / "bundle"
    tools.run("umoci", "unpack", *tools.rootless, "--image", f"{layout}:c", str(bundle))
    rootfs = bundle / "rootfs"
    assert (rootfs / "app/hello.txt").read_bytes() == HELLO
    assert (rootfs / "bin/busybox").is_file() and (rootfs / "bin/sh").is_symlink()
    assert not os.path.lexists(rootfs / "bin/vi")                 # the whiteout
    assert sorted(os.listdir(rootfs / "etc")) == ["passwd"]       # the opaque directory
    assert (rootfs / "etc/passwd").read_bytes() == PASSWD
    assert not [p for p in rootfs.rglob(".wh.*")]                # markers are not files


def test_an_empty_layer_is_still_a_layer(session: Session, svc: ImageService,
                                         images: Any) -> None:
    """A read-only root commits as a tar of two zero blocks; Docker adds that layer too."""
    base = session.run(svc.pull(images.oci, tenant=A))
    image = session.run(svc.commit(base, Stream(b"\0" * 1024).chunks(), "a/empty:1",
                                   tenant=A))
    assert image.config.diff_ids == (*base.config.diff_ids, EMPTY_LAYER)
    assert len(image.layers) == len(base.layers) + 1
    assert image.config.raw["config"] == base.config.raw["config"]
    assert "author" not in image.config.raw


def test_over_quota_gives_quota_exceeded_and_no_name(session: Session, svc: ImageService,
                                                     images: Any) -> None:
    base = session.run(svc.pull(images.oci, tenant=Tenant("q")))
    small = Tenant("q", max_image_bytes=svc.catalog.usage("q") + 1000)
    big = _layer_tar(("big", os.urandom(200_000)))
    with pytest.raises(QuotaExceeded, match="max_image_bytes"):
        session.run(svc.commit(base, Stream(big).chunks(), "q/big:1", tenant=small))
    assert svc.catalog.lookup("q", "docker.io/q/big:1") is None
    with pytest.raises(NotFound):
        session.run(svc.resolve("q/big:1", tenant=small))
    assert [s.digest for s in svc.list(tenant=small)] == [base.digest]
    # A small enough layer fits.
    image = session.run(svc.commit(base, Stream(changes_tar()).chunks(), "q/small:1",
                                   tenant=small))
    assert session.run(svc.resolve("q/small:1", tenant=small)).digest == image.digest


def test_what_can_be_checked_is_checked_before_the_stream_is_read(
        session: Session, tmp_path: Path, images: Any) -> None:
    svc = make_service(tmp_path / "state", public=PublicNames.parse(["docker.io/library/*"]))
    try:
        base = session.run(svc.pull(images.oci, tenant=A))
        cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
            (Forbidden, "reference: busybox:mine is a public name",
             {"reference": "busybox:mine"}),
            (ImageError, r"changes\[1\]: RUN cannot be a commit change",
             {"changes": ["ENV A=1", "RUN rm -rf /"]}),
            (ImageError, r"changes\[0\]: WORKDIR: needs exactly one argument",
             {"changes": ["WORKDIR"]}),
            (ImageError, "a new image is named by a tag, not a digest",
             {"reference": f"a/x@{base.digest}"}),
            (NotFound, "among your images", {"tenant": B}),       # B does not hold A's base
            (QuotaExceeded, "quota", {"tenant": Tenant(A.id, max_image_bytes=1)}),
        ]
        for error, message, kw in cases:
            stream = Stream(changes_tar())
            args = {"reference": "a/x:1", "tenant": A, **kw}
            with pytest.raises(error, match=message):
                session.run(svc.commit(base, stream.chunks(), **args))
            assert stream.handed == 0, (error, message)
        assert [s.digest for s in svc.list(tenant=A)] == [base.digest]
    finally:
        session.run(svc.close())


def test_a_public_base(session: Session, tmp_path: Path, images: Any) -> None:
    """The operator's shared image as a base: the commit is the committing tenant's alone,
    holds the base's content for it and counts it in its quota."""
    svc = make_service(tmp_path / "state", public=PublicNames.parse([images.oci]))
    try:
        base = session.run(svc.pull(images.oci, tenant=A))  # a public name: PUBLIC's
        assert svc.catalog.usage(B.id) == 0
        image = session.run(svc.commit(base, Stream(changes_tar()).chunks(), "b/mine:1",
                                       tenant=B))
        assert session.run(svc.resolve("b/mine:1", tenant=B)).digest == image.digest
        with pytest.raises(NotFound):
            session.run(svc.resolve("b/mine:1", tenant=A))
        assert all(svc.catalog.holds(B.id, d) for d in image.config.diff_ids)
        assert svc.catalog.usage(B.id) > image.size
        assert _run(session, image, ["cat", "/app/hello.txt"]) == HELLO.decode()
    finally:
        session.run(svc.close())


@pytest.mark.parametrize(("entries", "message"), [
    ([("ok", b"fine"), ("../../escape", b"x")], r"contains '\.\.'"),
    ([("hard", None, {"kind": tarfile.LNKTYPE, "link": "/etc/passwd"})], "hard link"),
    ([("hard", None, {"kind": tarfile.LNKTYPE, "link": "../../etc/passwd"})],
     r"contains '\.\.'"),
    ([("out", None, {"kind": tarfile.SYMTYPE, "link": "/nonexistent-sbx"}), ("out/x", b"x")],
     "'out' is a symlink that does not lead to a directory inside the layer"),
])
def test_a_hostile_stream_is_refused_by_the_unpack_rules(
        session: Session, svc: ImageService, images: Any, tmp_path: Path,
        entries: list[tuple[Any, ...]], message: str) -> None:
    base = session.run(svc.pull(images.oci, tenant=A))
    layers_before = set(svc.layers.diff_ids())
    with pytest.raises(LayerError, match=message):
        session.run(svc.commit(base, Stream(_layer_tar(*entries)).chunks(), "a/evil:1",
                               tenant=A))
    assert svc.catalog.lookup(A.id, "docker.io/a/evil:1") is None
    assert set(svc.layers.diff_ids()) == layers_before
    assert list(svc.blobs.tmp.iterdir()) == [] and list(svc.layers.tmp.iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_an_absolute_path_stays_inside_the_layer(session: Session, svc: ImageService,
                                                images: Any, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    base = session.run(svc.pull(images.oci, tenant=A))
    image = session.run(svc.commit(base, Stream(_layer_tar((f"{host}/abs", b"y"))).chunks(),
                                   "a/inside:1", tenant=A))
    assert list(host.iterdir()) == []
    assert (image.layers[-1] / str(host).lstrip("/") / "abs").read_bytes() == b"y"
