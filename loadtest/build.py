"""The image-making benchmark: `python -m loadtest.build [--commits N] [--quick]`.

It starts its own loopback registry and `sandboxd serve` (as `python -m loadtest --spawn`
does) and measures, beside the bare equivalents of the same run:

- a commit over HTTP (POST /v1/containers/{id}/commit) of a session that wrote 10 MB in
  1,000 files of random bytes (the worst case for compression), each commit of a new
  session (its files written untimed); the figure is the request's time at the client, from
  the container's root to an image named, stored and ready to run;
- bare: the same 1,000 files in a host directory archived by GNU tar (`tar -cf - . >
  file`: the least a commit must do, read every file and write an archive, without any
  digest, compression or unpack), and the same piped through gzip at levels 1 and 6.

It also builds, over HTTP (POST /v1/build), the five-step Dockerfile of issue #12 (COPY,
two RUNs, ENV, CMD on the registry's busybox), and beside it in the same run:

- `buildah build` (Debian's buildah, chroot isolation, its own storage in a temporary
  directory, the base already pulled) of the same context: each build with `--no-cache`
  beside ours with `no_cache`, and an unchanged rebuild (`--layers`) beside ours (all
  steps from the cache);
- bare: the same steps as plain commands on the host (cp, two `sh -c`, in a fresh
  directory), then `tar | gzip -1` of what they wrote: what a build must at least do;
- the service's peak memory (VmHWM) over a build whose RUN writes a 256 MiB file, beside
  one that writes 1 MiB: a layer's bytes stream through, only its metadata is held.

Figures and ratios as a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.baseline import BenchError, median
from loadtest.http.service import spawned, stop_on_sigterm
from loadtest.rows import Row, table

FILES = 1000
FILE_BYTES = 10 * 1024           # 1,000 files of 10 KiB: 10 MB
WRITE = ("mkdir -p /data && i=0; while [ $i -lt {n} ]; do "
         "head -c {size} /dev/urandom > /data/f$i; i=$((i+1)); done")


async def _commit_once(s: aiohttp.ClientSession, image: str, i: int, files: int) -> float:
    async with s.post("/v1/containers", json={"image": image, "policy": "default"}) as r:
        if r.status != 201:
            raise BenchError(f"cannot create a session: {r.status} {await r.text()}")
        sid = (await r.json())["id"]
    try:
        async with s.post(f"/v1/containers/{sid}/exec", json={
                "cmd": ["sh", "-c", WRITE.format(n=files, size=FILE_BYTES)],
                "env": {"PATH": "/bin"}, "user": "0", "limits": {"wall_ms": 120_000}}) as r:
            out = await r.json()
            if r.status != 200 or out.get("status") != "ok":
                raise BenchError(f"writing the files failed: {out}")
        t0 = time.perf_counter()
        async with s.post(f"/v1/containers/{sid}/commit",
                          json={"reference": f"bench/commit:{i}"}) as r:
            if r.status != 201:
                raise BenchError(f"commit failed: {r.status} {await r.text()}")
            await r.read()
        return (time.perf_counter() - t0) * 1000
    finally:
        async with s.delete(f"/v1/containers/{sid}"):
            pass


async def _commits(url: str, image: str, n: int, files: int) -> list[float]:
    async with aiohttp.ClientSession(url) as s:
        await _commit_once(s, image, n, files)  # untimed: the first pull, warm pools
        return [await _commit_once(s, image, i, files) for i in range(n)]


def _bare_tar(n: int, files: int, level: int | None) -> list[float]:
    """`tar -cf - . > out` (level None), or `tar -cf - . | gzip -LEVEL > out`, of the same
    files, fresh each time (page cache warm, as the container's files are), in ms."""
    work = Path(tempfile.mkdtemp(prefix="sandboxd-bench-build-"))
    try:
        data = work / "data"
        data.mkdir()
        for i in range(files):
            (data / f"f{i}").write_bytes(os.urandom(FILE_BYTES))
        command = (f"tar -C {data} -cf - . > {work}/out.tar" if level is None else
                   f"tar -C {data} -cf - . | gzip -{level} > {work}/out.tar.gz")
        times = []
        for _ in range(n + 1):
            t0 = time.perf_counter()
            subprocess.run(command, shell=True, check=True)
            times.append((time.perf_counter() - t0) * 1000)
        return times[1:]
    finally:
        shutil.rmtree(work, ignore_errors=True)


FIVE_STEPS = """FROM {image}
COPY app.sh /app/
RUN chmod 755 /app/app.sh && echo built > /app/stamp
RUN echo second > /app/second
ENV GREETING=hello
CMD ["/app/app.sh"]
"""
APP = b"#!/bin/sh\necho \"$GREETING from $(cat /app/stamp)\"\n"
BIG_RUN = "FROM {image}\nRUN head -c {size} /dev/zero > /big\n"


def _context(dockerfile: str, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"Dockerfile": dockerfile.encode(), **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def _build_once(s: aiohttp.ClientSession, body: bytes, no_cache: bool) -> float:
    t0 = time.perf_counter()
    async with s.post("/v1/build", data=body, params={"tag": "bench/build:1", "no_cache":
                                                      "true" if no_cache else "false"},
                      headers={"Content-Type": "application/x-tar"}) as r:
        lines = (await r.read()).splitlines()
    took = (time.perf_counter() - t0) * 1000
    last = json.loads(lines[-1]) if lines else {}
    if r.status != 200 or last.get("event") != "image":
        raise BenchError(f"the build failed: {r.status} {lines[-3:]}")
    return took


async def _builds(url: str, image: str, n: int) -> tuple[list[float], list[float]]:
    body = _context(FIVE_STEPS.format(image=image), {"app.sh": APP})
    async with aiohttp.ClientSession(url) as s:
        await _build_once(s, body, True)  # untimed: the base's pull
        cold = [await _build_once(s, body, True) for _ in range(n)]
        cached = [await _build_once(s, body, False) for _ in range(n)]
    return cold, cached


async def _peak_build(svc: Any, size: int) -> int:
    """The service's peak RSS growth (bytes) over one build whose RUN writes `size` bytes."""
    status = Path(f"/proc/{svc.pid}/status")
    body = _context(BIG_RUN.format(image=svc.image, size=size))
    async with aiohttp.ClientSession(svc.url) as s:
        rss = _status_kib(status, "VmRSS")
        Path(f"/proc/{svc.pid}/clear_refs").write_text("5")
        await _build_once(s, body, True)
    return (_status_kib(status, "VmHWM") - rss) * 1024


def _status_kib(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in {status}")


def _buildah(image: str, n: int) -> tuple[list[float], list[float]] | str:
    """buildah's no-cache builds and cached rebuilds of the same context (ms), or why it
    could not run."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (apt-get install buildah)"
    if os.geteuid() != 0:
        return "buildah runs here as root only (rootless buildah needs its own id maps)"
    work = Path(tempfile.mkdtemp(prefix="sandboxd-bench-buildah-"))
    try:
        ctx = work / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(FIVE_STEPS.format(image=image))
        (ctx / "app.sh").write_bytes(APP)
        base = ["buildah", "--root", str(work / "root"), "--runroot", str(work / "run"),
                "--storage-driver", "overlay"]
        subprocess.run([*base, "pull", "--tls-verify=false", "-q", image], check=True,
                       capture_output=True)

        def once(*flags: str) -> float:
            t0 = time.perf_counter()
            subprocess.run([*base, "build", "--isolation", "chroot", "--tls-verify=false",
                            "-q", *flags, "-t", "bench", str(ctx)], check=True,
                           capture_output=True)
            return (time.perf_counter() - t0) * 1000
        once("--layers")
        cold = [once("--no-cache") for _ in range(n)]
        once("--layers")
        cached = [once("--layers") for _ in range(n)]
        return cold, cached
    except subprocess.CalledProcessError as e:
        return f"buildah failed: {e.stderr.decode(errors='replace')[-300:]}"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def _bare_steps(n: int) -> list[float]:
    """The five steps as host commands in a fresh directory, then `tar | gzip -1` of what
    they wrote (ms)."""
    times = []
    for _ in range(n + 1):
        work = Path(tempfile.mkdtemp(prefix="sandboxd-bench-bare-"))
        try:
            (work / "ctx").mkdir()
            (work / "ctx/app.sh").write_bytes(APP)
            t0 = time.perf_counter()
            subprocess.run(
                f"mkdir -p {work}/root/app && cp {work}/ctx/app.sh {work}/root/app/ && "
                f"sh -c 'chmod 755 {work}/root/app/app.sh && echo built > "
                f"{work}/root/app/stamp' && sh -c 'echo second > {work}/root/app/second' && "
                f"tar -C {work}/root -cf - . | gzip -1 > {work}/layer.tar.gz",
                shell=True, check=True)
            times.append((time.perf_counter() - t0) * 1000)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return times[1:]


def run(commits: int, files: int, builds: int, big: int) -> tuple[list[Row], dict[str, Any]]:
    with spawned(2) as svc:
        made = asyncio.run(_commits(svc.url, svc.image, commits, files))
        cold, cached = asyncio.run(_builds(svc.url, svc.image, builds))
        small_peak = asyncio.run(_peak_build(svc, 1 << 20))
        big_peak = asyncio.run(_peak_build(svc, big))
        buildah = _buildah(svc.image, builds)
    bare_steps = _bare_steps(builds)
    plain = _bare_tar(commits, files, None)
    fast, default = _bare_tar(commits, files, 1), _bare_tar(commits, files, 6)
    fig = {"files": files, "file_bytes": FILE_BYTES, "commits": commits,
           "commit_median_ms": round(median(made), 1),
           "commit_min_ms": round(min(made), 1), "commit_max_ms": round(max(made), 1),
           "bare_tar_median_ms": round(median(plain), 1),
           "bare_tar_gzip1_median_ms": round(median(fast), 1),
           "bare_tar_gzip6_median_ms": round(median(default), 1)}
    size = f"{files * FILE_BYTES / 1e6:g} MB in {files} files"
    bases = (("tar", fig["bare_tar_median_ms"]),
             ("tar|gzip -1", fig["bare_tar_gzip1_median_ms"]),
             ("tar|gzip -6", fig["bare_tar_gzip6_median_ms"]))
    rows = [Row(f"commit of a session that wrote {size} (ms)", fig["commit_median_ms"], bases),
            Row("  the fastest commit (ms)", fig["commit_min_ms"], bases),
            Row("  the slowest commit (ms)", fig["commit_max_ms"], bases)]
    fig.update(builds=builds, build_median_ms=round(median(cold), 1),
               rebuild_median_ms=round(median(cached), 1),
               bare_steps_median_ms=round(median(bare_steps), 1),
               build_peak_small_bytes=small_peak, build_peak_big_bytes=big_peak,
               big_layer_bytes=big)
    build_bases: tuple[tuple[str, float], ...] = (("bare steps", fig["bare_steps_median_ms"]),)
    rebuild_bases = build_bases
    if isinstance(buildah, str):
        fig["buildah"] = buildah
    else:
        fig.update(buildah_build_median_ms=round(median(buildah[0]), 1),
                   buildah_rebuild_median_ms=round(median(buildah[1]), 1))
        build_bases = (("buildah --no-cache", fig["buildah_build_median_ms"]), *build_bases)
        rebuild_bases = (("buildah --layers", fig["buildah_rebuild_median_ms"]),
                         *rebuild_bases)
    rows += [Row("build of the five-step Dockerfile, no cache (ms)", fig["build_median_ms"],
                 build_bases),
             Row("  the same, unchanged: every step cached (ms)", fig["rebuild_median_ms"],
                 rebuild_bases),
             Row(f"service peak RSS growth, a RUN writing {big >> 20} MiB (MiB)",
                 round(big_peak / (1 << 20), 1),
                 (("writing 1 MiB", round(small_peak / (1 << 20), 1)),))]
    return rows, fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=7, help="timed commits (median)")
    ap.add_argument("--builds", type=int, default=5, help="timed builds (median)")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    files, big = FILES, 256 << 20
    if args.quick:
        args.commits, files, args.builds, big = 2, 20, 2, 16 << 20
    if args.commits < 1 or args.builds < 1:
        ap.error("--commits and --builds must be at least 1")
    try:
        rows, fig = run(args.commits, files, args.builds, big)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(f"sandboxd image benchmark: {args.commits} commits, {args.builds} builds, "
              "medians")
        print(table(rows))
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
