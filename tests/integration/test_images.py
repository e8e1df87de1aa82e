"""Images end to end: pulls from Debian's docker-registry of images that umoci and skopeo
made, run with the runtime; caching, single downloads, faults, a killed pull, import,
push, tags and gc. Nothing here is faked."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import DigestMismatch, ImageError, ManifestError, NotFound, RegistryError
from sandbox.images import Image, ImageService, PullProgress, digests
from sandbox.images.manifest import OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Platform
from sandbox.images.reference import parse
from sandbox.images.registry.client import RegistryClient, RetryPolicy
from sandbox.images.registry.config import RegistriesConfig
from sandbox.images.store.unpack import Ownership
from sandbox.runtime import idmap
from sandbox.runtime.requests import ExecRequest
from sandbox.tenants import Tenant
from tests.conftest import Session
from tests.support.proxy import Corrupt, ResetAfter, Status, Truncate

REPO = Path(__file__).resolve().parents[2]
FAST_RETRY = RetryPolicy(attempts=4, first_delay=0.05, max_delay=2.0)
T = Tenant("test")


def _skopeo_env(home: Path | str = "/tmp") -> dict[str, str]:
    # Its own runtime dir: without one skopeo reads /run/containers/<uid>/auth.json, which a
    # root podman's private /run/containers makes a permission error for an ordinary user.
    return {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}


def _digest_of(ref: str) -> str:
    """The manifest digest as skopeo (not our client) sees it."""
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{ref}"], check=True, capture_output=True,
                         env=_skopeo_env()).stdout
    return digests.of_bytes(raw)


def _ownership() -> Ownership:
    return Ownership.for_mapping(idmap.plan())


def make_service(state: Path, **kw: Any) -> ImageService:
    return ImageService(state, ownership=_ownership(),
                        client=RegistryClient(RegistriesConfig(), retry=FAST_RETRY), **kw)


@pytest.fixture
def svc(session: Session, tmp_path: Path) -> ImageService:
    s = make_service(tmp_path / "state")
    yield s
    session.run(s.close())


def run_echo(session: Session, image: Image, text: str = "hello") -> str:
    c = session.container(list(image.layers))
    try:
        env = dict(image.defaults.env) or {"PATH": "/bin"}
        res = session.exec(c, ["busybox", "echo", text], env=env)
        assert res.exit_code == 0, res
        return res.stdout.decode()
    finally:
        session.run(c.destroy())
        session.containers.remove(c)


@pytest.mark.parametrize("which", ["v2s2", "oci", "zstd", "multi"])
def test_pull_images_made_by_skopeo_and_umoci_and_run_them(
        session: Session, svc: ImageService, images: Any, which: str) -> None:
    ref = getattr(images, which)
    image = session.run(svc.pull(ref, tenant=T))
    assert image.platform.startswith("linux/")
    assert all(p.is_dir() for p in image.layers)
    assert run_echo(session, image, which) == f"{which}\n"
    assert session.run(svc.resolve(ref, tenant=T)).digest == image.digest


def test_a_cached_repull_downloads_no_blob(session: Session, svc: ImageService, images: Any,
                                           registry: Any) -> None:
    first = session.run(svc.pull(images.oci, tenant=T))
    before = registry.requests()
    events: list[PullProgress] = []
    again = session.run(svc.pull(images.oci, on_progress=events.append, tenant=T))
    after = registry.requests()[len(before):]
    assert again.digest == first.digest
    assert [e.status for e in events] == ["up to date"]
    assert not [r for r in after if "/blobs/" in r[1]], after
    assert [r[0] for r in after if "/manifests/" in r[1]] == ["HEAD"]


def test_concurrent_pulls_of_images_sharing_a_layer_fetch_it_once(
        session: Session, tmp_path: Path, images: Any, registry: Any) -> None:
    before = registry.blob_gets(images.shared_layer)
    svc = make_service(tmp_path / "fresh")
    try:
        refs = [images.shared_a, images.shared_b] * 4

        async def all_pulls() -> list[Image]:
            return await asyncio.gather(*(svc.pull(r, tenant=T) for r in refs))

        pulled = session.run(all_pulls())
    finally:
        session.run(svc.close())
    assert registry.blob_gets(images.shared_layer) - before == 1
    assert pulled[0].layers[0] == pulled[1].layers[0]  # one unpacked copy, shared


def test_processes_pulling_the_same_image_download_each_blob_once(
        tmp_path: Path, images: Any, registry: Any) -> None:
    state = tmp_path / "shared-state"
    script = _pull_script(state, images.v2s2)
    before = {b: registry.blob_gets(b) for b in images.layers["v2s2"]}
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    for b, n in before.items():
        assert registry.blob_gets(b) - n == 1


def _pull_script(state: Path, ref: str, kill_layer: str | None = None) -> str:
    return textwrap.dedent(f"""
        import asyncio, os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from sandbox.images import ImageService
        from sandbox.runtime import idmap
        from sandbox.images.store.unpack import Ownership
        from sandbox.tenants import Tenant
        T = Tenant("test")
        kill_layer = {kill_layer!r}
        def progress(p):
            # Killed in the middle of a layer's download, as a crash or OOM kill would.
            if p.layer == kill_layer and p.status == "downloading" and p.done < p.total:
                os.kill(os.getpid(), signal.SIGKILL)
        async def main():
            svc = ImageService(Path({str(state)!r}),
                               ownership=Ownership.for_mapping(idmap.plan()))
            try:
                await svc.pull({ref!r}, on_progress=progress, tenant=T)
            finally:
                await svc.close()
        asyncio.run(main())
    """)


def test_a_pull_killed_midway_leaves_nothing_complete_and_the_next_completes(
        session: Session, tmp_path: Path, images: Any) -> None:
    state = tmp_path / "killed"
    (layer,) = images.layers["v2s2"]
    proc = subprocess.run([sys.executable, "-c", _pull_script(state, images.v2s2, layer)],
                          timeout=120)
    assert proc.returncode == -9
    layers_dir = state / "images" / "layers" / "sha256"
    blobs_dir = state / "images" / "blobs" / "sha256"
    # Killed mid-download: no blob of that layer and no unpacked layer may exist, only
    # the partial file in tmp/.
    assert layer.split(":")[1] not in {p.name for p in blobs_dir.iterdir()}
    assert list(layers_dir.iterdir()) == []
    assert list((state / "images" / "blobs" / "tmp").iterdir())
    svc = make_service(state)
    try:
        assert list((state / "images" / "blobs" / "tmp").iterdir()) == []  # cleaned at open
        image = session.run(svc.pull(images.v2s2, tenant=T))
    finally:
        session.run(svc.close())
    assert run_echo(session, image, "after") == "after\n"


# faults between us and the registry


def _via(proxy: Any, ref: str) -> str:
    host = ref.split("/", 1)[0]
    return ref.replace(host, proxy.host, 1)


def test_a_pull_rides_out_500s_429s_and_resets(session: Session, svc: ImageService,
                                               images: Any, registry: Any,
                                               fault_proxy: Any) -> None:
    proxy = fault_proxy(registry)
    proxy.inject("GET", r"/manifests/", [Status(500), Status(429, {"Retry-After": "1"})])
    proxy.inject("GET", r"/blobs/", [Status(503), ResetAfter(1000), Truncate(500)])
    image = session.run(svc.pull(_via(proxy, images.oci), tenant=T))
    assert run_echo(session, image, "retried") == "retried\n"
    assert proxy.pending() == 0


def test_a_corrupt_blob_is_rejected_and_leaves_nothing(session: Session, svc: ImageService,
                                                       images: Any, registry: Any,
                                                       fault_proxy: Any) -> None:
    proxy = fault_proxy(registry)
    (layer,) = images.layers["zstd"]
    proxy.inject("GET", r"/blobs/" + layer, [Corrupt()] * 10)
    with pytest.raises(DigestMismatch):
        session.run(svc.pull(_via(proxy, images.zstd), tenant=T))
    assert not svc.blobs.has(layer)
    assert list(svc.blobs.tmp.iterdir()) == [] and list(svc.layers.tmp.iterdir()) == []
    assert svc.list(tenant=T) == []


def test_endless_5xx_fail_with_a_clear_error(session: Session, svc: ImageService,
                                             images: Any, registry: Any,
                                             fault_proxy: Any) -> None:
    proxy = fault_proxy(registry)
    proxy.inject("HEAD", r"/manifests/", [Status(502)] * 20)
    proxy.inject("GET", r"/manifests/", [Status(502)] * 20)
    with pytest.raises(RegistryError) as err:
        session.run(svc.pull(_via(proxy, images.oci), tenant=T))
    assert "502" in str(err.value)


def test_an_unknown_image_is_not_found(session: Session, svc: ImageService,
                                       registry: Any) -> None:
    with pytest.raises(NotFound) as err:
        session.run(svc.pull(f"{registry.host}/nope/missing:1", tenant=T))
    assert "nope/missing" in str(err.value)


# import, push, names, gc


def _rootfs_tar(session: Session, tmp_path: Path, compress: str = "") -> Path:
    from testbed import busybox
    root = busybox.build_rootfs(tmp_path / "rootfs")
    out = tmp_path / f"rootfs.tar{'.' + compress if compress else ''}"
    with tarfile.open(out, f"w:{compress}" if compress else "w") as tar:
        tar.add(root, arcname=".")
    return out


@pytest.mark.parametrize("compress", ["", "gz"])
def test_import_a_rootfs_tar_and_run_it(session: Session, svc: ImageService,
                                        tmp_path: Path, compress: str) -> None:
    tar = _rootfs_tar(session, tmp_path, compress)
    image = session.run(svc.import_tar(tar, "local/imported:1", cmd=["busybox", "sh"],
                                       env={"PATH": "/bin", "GREETING": "hi"},
                                       working_dir="/tmp", tenant=T))
    assert image.defaults.argv == ("busybox", "sh")
    assert image.defaults.env["GREETING"] == "hi" and image.defaults.cwd == "/tmp"
    assert run_echo(session, image, "imported") == "imported\n"
    assert "docker.io/local/imported:1" in image.names


def _skopeo_layout(tmp_path: Path, ref: str) -> Path:
    """The image as an OCI layout tagged v1, written by skopeo."""
    layout = tmp_path / "layout"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                    f"docker://{ref}", f"oci:{layout}:v1"], check=True,
                   capture_output=True, env=_skopeo_env(tmp_path))
    return layout


def test_import_an_oci_layout_written_by_skopeo(session: Session, svc: ImageService,
                                                tmp_path: Path, images: Any) -> None:
    layout = _skopeo_layout(tmp_path, images.oci)
    image = session.run(svc.import_layout(layout, "local/from-layout:v1", name="v1", tenant=T))
    assert image.digest == images.digests["oci"]
    assert run_echo(session, image, "layout") == "layout\n"


def test_a_layout_blob_that_is_a_symlink_is_refused(session: Session, svc: ImageService,
                                                    tmp_path: Path, images: Any) -> None:
    layout = _skopeo_layout(tmp_path, images.oci)
    layer = layout / "blobs" / "sha256" / images.layers["oci"][0].split(":")[1]
    layer.unlink()
    layer.symlink_to("/etc/passwd")
    with pytest.raises(ImageError):
        session.run(svc.import_layout(layout, "local/evil:v1", tenant=T))
    assert svc.list(tenant=T) == []


def test_push_then_pull_back_from_a_fresh_store(session: Session, svc: ImageService,
                                                tmp_path: Path, images: Any,
                                                registry: Any) -> None:
    pulled = session.run(svc.pull(images.v2s2, tenant=T))
    target = f"{registry.host}/pushed/busybox:copy"
    before = len(registry.requests())
    digest = session.run(svc.push(images.v2s2, target, tenant=T))
    assert digest == pulled.digest
    sent = registry.requests()[before:]
    # Same registry, other repository: blobs are mounted across (POST answered 201), not
    # uploaded again (an upload is a POST answered 202, then a PUT).
    mounts = [s for m, p, s in sent if m == "POST" and p.endswith("/blobs/uploads/")]
    assert mounts and set(mounts) == {201}, sent
    assert not any(m in ("PUT", "PATCH") and "/blobs/uploads/" in p for m, p, _ in sent), sent
    fresh = make_service(tmp_path / "fresh")
    try:
        back = session.run(fresh.pull(target, tenant=T))
    finally:
        session.run(fresh.close())
    assert back.digest == digest


def test_push_an_imported_image_that_skopeo_can_read(session: Session, svc: ImageService,
                                                     tmp_path: Path, registry: Any) -> None:
    tar = _rootfs_tar(session, tmp_path, "gz")
    image = session.run(svc.import_tar(tar, "local/up:1", cmd=["sh"], tenant=T))
    target = f"{registry.host}/imported/up:1"
    session.run(svc.push("local/up:1", target, tenant=T))
    assert _digest_of(target) == image.digest


def test_tag_list_inspect_remove_and_gc(session: Session, svc: ImageService,
                                        images: Any) -> None:
    image = session.run(svc.pull(images.oci, tenant=T))
    name = svc.tag(images.oci, "mine/alias:1", tenant=T)
    assert name == "docker.io/mine/alias:1"
    (summary,) = svc.list(tenant=T)
    assert set(summary.names) >= {name} and summary.digest == image.digest
    info = svc.inspect("mine/alias:1", tenant=T)
    assert info["digest"] == image.digest and info["layers"]
    assert svc.inspect(image.config_digest, tenant=T)["digest"] == image.digest
    assert svc.remove("mine/alias:1", tenant=T) == [name]
    assert svc.list(tenant=T)  # still named by its pull reference
    svc.lease(image.digest, "container-x")
    with pytest.raises(ImageError):
        svc.remove(image.digest, tenant=T)
    svc.release("container-x")
    svc.remove(image.digest, tenant=T)
    assert svc.list(tenant=T) == []
    assert svc.blobs.digests() == [] and svc.layers.diff_ids() == []
    with pytest.raises(NotFound):
        session.run(svc.resolve(images.oci, tenant=T))


def test_gc_frees_images_nobody_names(session: Session, svc: ImageService,
                                      images: Any) -> None:
    a = session.run(svc.pull(images.shared_a, tenant=T))
    b = session.run(svc.pull(images.shared_b, tenant=T))
    svc.catalog.remove_name(T.id, str(parse(images.shared_b)))
    report = svc.gc(budget_bytes=1 << 40, tenant=T)
    assert report.images == [] and report.freed_bytes > 0  # nothing of T's had to go
    assert svc.catalog.image(b.digest) is None
    assert session.run(svc.resolve(images.shared_a, tenant=T)).digest == a.digest
    assert all(p.is_dir() for p in a.layers)


def test_without_overlay_layers_are_flattened_into_one_root(session: Session, tmp_path: Path,
                                                            images: Any) -> None:
    svc = make_service(tmp_path / "flat", overlay=False)
    try:
        image = session.run(svc.pull(images.shared_a, tenant=T))
    finally:
        session.run(svc.close())
    assert len(image.layers) == 1
    assert run_echo(session, image, "flat") == "flat\n"


def test_hostile_import_tar_is_rejected_and_leaves_no_image(session: Session,
                                                            svc: ImageService) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
        link = tarfile.TarInfo("hard")
        link.type = tarfile.LNKTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    buf.seek(0)
    with pytest.raises(ImageError):
        session.run(svc.import_tar(buf, "local/evil:1", tenant=T))
    assert svc.list(tenant=T) == [] and svc.layers.diff_ids() == []


# the image config's User


def test_a_named_user_is_looked_up_in_the_image(session: Session, svc: ImageService,
                                                tmp_path: Path) -> None:
    from testbed import busybox
    root = busybox.build_rootfs(tmp_path / "rootfs")
    (root / "etc/passwd").write_text(busybox.PASSWD + "app:x:1234:2345::/:/bin/sh\n")
    tar = tmp_path / "app.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    image = session.run(svc.import_tar(tar, "local/app:1", user="app", tenant=T))
    assert svc.user_ids(image) == (1234, 2345)
    assert svc.user_ids(image, "1000:1000") == (1000, 1000)
    with pytest.raises(ImageError, match="does not exist in the image"):
        svc.user_ids(image, "ghost")
    uid, gid = svc.user_ids(image)
    c = session.container(list(image.layers))
    try:
        res = session.run(c.exec(ExecRequest(argv=["id", "-u"], env={"PATH": "/bin"},
                                             uid=uid, gid=gid)))
    finally:
        session.run(c.destroy())
        session.containers.remove(c)
    assert res.stdout == b"1234\n"


# hostile manifests, served by the real registry


async def _push_raw(registry: Any, repo: str, tag: str, blobs: list[bytes],
                    manifest: dict[str, Any], media_type: str) -> str:
    ref = parse(f"{registry.host}/{repo}:{tag}")
    async with RegistryClient(RegistriesConfig(), retry=FAST_RETRY) as client:
        for blob in blobs:
            d = digests.of_bytes(blob)
            if not await client.blob_exists(ref, d):
                path = Path(f"/tmp/sandboxd-test-blob-{os.getpid()}")
                path.write_bytes(blob)
                try:
                    await client.upload_blob(ref, d, len(blob), path)
                finally:
                    path.unlink()
        body = json.dumps(manifest).encode()
        await client.put_manifest(ref, media_type, body)
    return str(ref)


def _desc(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digests.of_bytes(data), "size": len(data),
            **extra}


def _layer_tgz(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue()), raw.getvalue()


def _config(diff_ids: list[str]) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def _assert_nothing_installed(svc: ImageService) -> None:
    assert svc.list(tenant=T) == [] and svc.layers.diff_ids() == []
    assert list(svc.blobs.tmp.iterdir()) == [] and list(svc.layers.tmp.iterdir()) == []


def test_a_layer_that_unpacks_to_another_diff_id_is_rejected(session: Session,
                                                             svc: ImageService,
                                                             registry: Any) -> None:
    blob, _ = _layer_tgz({"hello": b"hi"})
    config = _config([digests.of_bytes(b"some other tar")])
    ref = session.run(_push_raw(registry, "hostile/diffid", "1", [blob, config], {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": _desc(OCI_CONFIG, config), "layers": [_desc(OCI_LAYER_GZIP, blob)]},
        OCI_MANIFEST))
    with pytest.raises(DigestMismatch, match="image config lists"):
        session.run(svc.pull(ref, tenant=T))
    _assert_nothing_installed(svc)


def test_descriptor_sizes_that_lie_are_refused(session: Session, svc: ImageService,
                                               registry: Any, images: Any) -> None:
    blob, tar = _layer_tgz({"hello": b"hi"})
    config = _config([digests.of_bytes(tar)])
    small = _desc(OCI_LAYER_GZIP, blob)
    small["size"] -= 1
    ref = session.run(_push_raw(registry, "hostile/size", "1", [blob, config], {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": _desc(OCI_CONFIG, config), "layers": [small]}, OCI_MANIFEST))
    with pytest.raises(ImageError):
        session.run(svc.pull(ref, tenant=T))
    _assert_nothing_installed(svc)
    # An index entry whose size lies about the manifest it names.
    child = images.platforms[images.native_platform]
    raw = next(m for m in _index(images)["manifests"] if m["digest"] == child)
    ref = session.run(_push_raw(registry, "test/busybox", "lying-index", [], {
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{**raw, "size": raw["size"] + 7}]}, OCI_INDEX))
    with pytest.raises(DigestMismatch, match="descriptor says"):
        session.run(svc.pull(ref, tenant=T))
    _assert_nothing_installed(svc)


def _index_bytes(images: Any) -> bytes:
    return subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{images.multi}"],
        check=True, capture_output=True, env=_skopeo_env()).stdout


def _index(images: Any) -> dict[str, Any]:
    return json.loads(_index_bytes(images))


def test_an_index_nested_too_deep_is_refused(session: Session, svc: ImageService,
                                             registry: Any, images: Any) -> None:
    body = _index_bytes(images)
    for depth in range(6):
        entry = {"mediaType": OCI_INDEX, "digest": digests.of_bytes(body), "size": len(body),
                 "platform": {"os": "linux", "architecture": Platform.host().architecture}}
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        session.run(_push_raw(registry, "test/busybox", f"nest{depth}", [], doc, OCI_INDEX))
        body = json.dumps(doc).encode()
    with pytest.raises(ManifestError, match="nest"):
        session.run(svc.pull(f"{registry.host}/test/busybox:nest5", tenant=T))
    _assert_nothing_installed(svc)
    # Within the bound it resolves.
    image = session.run(svc.pull(f"{registry.host}/test/busybox:nest1", tenant=T))
    assert image.digest == images.platforms[images.native_platform]


# registries that want credentials


def test_pulls_from_registries_with_basic_and_token_auth(session: Session, tmp_path: Path,
                                                         auth_images: Any,
                                                         basic_registry: Any,
                                                         token_registry: Any) -> None:
    from sandbox.images.registry.config import RegistryConfig
    config = RegistriesConfig({
        r.host: RegistryConfig(r.host, username=r.username, password=r.password)
        for r in (basic_registry, token_registry)})
    svc = ImageService(tmp_path / "auth", ownership=_ownership(),
                       client=RegistryClient(config, retry=FAST_RETRY))
    anonymous = make_service(tmp_path / "anon")
    try:
        for ref in (auth_images.basic, auth_images.token_private, auth_images.token_public):
            image = session.run(svc.pull(ref, tenant=T))
            assert image.digest == auth_images.digest
        assert run_echo(session, image, "authed") == "authed\n"
        public = session.run(anonymous.pull(auth_images.token_public, tenant=T))
        assert public.digest == image.digest
        for ref in (auth_images.basic, auth_images.token_private):
            with pytest.raises(RegistryError):
                session.run(anonymous.pull(ref, tenant=T))
    finally:
        session.run(svc.close())
        session.run(anonymous.close())


def test_resolve_answers_from_memory_until_the_catalog_changes(session: Session,
                                                               svc: ImageService,
                                                               images: Any) -> None:
    session.run(svc.pull(images.oci, tenant=T))
    first = session.run(svc.resolve(images.oci, tenant=T))
    assert session.run(svc.resolve(images.oci, tenant=T)) is first
    svc.tag(images.oci, "mine/again:1", tenant=T)
    again = session.run(svc.resolve(images.oci, tenant=T))
    assert again is not first and "docker.io/mine/again:1" in again.names
    svc.remove(images.oci, tenant=T)
    svc.remove("mine/again:1", tenant=T)
    with pytest.raises(NotFound):
        session.run(svc.resolve(images.oci, tenant=T))
