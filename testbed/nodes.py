"""`sandboxd serve` nodes of a cluster on one machine, for the multi-node tests and
`python -m loadtest.cluster`: each with its own state directory, config and temporary
directory, started behind a launcher (`nsenter --net=…` to put it on a host of the tests'
lab, `taskset -c N` to confine it to a CPU), reached at `url`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sandbox.errors import SandboxError

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
# No proxy from the environment: the nodes are on this machine.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Node:
    """One node; `start()` (again after `kill()`, on the same state) and `stop()`.
    `port` 0: any (read from its log), kept when it starts again."""

    name: str
    address: str
    port: int
    workdir: Path
    config: str
    launcher: Sequence[str] = ()
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    _starts: int = field(default=0)

    @property
    def log(self) -> Path:
        return self.workdir / f"sandboxd-{self._starts}.log"

    def start(self) -> None:
        self._starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "sandboxd.toml"
        cfg.write_text(self.config)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")
               or k == "SANDBOXD_SHARED"}
        env["TMPDIR"] = str(tmp)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*self.launcher, sys.executable, "-m", "service.cli", "serve", "--host",
                 self.address, "--port", str(self.port), "--state-dir",
                 str(self.workdir / "state"), "--config", str(cfg)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_ready()
        self.port = int(self.url.rsplit(":", 1)[1])

    def _wait_ready(self) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SandboxError(f"node {self.name} exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace"))
            if url is None:
                m = _LISTENING.search(self.log.read_text(errors="replace"))
                url = m.group(1) if m else None
            if url is not None:
                try:
                    with _DIRECT.open(url + "/readyz", timeout=2) as r:
                        if r.status == 200:
                            return url
                except OSError:
                    pass
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
        raise SandboxError(f"node {self.name} was not ready in {START_TIMEOUT_S:.0f} s:\n"
                           + self.log.read_text(errors="replace"))

    def kill(self) -> list[psutil.Process]:
        """SIGKILL the service process alone (as a crash would); returns its descendants
        as they were, for the caller to watch."""
        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return children

    def stop(self) -> None:
        """SIGTERM; it must exit with 0, leave no traceback, no process, no temporary file."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise SandboxError(f"node {self.name} did not stop on SIGTERM:\n"
                               + self.log.read_text(errors="replace")) from None
        text = self.log.read_text(errors="replace")
        if code != 0 or "Traceback" in text:
            raise SandboxError(f"node {self.name} exited with {code}:\n{text}")
        _, alive = psutil.wait_procs(children, timeout=5)
        if alive:
            raise SandboxError(f"processes of node {self.name} left behind: {alive}")
        left = sorted(p.name for p in (self.workdir / "tmp").iterdir())
        if left:
            raise SandboxError(f"temporary files of node {self.name} left behind: {left}")
