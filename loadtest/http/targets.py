"""Where requests go: the service over HTTP, or the same script as a local process (bare,
or through a peer: see peers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from loadtest.baseline import Command
from loadtest.http.stats import Outcome
from loadtest.http.workloads import Workload

ERROR_CLIP = 300
STDIN_FILES = 20   # as many as the judge workload has cases


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_CLIP else text[:ERROR_CLIP] + "…"


class HttpTarget:
    """POST /v1/runs of one workload over a pool of at most `connections` keep-alive
    connections."""

    def __init__(self, url: str, token: str | None, image: str, workload: Workload,
                 connections: int, timeout_s: float) -> None:
        self.url = url.rstrip("/") + "/v1/runs"
        self.image = image
        self.workload = workload
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections))

    async def __aenter__(self) -> HttpTarget:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.session.close()

    async def send(self, seq: int) -> Outcome:
        body = orjson.dumps(self.workload.run_body(self.image, seq))
        async with self.session.post(self.url, data=body) as resp:
            doc = answer(resp.status, await resp.read())
        if isinstance(doc, Outcome):
            return doc
        return run_outcome(doc, lambda out: self.workload.check(seq, out), f"request {seq}")


def answer(status: int, raw: bytes, expected: int = 200) -> dict[str, Any] | Outcome:
    """The JSON object of an answer with the `expected` status, or the failed Outcome any
    other answer is (its error code and message as the service gave them)."""
    http = str(status)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = clip(raw.decode(errors="replace"))
        return Outcome(False, http, "not_json", f"HTTP {http}: {text}")
    if not isinstance(doc, dict):
        return Outcome(False, http, "not_json", f"HTTP {http}: not a JSON object")
    if status != expected:
        err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
        code = str(err.get("code", f"http_{http}"))
        message = clip(str(err.get("message", "")))
        return Outcome(False, http, code, f"HTTP {http} {code}: {message}")
    return doc


def run_outcome(doc: dict[str, Any], check: Callable[[str], bool], what: str) -> Outcome:
    """A run's result judged: ok when its status is ok and `check` accepts its stdout."""
    status = str(doc.get("status"))
    hit = doc.get("pool_hit") if isinstance(doc.get("pool_hit"), bool) else None
    if status != "ok":
        return Outcome(False, "200", status, f"{what}: run {status} exit "
                       f"{doc.get('exit_code')}: {clip(str(doc.get('stderr', '')))}", hit)
    if not check(str(doc.get("stdout", ""))):
        return Outcome(False, "200", "wrong_answer",
                       f"{what}: unexpected output {clip(str(doc.get('stdout')))!r}", hit)
    return Outcome(True, "200", status, "", hit)


@dataclass(frozen=True)
class BareEnv:
    """The bare baseline's busybox rootfs copy and its tmpfs scratch directory."""

    root: Path
    scratch: Path


def write_files(workload: Workload, dest: Path) -> list[tuple[str, Path]]:
    """The workload's `files` written under `dest` by name, as (path inside, host path)."""
    written = []
    for path, content, mode in workload.files:
        local = dest / Path(path).name
        local.write_text(content)
        local.chmod(mode)
        written.append((path, local))
    return written


@dataclass(frozen=True)
class Invocation:
    """One request's local process, and what removes its leftovers after a failure."""

    path: str
    argv: list[str]
    env: dict[str, str]
    cleanup: list[str] | None = None


