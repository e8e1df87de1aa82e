"""Where requests go: the service over HTTP, or the same script as a bare local process."""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp
import orjson

from loadtest.http.stats import Outcome
from loadtest.http.workloads import Workload

ERROR_CLIP = 300


def _clip(text: str) -> str:
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
            raw = await resp.read()
        http = str(resp.status)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            text = _clip(raw.decode(errors="replace"))
            return Outcome(False, http, "not_json", f"HTTP {http}: {text}")
        if not isinstance(doc, dict):
            return Outcome(False, http, "not_json", f"HTTP {http}: not a JSON object")
        if resp.status != 200:
            err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
            code = str(err.get("code", f"http_{http}"))
            message = _clip(str(err.get("message", "")))
            return Outcome(False, http, code, f"HTTP {http} {code}: {message}")
        status = str(doc.get("status"))
        hit = doc.get("pool_hit") if isinstance(doc.get("pool_hit"), bool) else None
        if status != "ok":
            return Outcome(False, http, status, f"run {status} exit {doc.get('exit_code')}: "
                           f"{_clip(str(doc.get('stderr', '')))}", hit)
        if not self.workload.check(seq, str(doc.get("stdout", ""))):
            return Outcome(False, http, "wrong_answer",
                           f"request {seq}: unexpected output {_clip(str(doc.get('stdout')))!r}",
                           hit)
        return Outcome(True, http, status, "", hit)


@dataclass(frozen=True)
class BareEnv:
    """The bare baseline's busybox rootfs copy and its tmpfs scratch directory."""

    root: Path
    scratch: Path


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


class BareTarget:
    """The workload's busybox command (`sh -c SCRIPT`, or an applet) posix_spawned from a
    thread, at most `workers` at once: the same binary and command as the container runs,
    without any isolation."""

    def __init__(self, env: BareEnv, workload: Workload, workers: int) -> None:
        self.workload = workload
        self.busybox = str(env.root / "bin" / "busybox")
        self.env = {"PATH": str(env.root / "bin"), "BIN": str(env.root / "bin"),
                    "TMPDIR": str(env.scratch)}
        for path, content, mode in workload.files:
            # Files land in the scratch directory; the script finds them through SOLUTION.
            local = env.scratch / Path(path).name
            local.write_text(content)
            local.chmod(mode)
            self.env["SOLUTION"] = str(local)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bare")

    async def __aenter__(self) -> BareTarget:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.pool.shutdown(wait=True)

    def _spawn(self, stdin: bytes | None) -> tuple[int, bytes]:
        """(exit code, stdout) of one run; pipes are close-on-exec, so a run spawned at
        the same time by another thread does not hold this one's pipe ends open."""
        in_r, in_w = os.pipe() if stdin is not None else (-1, -1)
        out_r, out_w = os.pipe()
        stdin_action = ((os.POSIX_SPAWN_DUP2, in_r, 0) if stdin is not None
                        else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        actions = [stdin_action, (os.POSIX_SPAWN_DUP2, out_w, 1),
                   (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
        try:
            pid = os.posix_spawn(self.busybox, self.workload.command, self.env,
                                 file_actions=actions)
        except OSError:
            for fd in (in_w, out_r):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            os.close(out_w)
            if in_r >= 0:
                os.close(in_r)
        try:
            if stdin is not None:
                with contextlib.suppress(BrokenPipeError):  # a script may not read it all
                    os.write(in_w, stdin)  # inputs are far below a pipe's buffer
                os.close(in_w)
                in_w = -1
            out = _read_all(out_r)
        finally:
            os.close(out_r)
            if in_w >= 0:
                os.close(in_w)
            _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), out

    async def send(self, seq: int) -> Outcome:
        stdin = self.workload.stdin(seq).encode() if self.workload.stdin is not None else None
        code, out = await asyncio.get_running_loop().run_in_executor(self.pool, self._spawn, stdin)
        if code != 0:
            return Outcome(False, "bare", "nonzero_exit", f"bare exit status {code}")
        if not self.workload.check(seq, out.decode(errors="replace")):
            return Outcome(False, "bare", "wrong_answer",
                           f"request {seq}: bare output {out[:80]!r}")
        return Outcome(True, "bare", "ok")
