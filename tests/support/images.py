"""Test images made by independent tools: umoci builds an OCI image from a busybox-static
root filesystem, skopeo pushes it to a registry in each format we must read.

Pushed to the registry (repository and tag -> attribute of `PushedImages`):
- test/busybox:v2s2  Docker v2 schema 2, gzip                 -> v2s2
- test/busybox:oci   OCI manifest, gzip                        -> oci
- test/busybox:zstd  OCI manifest, zstd                        -> zstd
- test/busybox:multi OCI index                                 -> multi
  entries, in order: an entry of unknown media type that claims the native platform and
  points at the other platform's manifest (a client must skip it), then linux/amd64 and
  linux/arm64/v8. Both real entries hold the host's busybox; only the non-native one's
  config says another architecture.
- test/shared-a:1, test/shared-b:1  two layers each; the bottom one (busybox, gzip) is the
  same blob in both (and in test/busybox:oci and :v2s2)          -> shared_a, shared_b
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import orjson

from testbed import busybox
from testbed.registry import LocalRegistry

TOOL_TIMEOUT_S = 120
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
UNKNOWN_MEDIA_TYPE = "application/vnd.sandboxd.test.unknown.v1+json"
MULTI_PLATFORMS = (("linux", "amd64", None), ("linux", "arm64", "v8"))
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class PushedImages:
    """References ("127.0.0.1:PORT/test/busybox:v2s2") of the images pushed, and digests.

    digests: attribute name ("v2s2", "oci", "zstd", "multi", "shared_a", "shared_b") ->
    the manifest digest the registry serves for it (the index digest for "multi").
    layers: the same names except "multi" -> layer digests, bottom first.
    platforms: "linux/amd64", "linux/arm64/v8" -> manifest digest of that entry of multi.
    native_platform: the host's platform, e.g. "linux/amd64" (its image runs here).
    layout: the OCI image layout the images came from (tags busybox, busybox-<arch>,
    shared-a, shared-b, multi); shared by the session, so copy it before changing it.
    """

    host: str
    v2s2: str
    oci: str
    zstd: str
    multi: str
    shared_a: str
    shared_b: str
    shared_layer: str
    digests: dict[str, str]
    layers: dict[str, tuple[str, ...]]
    platforms: dict[str, str]
    native_platform: str
    unknown_media_type: str
    layout: Path


class Tools:
    """Runs umoci and skopeo with a private HOME and runtime dir, as root or not."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        home, run, tmp = workdir / "home", workdir / "run", workdir / "tmp"
        for d in (home, run, tmp):
            d.mkdir(parents=True, exist_ok=True)
        run.chmod(0o700)
        self.env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "HOME": str(home), "XDG_RUNTIME_DIR": str(run),
                    "XDG_CONFIG_HOME": str(home / ".config"), "TMPDIR": str(tmp)}
        self.rootless = ["--rootless"] if os.geteuid() != 0 else []

    def run(self, *argv: str) -> str:
        try:
            done = subprocess.run(argv, env=self.env, cwd=self.workdir, capture_output=True,
                                  text=True, timeout=TOOL_TIMEOUT_S, check=False)
        except FileNotFoundError as e:
            raise RuntimeError(f"{argv[0]} is not installed; scripts/test.sh installs the "
                               f"test packages (skopeo, umoci): {e}") from e
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")
        return done.stdout

    def skopeo_copy(self, src: str, dest: str, *extra: str) -> str:
        """Copy with skopeo; returns the digest of the manifest written."""
        digest_file = self.workdir / "tmp" / "digest"
        self.run("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                 "--digestfile", str(digest_file), *extra, src, dest)
        return digest_file.read_text().strip()


def docker_hub_mirror(images: PushedImages, workdir: Path, hub: str) -> str:
    """Registry `hub` made Docker Hub for a service: the test busybox (multi-platform) in
    it as library/busybox:latest, so that an example's `busybox` is the test image; returns
    the service's config table that makes `hub` docker.io's mirror."""
    Tools(workdir).skopeo_copy(f"oci:{images.layout}:multi",
                               f"docker://{hub}/library/busybox:latest", "--all")
    return f'[registries."docker.io"]\nmirrors = ["http://{hub}"]\n'


def native_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", _GOARCH.get(machine, machine)


def build_layout(tools: Tools, layout: Path) -> None:
    """umoci: busybox (native), busybox-<other arch> for each multi platform that is not
    native, shared-a and shared-b (busybox plus one small layer each)."""
    image = f"{layout}:busybox"
    os_name, arch = native_platform()
    tools.run("umoci", "init", "--layout", str(layout))
    tools.run("umoci", "new", "--image", image)
    bundle = tools.workdir / "bundle"
    tools.run("umoci", "unpack", *tools.rootless, "--image", image, str(bundle))
    busybox.build_rootfs(bundle / "rootfs")
    tools.run("umoci", "repack", "--image", image, str(bundle))
    tools.run("umoci", "config", "--image", image, "--os", os_name, "--architecture", arch,
              "--config.cmd", "/bin/sh", "--config.env", "PATH=/bin")
    shutil.rmtree(bundle)
    for _, other, _ in MULTI_PLATFORMS:
        if other != arch:
            tools.run("umoci", "config", "--image", image, "--tag", f"busybox-{other}",
                      "--architecture", other)
    # umoci insert writes a truncated tar for a single file, so unpack, add, repack.
    for name in ("a", "b"):
        tools.run("umoci", "unpack", *tools.rootless, "--image", image, str(bundle))
        (bundle / "rootfs" / "shared").mkdir()
        (bundle / "rootfs" / "shared" / f"{name}.txt").write_text(f"image {name}\n")
        tools.run("umoci", "repack", "--image", f"{layout}:shared-{name}", str(bundle))
        shutil.rmtree(bundle)
    tools.run("umoci", "gc", "--layout", str(layout))


def _tagged(layout: Path, tag: str) -> dict[str, object]:
    index = orjson.loads((layout / "index.json").read_bytes())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(entry)
    raise RuntimeError(f"no tag {tag} in {layout}")


def _write_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def add_index(layout: Path, tag: str, entries: list[dict[str, object]]) -> bytes:
    """Write an OCI index of `entries` into the layout under `tag`; returns its bytes."""
    data = orjson.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    digest = _write_blob(layout, data)
    index_path = layout / "index.json"
    index = orjson.loads(index_path.read_bytes())
    index["manifests"].append({"mediaType": OCI_INDEX, "digest": digest, "size": len(data),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_bytes(orjson.dumps(index))
    return data


def _platform_entries(layout: Path) -> tuple[list[dict[str, object]], dict[str, str], str]:
    """The index entries for MULTI_PLATFORMS, their platform -> manifest digest, and the
    platform name of the native one ("" if the host is neither)."""
    _, arch = native_platform()
    entries, platforms, native = [], {}, ""
    for os_name, entry_arch, variant in MULTI_PLATFORMS:
        tag = "busybox" if entry_arch == arch else f"busybox-{entry_arch}"
        manifest = _tagged(layout, tag)
        plat: dict[str, str] = {"os": os_name, "architecture": entry_arch}
        if variant:
            plat["variant"] = variant
        entries.append({"mediaType": OCI_MANIFEST, "digest": manifest["digest"],
                        "size": manifest["size"], "platform": plat})
        name = "/".join(v for v in (os_name, entry_arch, variant) if v)
        platforms[name] = str(manifest["digest"])
        if entry_arch == arch:
            native = name
    return entries, platforms, native


def _put_manifest(registry: LocalRegistry, repo: str, tag: str, media_type: str,
                  data: bytes) -> None:
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{tag}", data=data,
                                 method="PUT", headers={"Content-Type": media_type})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as resp:
        if resp.status != 201:
            raise RuntimeError(f"PUT of {repo}:{tag} answered {resp.status}")


def _get_manifest(registry: LocalRegistry, repo: str, ref: str) -> dict[str, object]:
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{ref}", headers={
        "Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}, {OCI_INDEX}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as resp:
        return dict(orjson.loads(resp.read()))


def build_and_push(registry: LocalRegistry, workdir: Path) -> PushedImages:
    """Build the test images under `workdir` and push them to `registry` (plain HTTP, no
    auth)."""
    tools = Tools(workdir)
    layout = workdir / "layout"
    build_layout(tools, layout)
    entries, platforms, native = _platform_entries(layout)
    add_index(layout, "multi", entries)
    zstd_layout = workdir / "layout-zstd"
    tools.skopeo_copy(f"oci:{layout}:busybox", f"oci:{zstd_layout}:busybox",
                      "--dest-compress", "--dest-compress-format", "zstd")

    host = registry.host
    repo = "test/busybox"
    refs = {"v2s2": f"{host}/{repo}:v2s2", "oci": f"{host}/{repo}:oci",
            "zstd": f"{host}/{repo}:zstd", "multi": f"{host}/{repo}:multi",
            "shared_a": f"{host}/test/shared-a:1", "shared_b": f"{host}/test/shared-b:1"}
    digests = {
        "v2s2": tools.skopeo_copy(f"oci:{layout}:busybox", f"docker://{refs['v2s2']}",
                                  "--format", "v2s2"),
        "oci": tools.skopeo_copy(f"oci:{layout}:busybox", f"docker://{refs['oci']}",
                                 "--format", "oci", "--preserve-digests"),
        "zstd": tools.skopeo_copy(f"oci:{zstd_layout}:busybox", f"docker://{refs['zstd']}",
                                  "--preserve-digests"),
        "shared_a": tools.skopeo_copy(f"oci:{layout}:shared-a",
                                      f"docker://{refs['shared_a']}", "--preserve-digests"),
        "shared_b": tools.skopeo_copy(f"oci:{layout}:shared-b",
                                      f"docker://{refs['shared_b']}", "--preserve-digests"),
    }
    # skopeo pushes both platform manifests; the index with the extra entry is ours, since
    # skopeo would rewrite or refuse an entry of unknown type.
    tools.skopeo_copy(f"oci:{layout}:multi", f"docker://{refs['multi']}", "--all",
                      "--preserve-digests")
    # The unknown entry claims the host's platform but names another platform's manifest:
    # a client that ignores media types picks the wrong image.
    other = next(d for p, d in platforms.items() if p != native)
    unknown = {"mediaType": UNKNOWN_MEDIA_TYPE, "digest": other,
               "size": len(_raw_manifest(layout, other)),
               "platform": dict(zip(("os", "architecture"), native_platform(), strict=True))}
    index = orjson.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                          "manifests": [unknown, *entries]})
    _put_manifest(registry, repo, "multi", OCI_INDEX, index)
    digests["multi"] = f"sha256:{hashlib.sha256(index).hexdigest()}"

    layers: dict[str, tuple[str, ...]] = {}
    for name, ref in refs.items():
        if name == "multi":
            continue
        repo_name, _, tag = ref[len(host) + 1:].rpartition(":")
        layers[name] = _layer_digests(_get_manifest(registry, repo_name, tag))
    shared = layers["shared_a"][0]
    if layers["shared_b"][0] != shared or layers["shared_a"][1] == layers["shared_b"][1]:
        raise RuntimeError(f"the shared images do not share exactly one layer: {layers}")
    return PushedImages(
        host=host, **refs, shared_layer=shared, digests=digests, layers=layers,
        platforms=platforms, native_platform=native or "/".join(native_platform()),
        unknown_media_type=UNKNOWN_MEDIA_TYPE, layout=layout)