class SpawnTarget:
    """One local process per request, posix_spawned from a thread, at most `workers` at
    once; its stdout is checked as the sandboxed run's is. Subclasses say what runs."""

    side = "bare"

    def __init__(self, workload: Workload, workers: int, timeout_s: float | None) -> None:
        self.workload = workload
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.side)

    def invocation(self, seq: int) -> Invocation:
        raise NotImplementedError

    async def __aenter__(self) -> SpawnTarget:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.pool.shutdown(wait=True)

    def _spawn(self, run: Invocation, stdin: bytes | None) -> tuple[int | None, bytes, bytes]:
        """(exit code, or None when it timed out and was killed; stdout; stderr) of one run.
        Pipes are close-on-exec, so a run spawned at the same time by another thread does
        not hold this one's pipe ends open."""
        in_r, in_w = os.pipe() if stdin is not None else (-1, -1)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        stdin_action = ((os.POSIX_SPAWN_DUP2, in_r, 0) if stdin is not None
                        else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        actions = [stdin_action, (os.POSIX_SPAWN_DUP2, out_w, 1),
                   (os.POSIX_SPAWN_DUP2, err_w, 2)]
        try:
            # A group of its own: a run that overstays is killed with what it forked (a
            # rootless podman's re-executed self, for one).
            pid = os.posix_spawn(run.path, run.argv, run.env, file_actions=actions,
                                 setpgroup=0)
        except OSError:
            for fd in (in_w, out_r, err_r):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            if in_r >= 0:
                os.close(in_r)
        outputs: tuple[bytes, ...] | None = None
        try:
            if stdin is not None:
                with contextlib.suppress(BrokenPipeError):  # a script may not read it all
                    os.write(in_w, stdin)  # inputs are far below a pipe's buffer
                os.close(in_w)
                in_w = -1
            deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
            outputs = _read_until(deadline, out_r, err_r)
        finally:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            if outputs is None:
                os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            code = None if outputs is None else os.waitstatus_to_exitcode(status)
            if code != 0 and run.cleanup:
                subprocess.run(run.cleanup, env=run.env, capture_output=True, timeout=60,
                               check=False)
        out, err = outputs or (b"", b"")
        return code, out, err

    async def send(self, seq: int) -> Outcome:
        stdin = self.workload.stdin(seq).encode() if self.workload.stdin is not None else None
        run = self.invocation(seq)
        code, out, err = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._spawn, run, stdin)
        if code is None:
            return Outcome(False, self.side, "timeout",
                           f"{self.side} run killed after {self.timeout_s:g} s")
        if code != 0:
            return Outcome(False, self.side, "nonzero_exit", f"{self.side} exit status {code}: "
                           f"{clip(err.decode(errors='replace'))}")
        if not self.workload.check(seq, out.decode(errors="replace")):
            return Outcome(False, self.side, "wrong_answer",
                           f"request {seq}: {self.side} output {out[:80]!r}")
        return Outcome(True, self.side, "ok")


def _read_until(deadline: float | None, *fds: int) -> tuple[bytes, ...] | None:
    """Everything on each pipe up to its end of file, or None when `deadline` passed first."""
    chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    left = len(fds)
    while left:
        wait = None if deadline is None else (deadline - time.monotonic()) * 1000
        if wait is not None and wait <= 0:
            return None
        for fd, _ in poller.poll(wait):
            if chunk := os.read(fd, 65536):
                chunks[fd].append(chunk)
            else:
                poller.unregister(fd)
                left -= 1
    return tuple(b"".join(chunks[fd]) for fd in fds)


class BareTarget(SpawnTarget):
    """The workload's busybox command (`sh -c SCRIPT`, or an applet) as a local process:
    the same binary and command as the container runs, without any isolation."""

    def __init__(self, env: BareEnv, workload: Workload, workers: int,
                 timeout_s: float | None = None) -> None:
        super().__init__(workload, workers, timeout_s)
        self.busybox = str(env.root / "bin" / "busybox")
        self.env = {"PATH": str(env.root / "bin"), "BIN": str(env.root / "bin"),
                    "TMPDIR": str(env.scratch)}
        for _, local in write_files(workload, env.scratch):
            # The script finds its file in the scratch directory through SOLUTION.
            self.env["SOLUTION"] = str(local)

    def invocation(self, seq: int) -> Invocation:
        return Invocation(self.busybox, self.workload.command, self.env)

    def tight(self, scratch: Path) -> Command:
        """The same command for the tight bare loops (loadtest.baseline): the stdin of the
        first STDIN_FILES requests written to files under `scratch`, taken in turn."""
        stdin: list[str] = []
        if self.workload.stdin is not None:
            for seq in range(STDIN_FILES):
                path = scratch / f"stdin-{self.workload.name}-{seq}"
                path.write_text(self.workload.stdin(seq))
                stdin.append(str(path))
        return Command(self.busybox, tuple(self.workload.command), dict(self.env),
                       tuple(stdin))
