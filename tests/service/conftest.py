"""A real `sandboxd serve` for the whole module set: a subprocess on a free loopback port,
a temporary state directory, the test registry; stopped with SIGTERM at the end, after
which none of its processes and none of its temporary directories may remain."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil
import pytest

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
MAIN_TOKEN = "main-token-0123456789abcdef"
LIMITED_TOKEN = "limited-token-0123456789abcdef"
JUDGE_WALL_DEFAULT = 4000
JUDGE_WALL_MAX = 60000
START_TIMEOUT_S = 60
JSON_CAP = 1 << 20


@dataclass
class Service:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    state_dir: Path
    registry_host: str

    def headers(self, token: str | None = MAIN_TOKEN, **extra: str) -> dict[str, str]:
        h = dict(extra)
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return h

    def call(self, fn: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
        """Run `fn(session)` on a fresh event loop with a client session to the service."""
        async def go() -> T:
            async with aiohttp.ClientSession(self.url, headers=self.headers()) as s:
                return await fn(s)
        return asyncio.run(go())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(workdir: Path, config: str, *args: str, env: dict[str, str] | None = None,
                  launcher: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], Path]:
    """`sandboxd serve` on a free port with `config`, its log in workdir; `launcher` is a
    command that starts it (prlimit, say)."""
    cfg = workdir / "sandboxd.toml"
    cfg.write_text(config)
    log = workdir / "sandboxd.log"
    # Only what the test gives: SANDBOXD_* variables of the caller must not leak in.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")
                or k == "SANDBOXD_SHARED"}
    # A temporary directory of its own: what it leaves there is its own, whatever else runs.
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    full_env["TMPDIR"] = str(tmp)
    full_env.update(env or {})
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
             "--port", "0", "--state-dir", str(workdir / "state"), "--config", str(cfg), *args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    return proc, log


def wait_ready(proc: subprocess.Popen[bytes], log: Path) -> str:
    """The service's URL once /readyz answers 200; a service that exits or is not ready in
    time is killed and reaped before the error is raised (nothing of it is left)."""
    try:
        return _ready_url(proc, log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _ready_url(proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sandboxd exited with {proc.returncode}:\n{log.read_text()}")
        if url is None:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = m.group(1) if m else None
        if url is not None:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"sandboxd was not ready in {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def service(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("sandboxd")
    config = f"""
[server]
session_idle_s = 120
shutdown_deadline_s = 5

[[tokens]]
token = "{MAIN_TOKEN}"
name = "main"
operator = true

[[tokens]]
token = "{LIMITED_TOKEN}"
name = "limited"
max_concurrent_runs = 1
registries = ["{registry.host}"]

# Tokens may use a registry on a local address only when it is listed.
[registries."{registry.host}"]

[pools]
min_idle = 1
max_idle = 2

# Below the judge profile's own (5000 and 120000): test_api_policies checks they apply.
[policies.judge.defaults]
wall_ms = {JUDGE_WALL_DEFAULT}

[policies.judge.maxima]
wall_ms = {JUDGE_WALL_MAX}

[limits]
json_body_bytes = {JSON_CAP}
file_body_bytes = {JSON_CAP}
import_body_bytes = {64 << 20}
"""
    proc, log = start_service(workdir, config)
    url = wait_ready(proc, log)
    svc = Service(url, proc, log, workdir / "state", registry.host)
    yield svc
    stop_service(svc, workdir)


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, then check that it stopped, with status 0 and no traceback in its log."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"sandboxd did not stop on SIGTERM:\n{log.read_text()}") from None
    text = log.read_text(errors="replace")
    assert code == 0, f"sandboxd exited with {code}:\n{text}"
    assert "Traceback" not in text, text


def stop_service(svc: Service, workdir: Path) -> None:
    """`stop`, and check it left no process and no temporary file behind."""
    children = psutil.Process(svc.proc.pid).children(recursive=True)
    stop(svc.proc, svc.log)
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"processes of sandboxd left behind: {alive}"
    left = sorted(p.name for p in (workdir / "tmp").iterdir())
    assert left == [], f"temporary files left behind: {left}"
