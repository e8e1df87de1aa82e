"""Graceful shutdown: SIGTERM during a run stops accepting, kills the run at the deadline,
closes the engine and leaves no process behind."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from tests.service.conftest import start_service, wait_ready


def test_sigterm_during_a_run(images: Any, tmp_path: Path) -> None:
    proc, log = start_service(tmp_path, "[server]\nshutdown_deadline_s = 1\n")
    try:
        url = wait_ready(proc, log)

        async def go() -> tuple[list[dict[str, Any]], int]:
            async with aiohttp.ClientSession(url) as s:
                async with s.post("/v1/runs", json={
                        "image": images.oci, "cmd": ["sh", "-c", "echo up; sleep 60"],
                        "env": {"PATH": "/bin"}}, headers={"Accept": "application/x-ndjson"}
                                  ) as r:
                    events = [orjson.loads(await r.content.readline())]
                    children = psutil.Process(proc.pid).children(recursive=True)
                    proc.send_signal(signal.SIGTERM)
                    # Cut off at the deadline, the run killed: no exit event, maybe an error.
                    with contextlib.suppress(aiohttp.ClientError):
                        events += [orjson.loads(line) for line in
                                   (await r.content.read()).splitlines()]
                code = await asyncio.to_thread(proc.wait, 30)
                _, alive = psutil.wait_procs(children, timeout=5)
                assert not alive, f"left behind: {alive}"
                return events, code
        events, code = asyncio.run(go())
        assert events[0] == {"event": "stdout", "data": "up\n"}
        assert not any(e.get("status") == "ok" for e in events)
        assert code == 0, log.read_text()
        text = log.read_text()
        assert "shutting down" in text and "sandboxd stopped" in text
        assert "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
