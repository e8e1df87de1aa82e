"""A crash: SIGKILL the service while runs are in flight, a session is open and a judge pool
is warm; its processes must die with it, and the next instance on the same state directory
must remove what it left (container cgroups, records, temporary files) and serve runs.

Everything checked is scoped to what the killed instance made: its process tree, the cgroups
`c-<id>` of the containers it recorded in the state directory, mounts and files under this
test's own directory; other tests' containers on the host are never looked at."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from tests.service.conftest import start_service, wait_ready

CONFIG = """
[server]
shutdown_deadline_s = 2

[pools]
min_idle = 1
max_idle = 2
"""
RUNS_IN_FLIGHT = 3
WAIT_S = 30  # the longest any wait below may take: a bound for a hung service, not a figure


def _cgroup_mounts() -> list[Path]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                out.append(Path(fields[4]))
    return out


def _cgroup_dirs(ids: set[str]) -> list[Path]:
    """Every cgroup directory, in any hierarchy, named for one of these containers."""
    names = {f"c-{i}" for i in ids}
    found = []
    for top in _cgroup_mounts():
        for parent, dirs, _ in os.walk(top, onerror=lambda _e: None):
            found += [Path(parent, d) for d in dirs if d in names]
    return found


def _cgroup_pids(directory: Path) -> set[int]:
    pids: set[int] = set()
    for parent, _, files in os.walk(directory, onerror=lambda _e: None):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):  # removed while walking
                pids |= {int(p) for p in Path(parent, "cgroup.procs").read_text().split()}
    return pids


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _processes(pids: set[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            out.append(psutil.Process(pid))
    return out


async def _wait_judge_pool(s: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        async with s.get("/v1/info") as r:
            pools = (await r.json(loads=orjson.loads))["pools"]
        if any(p["policy"] == "judge" and p["idle"] >= 1 for p in pools):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no warm judge container after {WAIT_S} s: {pools}")


async def _run(s: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with s.post("/v1/runs", json=body) as r:
        result = await r.json(loads=orjson.loads)
        assert r.status == 200, result
        return result


def test_sigkill_then_restart_leaves_nothing_of_the_old_instance(
        images: Any, tmp_path: Path) -> None:
    mounts_before = _mounts_under(tmp_path)
    old, log = start_service(tmp_path, CONFIG)
    new: subprocess.Popen[bytes] | None = None
    try:
        url = wait_ready(old, log)
        records = tmp_path / "state" / "containers"

        async def crash() -> tuple[set[str], list[psutil.Process], list[Path]]:
            async with aiohttp.ClientSession(url) as s:
                # A judge pool, warm: one run creates it, the pool refills in the background.
                done = await _run(s, {"image": images.oci, "cmd": ["true"], "policy": "judge"})
                assert done["exit_code"] == 0, done
                await _wait_judge_pool(s)
                async with s.post("/v1/containers", json={"image": images.oci}) as r:
                    assert r.status == 201, await r.text()
                streams = []
                for i in range(RUNS_IN_FLIGHT):
                    r = await s.post("/v1/runs", json={
                        "image": images.oci, "cmd": ["sh", "-c", f"echo up{i}; sleep 30"],
                        "env": {"PATH": "/bin"}}, headers={"Accept": "application/x-ndjson"})
                    streams.append(r)
                    first = orjson.loads(await r.content.readline())
                    assert first == {"event": "stdout", "data": f"up{i}\n"}, first
                # Everything is live now: the runs print before they sleep.
                ids = {p.name for p in records.iterdir()}
                cgroups = _cgroup_dirs(ids)
                pids = {c.pid for c in psutil.Process(old.pid).children(recursive=True)}
                for c in cgroups:
                    pids |= _cgroup_pids(c)
                procs = list(_processes(pids))
                old.send_signal(signal.SIGKILL)
                for r in streams:
                    r.close()
            return ids, procs, cgroups

        ids, procs, cgroups = asyncio.run(crash())
        old.wait(WAIT_S)
        old_log = log.read_text(errors="replace")
        # The three runs, the session and at least one warm judge container.
        assert len(ids) >= RUNS_IN_FLIGHT + 2, ids
        # Processes (spawner, containers' inits and what runs in them) die with the service.
        _, alive = psutil.wait_procs(procs, timeout=WAIT_S)
        assert not alive, f"processes of the killed sandboxd still alive: {alive}"
        assert _mounts_under(tmp_path) == mounts_before, "mounts of the killed instance"
        # What it could not remove itself: its records (and cgroups where it had them).
        assert {p.name for p in records.iterdir()} >= ids

        new, log = start_service(tmp_path, CONFIG)
        url = wait_ready(new, log)
        left = {p.name for p in records.iterdir()} & ids
        assert left == set(), f"records of the old instance's containers: {left}"
        assert _cgroup_dirs(ids) == [], (
            f"cgroups of the old instance's containers remain (it had {cgroups})")
        assert _mounts_under(tmp_path) == mounts_before

        async def works() -> list[dict[str, Any]]:
            async with aiohttp.ClientSession(url) as s:
                return [await _run(s, {"image": images.oci, "cmd": ["echo", "ok"],
                                       "policy": policy}) for policy in ("default", "judge")]
        for result in asyncio.run(works()):
            assert (result["status"], result["exit_code"], result["stdout"]) == ("ok", 0, "ok\n")

        children = psutil.Process(new.pid).children(recursive=True)
        new.send_signal(signal.SIGTERM)
        assert new.wait(WAIT_S) == 0, log.read_text()
        _, alive = psutil.wait_procs(children, timeout=WAIT_S)
        assert not alive, f"processes of the new sandboxd left behind: {alive}"
        text = log.read_text(errors="replace")
        assert "Traceback" not in old_log + text, old_log + text
        # The old instance's temporary files too: both used this same TMPDIR.
        assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == []
        assert _mounts_under(tmp_path) == mounts_before
    finally:
        for p in (old, new):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
