"""A throwaway HAProxy (Debian's `haproxy`) in front of sandboxd nodes, for the multi-node
tests and `python -m loadtest.cluster`.

`start_haproxy` writes a config balancing HTTP over the nodes with health checks on
/readyz, starts `haproxy -db` (foreground) on a free loopback port and returns once it
answers. Each response carries `X-Served-By: <server name>`, so a client knows which node
ran its request; `servers()` reads each server's state (UP/DOWN) from the stats socket.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sandbox.errors import SandboxError
from testbed.ports import die_with_parent, free_port

HAPROXY_PROGRAM = "haproxy"
# Debian installs it in /usr/sbin, which an ordinary user's PATH often lacks.
SEARCH_PATH = os.pathsep.join((os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"))
SERVED_BY = "X-Served-By"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 5


@dataclass(frozen=True)
class Backend:
    """A node: the name HAProxy reports for it and where it listens."""

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class HealthCheck:
    """How HAProxy decides a node is up: GET /readyz every `interval_ms`; `fall` failures
    in a row take it out, `rise` successes bring it back."""

    interval_ms: int = 200
    fall: int = 2
    rise: int = 2


class HAProxy:
    """A running HAProxy; stop it with `stop()` or use it as a context manager."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, stats_socket: Path,
                 log: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.stats_socket = stats_socket
        self.log = log

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGUSR1 (finish what is in flight, then exit), then SIGKILL; idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)

    def servers(self) -> dict[str, str]:
        """Each node's state as HAProxy sees it: "UP", "DOWN", "UP 1/2" (rising)…"""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        lines = b"".join(chunks).decode().lstrip("# ").splitlines()
        return {row["svname"]: row["status"] for row in csv.DictReader(lines)
                if row["pxname"] == "nodes" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_for(self, states: dict[str, str], timeout_s: float = START_TIMEOUT_S) -> float:
        """Wait until each named server has the given state ("UP"/"DOWN"); returns the
        time.monotonic() at which it was seen."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.servers()
            if all(seen.get(k, "").split(" ")[0] == v for k, v in states.items()):
                return time.monotonic()
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SandboxError(f"HAProxy's servers are {seen}, expected {states} within "
                                   f"{timeout_s:.0f} s; see {self.log}")
            time.sleep(0.02)


def config_text(port: int, backends: Sequence[Backend], stats_socket: Path,
                check: HealthCheck) -> str:
    servers = "".join(f"    server {b.name} {b.host}:{b.port} check\n" for b in backends)
    return (
        "global\n"
        "    maxconn 4096\n"
        # One thread: the balancer competes with the nodes for this machine's CPUs.
        "    nbthread 1\n"
        f"    stats socket {stats_socket} mode 600 level admin\n"
        "defaults\n"
        "    mode http\n"
        "    timeout connect 1s\n"
        "    timeout client 300s\n"
        "    timeout server 300s\n"
        "    timeout check 1s\n"
        # A refused connect (a node just killed, not yet marked down) is tried again on
        # another node; a request already sent is never sent twice (runs are not
        # idempotent), so its client sees the error.
        "    retries 2\n"
        "    option redispatch 1\n"
        "frontend api\n"
        f"    bind 127.0.0.1:{port}\n"
        "    default_backend nodes\n"
        "backend nodes\n"
        # Runs last from milliseconds to minutes: the least busy node takes the next.
        "    balance leastconn\n"
        "    option httpchk GET /readyz\n"
        "    http-check expect status 200\n"
        f"    default-server inter {check.interval_ms}ms fall {check.fall} rise {check.rise}\n"
        f"    http-response set-header {SERVED_BY} %[srv_name]\n"
        + servers)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def start_haproxy(workdir: Path, backends: Sequence[Backend],
                  check: HealthCheck = HealthCheck()) -> HAProxy:
    """HAProxy on a free 127.0.0.1 port in front of `backends`, its files under `workdir`.
    It gets SIGTERM when the calling thread exits, even by SIGKILL."""
    program = shutil.which(HAPROXY_PROGRAM, path=SEARCH_PATH)
    if program is None:
        raise SandboxError(f"`{HAPROXY_PROGRAM}` is not installed; install it with "
                           "`apt-get install haproxy`")
    workdir.mkdir(parents=True, exist_ok=True)
    stats_socket = workdir / "stats.sock"
    last_error = ""
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        config = workdir / "haproxy.cfg"
        config.write_text(config_text(port, backends, stats_socket, check))
        log = workdir / f"haproxy-{attempt}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([program, "-db", "-f", str(config)],
                                       stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        proxy = HAProxy(process, port, stats_socket, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(port) and stats_socket.exists():
                return proxy
            time.sleep(0.02)
        proxy.stop()
        last_error = log.read_text(errors="replace")[-2000:]
        if "cannot bind" not in last_error.lower():
            break
    raise SandboxError(f"haproxy did not start in {workdir}: {last_error.strip()}")
