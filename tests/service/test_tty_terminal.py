"""`sbx run -it` driven through a real terminal: tmux (a private server on its own socket)
runs a shell in which sbx is started against the test service; keys are typed with
send-keys and the screen read with capture-pane."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.service.conftest import MAIN_TOKEN, Service

WAIT_S = 60   # a deadline for what must appear, not a timing check
SBX = str(Path(sys.executable).with_name("sbx"))


class Tmux:
    """One tmux server on a private socket, one window running a plain shell (dash)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.socket = str(workdir / "sock")
        shell = workdir / "shell.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        # dash, not bash: bash puts the terminal's settings back itself after a job a
        # signal killed, which would hide a terminal sbx left raw.
        shell.write_text(f"{exports}export PS1='host$ '\nexec dash -i\n")
        self.tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "30",
                  f"bash {shlex.quote(str(shell))}")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        if enter:
            self.tmux("send-keys", "-t", "t", "Enter")

    def key(self, name: str) -> None:
        self.tmux("send-keys", "-t", "t", name)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t", "-S", "-200")

    def wait_for(self, text: str, count: int = 1) -> str:
        """The screen once `text` shows on it `count` times (capture-pane strips the
        blanks that end a line)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} (x{count}) never showed; the screen:\n{screen}")
            time.sleep(0.05)

    def shell_child(self) -> int:
        """The pid of what the window's shell runs in the foreground (sbx)."""
        shell = int(self.tmux("display-message", "-p", "-t", "t", "#{pane_pid}"))
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for task in os.listdir(f"/proc/{shell}/task"):
                children = Path(f"/proc/{shell}/task/{task}/children").read_text().split()
                if children:
                    return int(children[0])
            time.sleep(0.05)
        raise AssertionError(f"the shell {shell} started nothing")

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True,
                       check=False, timeout=30)


@pytest.fixture
def tmux(service: Service, tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is needed: apt-get install tmux")
    t = Tmux(tmp_path, {"SANDBOXD_URL": service.url, "SANDBOXD_TOKEN": MAIN_TOKEN,
                        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm",
                        "HOME": str(tmp_path)})
    try:
        t.wait_for("host$")
        yield t
    finally:
        t.kill()


def test_sbx_run_it_in_a_real_terminal(tmux: Tmux, images: Any, tmp_path: Path) -> None:
    before, after = tmp_path / "before", tmp_path / "after"
    tmux.type(f"stty -g > {before}; {SBX} run -it {images.oci} sh; echo rc=$?; "
              f"stty -g > {after}")
    tmux.wait_for("/ $")                     # the container's shell
    tmux.type("echo h''i")
    tmux.wait_for("\nhi\n")                  # typed, echoed, and run
    # The terminal's size reaches the run, and a resize (SIGWINCH to sbx) too.
    tmux.type("stty size")
    tmux.wait_for("30 100")
    tmux.tmux("resize-window", "-t", "t", "-x", "120", "-y", "40")
    tmux.type("stty size")
    tmux.wait_for("40 120")
    # Ctrl-C goes to the program in the foreground, not to sbx.
    tmux.type("sh -c 'echo sl\"\"eeping; exec sleep 100'")
    tmux.wait_for("\nsleeping\n")
    tmux.key("C-c")
    tmux.type("echo a''live")
    tmux.wait_for("\nalive\n")
    tmux.type("exit 3")
    screen = tmux.wait_for("rc=3")
    tmux.wait_for("host$", count=2)
    assert after.exists(), screen
    assert before.read_text() == after.read_text(), "the terminal was not restored"


def _attached(tmux: Tmux, tmp_path: Path, command: str) -> tuple[Path, Path]:
    """Type `command` (an sbx -it) in the window's shell, framed by `stty -g` before and
    after it and its exit status (rc=N)."""
    before, after = tmp_path / "before", tmp_path / "after"
    tmux.type(f"stty -g > {before}; {command}; echo rc=$?; stty -g > {after}")
    return before, after


def _restored(tmux: Tmux, before: Path, after: Path, rc: str) -> str:
    screen = tmux.wait_for(f"rc={rc}")
    tmux.wait_for("host$", count=2)
    assert after.exists(), screen
    assert before.read_text() == after.read_text(), f"the terminal was not restored:\n{screen}"
    return screen


def test_sbx_exec_it_in_a_session(tmux: Tmux, service: Service, images: Any,
                                  tmp_path: Path) -> None:
    async def create(s: aiohttp.ClientSession) -> str:
        async with s.post("/v1/containers", json={"image": images.oci}) as r:
            return str((await r.json())["id"])

    async def delete(s: aiohttp.ClientSession) -> None:
        async with s.delete(f"/v1/containers/{sid}"):
            pass

    sid = service.call(create)
    try:
        before, after = _attached(tmux, tmp_path, f"{SBX} exec -it {sid} sh")
        tmux.wait_for("/ $")
        tmux.type("tty")
        tmux.wait_for("/dev/pts/0")
        tmux.type("exit 4")
        _restored(tmux, before, after, "4")
    finally:
        service.call(delete)


def test_sigterm_to_sbx_restores_the_terminal(tmux: Tmux, images: Any,
                                              tmp_path: Path) -> None:
    before, after = _attached(tmux, tmp_path, f"{SBX} run -it {images.oci} sh")
    tmux.wait_for("/ $")
    os.kill(tmux.shell_child(), signal.SIGTERM)
    _restored(tmux, before, after, str(128 + signal.SIGTERM))


@pytest.fixture
def dropping_service() -> Iterator[str]:
    """A WebSocket endpoint that takes the run body, sends one piece of output, and then
    closes the connection with no exit event (a service that went away mid-run)."""
    async def run_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.send_str('{"event": "stdout", "data": "c3RhcnRlZAo="}')  # "started\n"
        await asyncio.sleep(0.5)
        await ws.close()
        return ws

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/runs/ws", run_ws)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_a_dropped_connection_restores_the_terminal(tmux: Tmux, dropping_service: str,
                                                    tmp_path: Path) -> None:
    before, after = _attached(tmux, tmp_path,
                              f"SANDBOXD_URL={dropping_service} {SBX} run -it busybox sh")
    screen = _restored(tmux, before, after, "125")
    assert "started" in screen and "closed the WebSocket" in screen, screen


def test_sbx_run_it_wants_a_terminal(service: Service, images: Any) -> None:
    env = {**os.environ, "SANDBOXD_URL": service.url, "SANDBOXD_TOKEN": MAIN_TOKEN}
    r = subprocess.run([SBX, "run", "-it", images.oci, "true"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.returncode != 0 and "the input device is not a TTY" in r.stderr, r
