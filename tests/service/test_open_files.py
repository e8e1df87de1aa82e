"""A service started with a low soft limit on open files (Debian's is 1024, for a shell and
for a systemd unit alike) still holds many warm containers: each keeps descriptors in the
service (its control socket, its cgroups' files), so sandboxd raises its soft limit to the
hard one at start, as dockerd and Go programs do. Runs keep their policy's own limit."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.service.conftest import start_service, stop, wait_ready

SOFT, HARD = 64, 4096
SESSIONS = 12   # ~8-14 descriptors each: far past a soft limit of 64

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")


def _limits(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/limits").read_text()
    m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.M)
    assert m is not None, text
    return int(m.group(1)), int(m.group(2))


def test_many_warm_containers_under_a_low_soft_limit(images: Any, tmp_path: Path) -> None:
    proc, log = start_service(tmp_path, "[server]\nshutdown_deadline_s = 2\n",
                              launcher=("prlimit", f"--nofile={SOFT}:{HARD}", "--"))
    try:
        url = wait_ready(proc, log)
        assert _limits(proc.pid) == (HARD, HARD)

        async def go() -> list[tuple[int, str]]:
            out = []
            async with aiohttp.ClientSession(url) as s:
                ids = []
                for _ in range(SESSIONS):
                    async with s.post("/v1/containers", json={"image": images.oci}) as r:
                        assert r.status == 201, await r.text()
                        ids.append((await r.json())["id"])
                for sid in ids:
                    async with s.post(f"/v1/containers/{sid}/exec", json={
                            "cmd": ["sh", "-c", "ulimit -n"], "env": {"PATH": "/bin"}}) as r:
                        body = await r.json()
                        out.append((r.status, body.get("stdout", body.get("message"))))
                for sid in ids:
                    async with s.delete(f"/v1/containers/{sid}") as r:
                        assert r.status == 204
            return out

        answers = asyncio.run(go())
        # Each ran, with the default policy's open_files, not the service's raised limit.
        assert answers == [(200, "1024\n")] * SESSIONS, answers
    finally:
        stop(proc, log)


def test_out_of_descriptors_is_a_503_to_retry_and_the_service_recovers(
        images: Any, tmp_path: Path) -> None:
    """Where the hard limit itself is low, the request that finds no descriptor free is a
    503 over_capacity with Retry-After (not a 500), and the service serves again once
    sessions are gone."""
    low = 96
    proc, log = start_service(tmp_path, "[server]\nshutdown_deadline_s = 2\n",
                              launcher=("prlimit", f"--nofile={low}:{low}", "--"))
    try:
        url = wait_ready(proc, log)

        async def go() -> tuple[list[int], dict[str, Any], str, int]:
            async with aiohttp.ClientSession(url) as s:
                ids, statuses = [], []
                refused: dict[str, Any] = {}
                retry = ""
                for _ in range(SESSIONS * 2):
                    async with s.post("/v1/containers", json={"image": images.oci}) as r:
                        statuses.append(r.status)
                        if r.status != 201:
                            refused, retry = await r.json(), r.headers.get("Retry-After", "")
                            break
                        ids.append((await r.json())["id"])
                for sid in ids:
                    async with s.delete(f"/v1/containers/{sid}") as r:
                        assert r.status == 204
                async with s.post("/v1/runs", json={"image": images.oci, "cmd": ["true"]}) as r:
                    after = r.status
            return statuses, refused, retry, after

        statuses, refused, retry, after = asyncio.run(go())
        assert statuses[-1] == 503, statuses
        assert refused["error"]["code"] == "over_capacity" and retry, refused
        assert after == 200
    finally:
        stop(proc, log)
