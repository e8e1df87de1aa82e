"""A `sandboxd serve` of a test's own (a config the shared one does not have), stopped with
SIGTERM at the end, and what the tests of slow clients read of it: its memory, its runs."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.service.conftest import LIMITED_TOKEN, MAIN_TOKEN, start_service, stop, wait_ready


def two_tenants(registry_host: str, b: str = "") -> str:
    """The [[tokens]] of two tenants: "a" (MAIN_TOKEN) and "b" (LIMITED_TOKEN, with `b`'s
    lines), both allowed the test registry: the config of every tenant-against-tenant
    test."""
    return f"""
[[tokens]]
token = "{MAIN_TOKEN}"
name = "a"
registries = ["{registry_host}"]

[[tokens]]
token = "{LIMITED_TOKEN}"
name = "b"
registries = ["{registry_host}"]
{b}
"""


@dataclass
class OwnService:
    url: str
    pid: int
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def metric(self, name: str, token: str | None = None) -> float:
        """The sum of a metric's samples (0 when it has none)."""
        req = urllib.request.Request(self.url + "/metrics", headers={
            "Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        return sum(float(m.group(1)) for m in re.finditer(
            rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def reset_peak(self) -> None:
        """From now on, the peak RSS the kernel reports (VmHWM) starts at the current RSS."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak(self) -> int:
        m = re.search(r"^VmHWM:\s+(\d+) kB$", Path(f"/proc/{self.pid}/status").read_text(),
                      re.M)
        assert m is not None
        return int(m.group(1)) * 1024


@contextmanager
def own_service(workdir: Path, config: str) -> Iterator[OwnService]:
    proc, log = start_service(workdir, config)
    try:
        url = wait_ready(proc, log)
        yield OwnService(url, proc.pid, log)
    finally:
        stop(proc, log)