def _layer_digests(manifest: dict[str, object]) -> tuple[str, ...]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise RuntimeError(f"the registry served a manifest without layers: {manifest}")
    return tuple(str(layer["digest"]) for layer in layers)


def _raw_manifest(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


@dataclass(frozen=True)
class AuthImages:
    """test/busybox:oci copied into the registries that want credentials; all three have
    the manifest digest `digest` (that of `PushedImages.oci`)."""

    basic: str  # basic_registry: private/busybox:1
    token_public: str  # token_registry: public/busybox:1, pullable anonymously
    token_private: str  # token_registry: private/busybox:1
    digest: str


def copy_to_auth_registries(images: PushedImages, basic: LocalRegistry,
                            token: LocalRegistry, workdir: Path) -> AuthImages:
    tools = Tools(workdir)
    refs = AuthImages(basic=f"{basic.host}/private/busybox:1",
                      token_public=f"{token.host}/public/busybox:1",
                      token_private=f"{token.host}/private/busybox:1",
                      digest=images.digests["oci"])
    for registry, ref in ((basic, refs.basic), (token, refs.token_public),
                          (token, refs.token_private)):
        digest = tools.skopeo_copy(f"docker://{images.oci}", f"docker://{ref}",
                                   "--src-tls-verify=false", "--preserve-digests",
                                   "--dest-creds", f"{registry.username}:{registry.password}")
        if digest != refs.digest:
            raise RuntimeError(f"skopeo changed the manifest copying to {ref}: {digest}")
    return refs
