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

Figures and ratios as a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.baseline import BenchError, median
from loadtest.http.service import spawned
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


def run(commits: int, files: int) -> tuple[list[Row], dict[str, Any]]:
    with spawned(2) as svc:
        made = asyncio.run(_commits(svc.url, svc.image, commits, files))
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
    return rows, fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=7, help="timed commits (median)")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    files = FILES
    if args.quick:
        args.commits, files = 2, 20
    if args.commits < 1:
        ap.error("--commits must be at least 1")
    try:
        rows, fig = run(args.commits, files)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(f"sandboxd image benchmark: {args.commits} commits, medians")
        print(table(rows))
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
