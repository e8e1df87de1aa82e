"""The pull benchmark: `python -m loadtest.pull [--mb 100] [--layers 4] [--repeat 3]`.

A multi-layer image of about `--mb` MB (gzip layers of many files, half random, half text)
is written as an OCI layout and pushed by skopeo to a throwaway loopback registry. Then, in
the same run and alternating, each `--repeat` times into empty directories:

- sandboxd cold pull: `ImageService.pull` (manifest, config, layers downloaded, verified and
  unpacked into overlay lower directories);
- skopeo: `skopeo copy docker://… oci:DIR` (downloaded and verified, not unpacked);
- skopeo + umoci: the same copy, then `umoci unpack --rootless` (what a rootless runtime
  needs before it can start a container), when umoci is installed;

and a cached re-pull of the tag (HEAD of the manifest, local lookups), with the blob bytes
the registry served meanwhile. A pull's bare equivalent is skopeo; beside the cached
re-pull, the machine's own speed in the same run: the tight bare loops of busybox `true`
(loadtest.baseline) and the ratio to the fastest. Figures and ratios only; the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest.baseline import Command, flat, measure
from loadtest.http.service import stop_on_sigterm
from loadtest.output import emit
from sandbox.images import ImageService
from sandbox.images.store.unpack import Ownership
from sandbox.runtime import idmap
from sandbox.tenants import LOCAL
from testbed import busybox
from testbed.registry import LocalRegistry, start_registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


@dataclass(frozen=True)
class BenchImage:
    ref: str
    compressed_bytes: int
    unpacked_bytes: int
    files: int
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...]


def _layer(rng: random.Random, target: int, index: int) -> tuple[bytes, bytes, int]:
    """(gzip blob, tar, file count): files of 1-64 KiB, half random and half text."""
    raw = io.BytesIO()
    files = 0
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        written = 0
        while written < target:
            size = rng.randint(1 << 10, 64 << 10)
            half = size // 2
            unit = f"layer {index} file {files} ".encode()
            text = (unit * (half // len(unit) + 1))[:half]
            data = rng.randbytes(size - half) + text
            info = tarfile.TarInfo(f"usr/share/bench{index}/d{files % 50}/f{files}")
            info.size = size
            info.mode = 0o644
            info.mtime = 1_700_000_000
            if files % 50 == 0:
                d = tarfile.TarInfo(f"usr/share/bench{index}/d{files % 50}")
                d.type = tarfile.DIRTYPE
                d.mode = 0o755
                tar.addfile(d)
            tar.addfile(info, io.BytesIO(data))
            written += size
            files += 1
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), tar_bytes, files


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_image(workdir: Path, registry: LocalRegistry, mb: int, layers: int) -> BenchImage:
    """An OCI layout written here, pushed by skopeo (an independent client)."""
    rng = random.Random(1234)
    layout = workdir / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        d = _digest(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    # Target ~mb MB compressed: the random half does not compress.
    per_layer = (mb << 20) * 2 // layers
    descs, diff_ids, sizes = [], [], []
    unpacked = files = 0
    for i in range(layers):
        blob, tar_bytes, n = _layer(rng, per_layer, i)
        descs.append({"mediaType": OCI_LAYER_GZIP, "digest": put(blob), "size": len(blob)})
        diff_ids.append(_digest(tar_bytes))
        sizes.append(len(blob))
        unpacked += len(tar_bytes)
        files += n
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": put(config),
                                      "size": len(config)},
                           "layers": descs}).encode()
    mdigest = put(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": mdigest, "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}))
    ref = f"{registry.host}/bench/big:1"
    _skopeo(workdir, "copy", f"oci:{layout}:bench", f"docker://{ref}",
            "--dest-tls-verify=false")
    shutil.rmtree(layout)
    return BenchImage(ref, sum(sizes), unpacked, files,
                      tuple(d["digest"] for d in descs), tuple(sizes))


def _skopeo(workdir: Path, *args: str) -> None:
    env = {**os.environ, "HOME": str(workdir), "XDG_RUNTIME_DIR": str(workdir)}
    subprocess.run(["skopeo", "--insecure-policy", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


async def _ours_cold(state: Path, ref: str, ownership: Ownership) -> float:
    async with ImageService(state, ownership=ownership) as svc:
        t0 = time.perf_counter()
        await svc.pull(ref, tenant=LOCAL)
        return time.perf_counter() - t0


async def _ours_cached(state: Path, ref: str, ownership: Ownership, n: int) -> list[float]:
    async with ImageService(state, ownership=ownership) as svc:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await svc.pull(ref, tenant=LOCAL)
            times.append(time.perf_counter() - t0)
        return times


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def run(mb: int, layers: int, repeat: int, cached_n: int, quiet: bool) -> dict[str, object]:
    ownership = Ownership.for_mapping(idmap.plan())
    umoci = shutil.which("umoci") is not None
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-pull-") as tmp:
        work = Path(tmp)
        with start_registry(work / "registry") as registry:
            image = build_image(work, registry, mb, layers)
            if not quiet:
                print(f"image: {len(image.layer_sizes)} layers, "
                      f"{image.compressed_bytes / 1e6:.1f} MB compressed, "
                      f"{image.unpacked_bytes / 1e6:.1f} MB of tar, {image.files} files",
                      file=sys.stderr)
            ours, skopeo, skopeo_umoci = [], [], []
            for i in range(repeat):
                state = _fresh(work / "state")
                ours.append(asyncio.run(_ours_cold(state, image.ref, ownership)))
                shutil.rmtree(state)
                oci = _fresh(work / "oci")
                skopeo.append(_timed(lambda oci=oci: _skopeo(
                    work, "copy", "--src-tls-verify=false", f"docker://{image.ref}",
                    f"oci:{oci}:bench")))
                if umoci:
                    bundle = _fresh(work / "bundle")
                    t = _timed(lambda oci=oci, bundle=bundle: subprocess.run(
                        ["umoci", "unpack", "--rootless", "--image", f"{oci}:bench",
                         str(bundle)], check=True, capture_output=True))
                    skopeo_umoci.append(skopeo[-1] + t)
                    shutil.rmtree(bundle)
                shutil.rmtree(oci)
                if not quiet:
                    print(f"round {i + 1}: sandboxd {ours[-1]:.3f} s, skopeo "
                          f"{skopeo[-1]:.3f} s"
                          + (f", skopeo+umoci {skopeo_umoci[-1]:.3f} s" if umoci else ""),
                          file=sys.stderr)
            state = _fresh(work / "state")
            asyncio.run(_ours_cold(state, image.ref, ownership))
            served_before = len(registry.requests())
            cached = asyncio.run(_ours_cached(state, image.ref, ownership, cached_n))
            served = registry.requests()[served_before:]
            sizes = dict(zip(image.layer_digests, image.layer_sizes, strict=True))
            # Any blob served during the re-pulls counts (a config GET too, at least 1 byte).
            cached_blob_bytes = sum(max(sizes.get(p.rsplit("/", 1)[1], 0), 1)
                                    for m, p, s in served
                                    if m == "GET" and "/blobs/" in p and s < 300)
    cold = statistics.median(ours)
    sk = statistics.median(skopeo)
    cached_ms = round(statistics.median(cached) * 1000, 2)
    fig: dict[str, object] = {
        "image_mb": round(image.compressed_bytes / 1e6, 1),
        "layers": len(image.layer_sizes),
        "files": image.files,
        "cold_pull_s": round(cold, 3),
        "skopeo_s": round(sk, 3),
        "cold_vs_skopeo": round(cold / sk, 3),
        "cold_pull_mb_s": round(image.compressed_bytes / 1e6 / cold, 1),
        "cached_pull_ms": cached_ms,
        "cached_pull_p99_ms": round(sorted(cached)[int(len(cached) * 0.99) - 1] * 1000, 2),
        "cached_pull_blob_bytes": cached_blob_bytes,
        "repeat": repeat,
    }
    if skopeo_umoci:
        fig["skopeo_umoci_unpack_s"] = round(statistics.median(skopeo_umoci), 3)
    bare = flat("bare_exec", measure(Command(str(busybox.find_busybox()), ("true",)),
                                     max(cached_n, 200)))
    fig |= bare
    # From the printed figures, so a reader dividing them gets the same ratio.
    fig["cached_pull_vs_bare_exec"] = round(cached_ms / bare["bare_exec_median_ms"], 2)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.pull", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100, help="compressed image size (default 100)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="cold pulls of each kind")
    ap.add_argument("--cached", type=int, default=50, help="cached re-pulls")
    ap.add_argument("--quick", action="store_true", help="a small image, for the test suite")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    if args.quick:
        args.mb, args.layers, args.repeat, args.cached = 2, 2, 1, 5
    if min(args.mb, args.layers, args.repeat, args.cached) < 1:
        ap.error("every count must be at least 1")
    fig = run(args.mb, args.layers, args.repeat, args.cached, args.json_only)
    emit(fig, args.json_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
