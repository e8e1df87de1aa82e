"""A `docker-registry` as a pull-through cache (distribution's proxy mode) of another
registry: what the nodes of a cluster pull through, so that each blob crosses from the
upstream once whatever the number of nodes. Its state is under a work directory; it
listens on a given address (the lab's front host) and a free port."""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testbed.ports import die_with_parent, free_port, stop_process
from testbed.registry import REGISTRY_PROGRAM, LocalRegistry

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PullCache:
    host: str  # host:port, as a mirror entry names it
    log: Path
    storage: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def wait_stored(self, digests: Iterable[str]) -> None:
        """Wait until the cache holds each blob itself. It stores a blob it missed after
        serving it, in the background; until then a request for it goes upstream again."""
        paths = [self.storage / "docker/registry/v2/blobs/sha256" / d[7:9] / d[7:] / "data"
                 for d in digests]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pull-through cache did not store {digests} within "
                                   f"{START_TIMEOUT_S:.0f} s; see {self.log}")
            time.sleep(0.02)


@contextmanager
def pull_cache(workdir: Path, upstream: LocalRegistry, address: str) -> Iterator[PullCache]:
    """The cache of `upstream` on `address`, stopped when the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(address)
    storage = workdir / "storage"
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  formatter: text\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        f"http:\n  addr: {address}:{port}\n  secret: {secrets.token_hex(16)}\n"
        f"proxy:\n  remoteurl: {upstream.url}\n")
    log = workdir / "cache.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([REGISTRY_PROGRAM, "serve", str(config)],
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection((address, port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the pull-through cache did not start: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        yield PullCache(f"{address}:{port}", log, storage)
    finally:
        stop_process(proc, STOP_TIMEOUT_S)
