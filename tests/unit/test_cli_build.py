"""`sbx build`, `sbx builder prune` and the client calls under them, against a small fake of
POST /v1/build and /v1/build/prune (the contract in build-api, served by aiohttp on a
private loop in a thread) that keeps what it received and answers a scripted stream."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import re
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from sbx.cli import main
from sbx.client import (
    ApiError,
    BuildError,
    BuildOutput,
    BuildStep,
    BuildWarning,
    Built,
    Client,
    StepDone,
    SyncClient,
)

DIGEST = "sha256:" + "dd" * 32
CONFIG = "sha256:" + "c0" * 32
LAYER_A, LAYER_B = "sha256:" + "a1" * 32, "sha256:" + "b2" * 32

SUCCESS: list[dict[str, Any]] = [
    {"event": "step", "step": 1, "steps": 3, "stage": None, "line": 1,
     "instruction": "FROM busybox"},
    {"event": "step_done", "step": 1, "cached": False, "layer": None, "seconds": 0.01},
    {"event": "step", "step": 2, "steps": 3, "stage": None, "line": 2,
     "instruction": "COPY . /app"},
    {"event": "step_done", "step": 2, "cached": True, "layer": LAYER_A, "seconds": 0},
    {"event": "step", "step": 3, "steps": 3, "stage": "app", "line": 4,
     "instruction": "RUN make"},
    {"event": "stdout", "step": 3, "data": "cc -o app"},
    {"event": "stderr", "step": 3, "data": " main.c\nmain.c:1: warning\n"},
    {"event": "warning", "message": "the build argument UNUSED was not used"},
    {"event": "step_done", "step": 3, "cached": False, "layer": LAYER_B, "seconds": 0.4},
    {"event": "image", "digest": DIGEST, "config_digest": CONFIG,
     "names": ["docker.io/library/app:1", "127.0.0.1:5000/team/app:2"]},
]
SUCCESS_OUT = f"""\
Step 1/3 : FROM busybox
Step 2/3 : COPY . /app
 ---> Using cache
 ---> {"a1" * 6}
Step 3/3 : RUN make
cc -o app main.c
main.c:1: warning
 ---> {"b2" * 6}
Successfully built {"c0" * 6}
Successfully tagged app:1
Successfully tagged 127.0.0.1:5000/team/app:2
"""
FAILURE: list[dict[str, Any]] = [
    {"event": "step", "step": 1, "steps": 2, "stage": None, "line": 1,
     "instruction": "FROM busybox"},
    {"event": "step_done", "step": 1, "cached": False, "layer": None, "seconds": 0.01},
    {"event": "step", "step": 2, "steps": 2, "stage": None, "line": 5,
     "instruction": "RUN make"},
    {"event": "stdout", "step": 2, "data": "make: *** [all] Error 1"},
    {"event": "error", "error": {"code": "build_failed", "line": 5, "step": 2,
                                 "message": "Dockerfile:5: RUN exited with status 1: make"}},
]
FAILURE_OUT = "Step 1/2 : FROM busybox\nStep 2/2 : RUN make\nmake: *** [all] Error 1\n"
FAILURE_ERR = "sbx: Dockerfile:5: RUN exited with status 1: make\n"


# The fake service


@dataclass
class Received:
    query: list[tuple[str, str]]
    body: bytes
    content_type: str
    chunked: bool

    def params(self, key: str) -> list[str]:
        return [v for k, v in self.query if k == key]

    def members(self) -> dict[str, tarfile.TarInfo]:
        with tarfile.open(fileobj=io.BytesIO(self.body), mode="r:*") as tar:
            return {m.name: m for m in tar.getmembers()}

    def content(self, name: str) -> bytes:
        with tarfile.open(fileobj=io.BytesIO(self.body), mode="r:*") as tar:
            reader = tar.extractfile(name)
            assert reader is not None
            return reader.read()


class Fake:
    """Answers each build with `script`, then ends the stream (`cut`: drops the connection
    instead); `refusal` answers 4xx at once, before reading the body, as a service that
    checks the query first."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.broken = 0  # bodies that never came whole
        self.script: list[dict[str, Any]] = SUCCESS
        self.cut = False
        self.refusal: tuple[int, dict[str, str]] | None = None
        self.loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/build", self.build)
        app.router.add_post("/v1/build/prune", self.prune)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    async def _stop(self) -> None:
        await self.runner.cleanup()
        # aiohttp keeps reading a refused request's body (lingering close) even once the
        # client has gone, and its shutdown does not cancel that.
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    async def build(self, request: web.Request) -> web.StreamResponse:
        if self.refusal is not None:
            status, err = self.refusal
            return web.json_response({"error": err}, status=status)
        try:
            body = await request.read()
        except Exception:
            self.broken += 1
            raise
        self.received.append(Received(list(request.query.items()), body, request.content_type,
                                      request.headers.get("Transfer-Encoding") == "chunked"))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for event in self.script:
            await resp.write(orjson.dumps(event) + b"\n")
        if self.cut:
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def prune(self, request: web.Request) -> web.Response:
        return web.json_response({"removed": 3, "freed_bytes": 5 << 20})


@pytest.fixture(scope="module")
def service() -> Iterator[Fake]:
    fake = Fake()
    yield fake
    fake.close()


@pytest.fixture
def fake(service: Fake, monkeypatch: pytest.MonkeyPatch) -> Fake:
    service.received.clear()
    service.broken, service.script, service.cut, service.refusal = 0, SUCCESS, False, None
    monkeypatch.setenv("SANDBOXD_URL", service.url)
    monkeypatch.delenv("SANDBOXD_TOKEN", raising=False)
    return service


def sbx(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def stdin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """feed(data): what sbx reads on stdin next."""
    opened: list[Any] = []

    def feed(data: bytes) -> None:
        path = tmp_path / f"stdin-{len(opened)}"
        path.write_bytes(data)
        opened.append(path.open("rb"))
        monkeypatch.setattr("sys.stdin", opened[-1])

    yield feed
    for f in opened:
        f.close()


def _context(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "Dockerfile").write_text("FROM busybox\nCOPY . /app\n")
    (root / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o750)
    (root / "big.bin").write_bytes(os.urandom(3 << 20))  # many chunks through the pipe
    (root / "src" / "link").symlink_to("main.c")
    (root / "out").symlink_to("/etc/passwd")  # stored as a link, never read through
    (root / "etc").symlink_to("/etc")
    (root / "dangling").symlink_to("../nowhere")
    (root / "hard").hardlink_to(root / "run.sh")
    return root


def _refuse(name: str, real_open: Callable[..., int], path: Any, flags: int,
            mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    if path == name:
        raise PermissionError(13, "Permission denied", path)
    return real_open(path, flags, mode, dir_fd=dir_fd)


def _tar(**files: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# The context sent


def test_a_directory_goes_as_a_tar_with_links_kept_as_links(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = _context(tmp_path / "ctx")
    os.mkfifo(root / "pipe")
    code, _, err = sbx(capsys, "build", str(root))
    assert code == 0
    assert err == (f"sbx: warning: {root / 'pipe'} is left out of the build context: it is a "
                   "FIFO, and a context holds files, directories and symlinks\n"
                   "[Warning] the build argument UNUSED was not used\n")
    (sent,) = fake.received
    assert (sent.content_type, sent.chunked, sent.query) == ("application/x-tar", True, [])
    members = sent.members()
    assert sorted(members) == ["Dockerfile", "big.bin", "dangling", "empty", "etc", "hard",
                               "out", "run.sh", "src", "src/link", "src/main.c"]
    links = ("src/link", "out", "dangling", "etc")
    assert [(members[n].issym(), members[n].linkname) for n in links] \
        == [(True, "main.c"), (True, "/etc/passwd"), (True, "../nowhere"), (True, "/etc")]
    assert members["empty"].isdir() and members["src"].isdir()
    assert sent.content("big.bin") == (root / "big.bin").read_bytes()
    assert sent.content("hard") == b"#!/bin/sh\n" and members["hard"].isreg()
    assert stat.S_IMODE(members["run.sh"].mode) == 0o750
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members.values()} == {(0, 0, "", "")}


def test_a_file_sbx_cannot_read_fails_the_build_naming_it(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for locked in ("secret.key", "private"):
        root = tmp_path / locked / "ctx"
        (root / "private").mkdir(parents=True)
        (root / "Dockerfile").write_text("FROM busybox\n")
        (root / "secret.key").write_text("k")
        (root / locked).chmod(0)
        if os.geteuid() == 0:  # root reads whatever the mode says: make open(2) say no
            monkeypatch.setattr(os, "open", partial(_refuse, locked, os.open))
        code, out, err = sbx(capsys, "build", str(root))
        monkeypatch.undo()
        monkeypatch.setenv("SANDBOXD_URL", fake.url)
        (root / locked).chmod(0o700)
        assert (code, out) == (1, "")
        assert err == (f"sbx: cannot read {root / locked} for the build context: permission "
                       "denied; make it readable, or move it out of the context directory\n")
    assert fake.received == []  # nothing half-sent was taken for a context


def test_a_dockerfile_inside_the_context_is_named_by_its_path_in_it(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = _context(tmp_path / "ctx")
    (root / "docker").mkdir()
    (root / "docker" / "Dockerfile.dev").write_text("FROM busybox\n")
    monkeypatch.chdir(tmp_path)
    assert sbx(capsys, "build", "-f", "ctx/docker/Dockerfile.dev", "ctx")[0] == 0
    monkeypatch.chdir(root / "docker")
    assert sbx(capsys, "build", "-f", "Dockerfile.dev", "..")[0] == 0
    for sent in fake.received:
        assert sent.params("dockerfile") == ["docker/Dockerfile.dev"]
        assert not [n for n in sent.members() if n.startswith(".sbx-dockerfile")]
    code, _, err = sbx(capsys, "build", "-f", "Dockerfile.none", "..")
    assert code == 1 and "cannot find the Dockerfile Dockerfile.none" in err


def test_a_dockerfile_outside_the_context_goes_in_under_a_name_of_its_own(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, stdin: Any) -> None:
    root = _context(tmp_path / "ctx")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "Dockerfile").write_bytes(b"FROM busybox\nRUN outside\n")
    (root / "Dockerfile.link").symlink_to("../elsewhere/Dockerfile")
    monkeypatch.chdir(tmp_path)
    assert sbx(capsys, "build", "-f", "elsewhere/Dockerfile", "ctx")[0] == 0
    assert sbx(capsys, "build", "-f", "ctx/Dockerfile.link", "ctx")[0] == 0
    stdin(b"FROM busybox\nRUN from-stdin\n")
    assert sbx(capsys, "build", "-f", "-", "ctx")[0] == 0
    names = []
    for sent, content in zip(fake.received, (b"RUN outside", b"RUN outside", b"RUN from-stdin"),
                             strict=True):
        (name,) = sent.params("dockerfile")
        assert re.fullmatch(r"\.sbx-dockerfile-[0-9a-f]{16}", name)
        assert sent.content(name).endswith(content + b"\n")
        assert {"Dockerfile", "src/main.c", "etc"} <= set(sent.members())
        names.append(name)
    assert len(set(names)) == 3


@pytest.mark.parametrize("compress", [False, True])
def test_a_context_tar_on_stdin_is_sent_as_it_is(
        fake: Fake, capsys: pytest.CaptureFixture[str], stdin: Any, compress: bool) -> None:
    data = _tar(**{"Dockerfile": b"FROM busybox\n", "app/Dockerfile.prod": b"FROM scratch\n",
                   "app/x": os.urandom(1 << 20)})
    data = gzip.compress(data) if compress else data
    stdin(data)
    assert sbx(capsys, "build", "-t", "app:1", "-f", "app/Dockerfile.prod", "-") \
        == (0, SUCCESS_OUT, "[Warning] the build argument UNUSED was not used\n")
    (sent,) = fake.received
    assert sent.body == data
    assert sent.params("dockerfile") == ["app/Dockerfile.prod"] and sent.chunked


def test_a_lone_dockerfile_on_stdin_is_the_whole_context(
        fake: Fake, capsys: pytest.CaptureFixture[str], stdin: Any) -> None:
    stdin(b"FROM busybox\nCMD [\"sh\"]\n")
    assert sbx(capsys, "build", "-")[0] == 0
    (sent,) = fake.received
    assert list(sent.members()) == ["Dockerfile"] and sent.params("dockerfile") == []
    assert sent.content("Dockerfile") == b"FROM busybox\nCMD [\"sh\"]\n"


@pytest.mark.parametrize(("argv", "data", "message"), [
    (["-f", "-", "-"], b"FROM busybox\n", "-f - reads the Dockerfile from stdin"),
    (["-"], b"\xfd7zXZ\x00rest", "the context on stdin is xz-compressed"),
    (["-"], b"", "stdin is empty"),
    (["-f", "Dockerfile", "-"], b"FROM busybox\n", "stdin holds a Dockerfile, not a context"),
])
def test_stdin_that_cannot_be_a_context_is_refused(
        fake: Fake, capsys: pytest.CaptureFixture[str], stdin: Any, argv: list[str],
        data: bytes, message: str) -> None:
    stdin(data)
    code, out, err = sbx(capsys, "build", *argv)
    assert (code, out) == (1, "") and err.startswith(f"sbx: {message}")
    assert fake.received == []


def test_options_travel_as_the_contracts_query(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = _context(tmp_path / "ctx")
    monkeypatch.setenv("FROM_SHELL", "yes")
    monkeypatch.delenv("NOT_SET", raising=False)
    assert sbx(capsys, "build", "-t", "app:1", "--tag", "registry.example/app:2",
               "--build-arg", "A=1=2", "--build-arg", "FROM_SHELL", "--build-arg", "NOT_SET",
               "--build-arg", "EMPTY=", "--target", "builder", "--no-cache",
               "--platform", "linux/arm64/v8", str(root))[0] == 0
    assert sbx(capsys, "build", str(root))[0] == 0
    full, bare = fake.received
    assert full.query == [("tag", "app:1"), ("tag", "registry.example/app:2"),
                          ("build_arg", "A=1=2"), ("build_arg", "FROM_SHELL=yes"),
                          ("build_arg", "EMPTY="), ("target", "builder"),
                          ("platform", "linux/arm64/v8"), ("no_cache", "true")]
    assert bare.query == []
    with pytest.raises(SystemExit) as e:
        main(["build", "--build-arg", "=x", str(root)])
    assert e.value.code == 2


# What it shows


def test_the_output_is_dockers_classic_builders(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = _context(tmp_path / "ctx")
    assert sbx(capsys, "build", "-t", "app:1", str(root)) == (
        0, SUCCESS_OUT, "[Warning] the build argument UNUSED was not used\n")


def test_quiet_prints_only_the_image_id(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = _context(tmp_path / "ctx")
    assert sbx(capsys, "build", "-q", str(root)) == (0, CONFIG + "\n", "")
    fake.script = FAILURE  # a failure shows what was kept back, on stderr
    assert sbx(capsys, "build", "--quiet", str(root)) == (1, "", FAILURE_OUT + FAILURE_ERR)


def test_a_failed_build_exits_1_after_its_output(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake.script = FAILURE
    assert sbx(capsys, "build", str(_context(tmp_path / "ctx"))) \
        == (1, FAILURE_OUT, FAILURE_ERR)


def test_a_refused_build_exits_1(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake.refusal = (400, {"code": "invalid_field", "field": "tag",
                          "message": "tag 'Bad Tag' is not a valid reference"})
    assert sbx(capsys, "build", "-t", "Bad Tag", str(_context(tmp_path / "ctx"))) == (
        1, "", "sbx: tag 'Bad Tag' is not a valid reference (field: tag)\n")
    code, _, err = sbx(capsys, "build", str(tmp_path / "none"))
    assert code == 1 and "is not a directory" in err


@pytest.mark.parametrize("cut", [False, True])
def test_a_stream_that_stops_early_is_a_failure(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path, cut: bool) -> None:
    fake.script, fake.cut = SUCCESS[:5], cut
    code, out, err = sbx(capsys, "build", str(_context(tmp_path / "ctx")))
    assert (code, out) == (1, "\n".join(SUCCESS_OUT.splitlines()[:5]) + "\n")
    assert err.startswith("sbx: ") and "Successfully" not in out
    reason = "failed mid-answer" if cut else "closed the build's stream before it finished"
    assert reason in err


def test_builder_prune_says_what_it_freed(
        fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert sbx(capsys, "builder", "prune", "-af") == (
        0, "Deleted build cache entries: 3\nTotal reclaimed space: 5.0 MiB\n", "")


# The client


def test_client_build_yields_typed_events_and_raises_a_failure(fake: Fake) -> None:
    async def go() -> tuple[list[Any], list[Any], BuildError]:
        async with Client() as c:
            events = [e async for e in c.build(_tar(Dockerfile=b"FROM busybox\n"),
                                               tags=["app:1"], build_args={"A": "1"})]
            fake.script = FAILURE
            seen = []
            with pytest.raises(BuildError) as e:
                async for event in c.build(io.BytesIO(_tar(Dockerfile=b"FROM x\n"))):
                    seen.append(event)
            return events, seen, e.value

    events, seen, error = asyncio.run(go())
    assert events[:2] == [BuildStep(1, 3, None, 1, "FROM busybox"),
                          StepDone(1, False, None, 0.01)]
    assert events[5:8] == [BuildOutput(3, "stdout", "cc -o app"),
                           BuildOutput(3, "stderr", " main.c\nmain.c:1: warning\n"),
                           BuildWarning("the build argument UNUSED was not used")]
    assert events[4].stage == "app"
    assert events[-1] == Built(DIGEST, CONFIG, ("docker.io/library/app:1",
                                                "127.0.0.1:5000/team/app:2"))
    assert seen[-1] == BuildOutput(2, "stdout", "make: *** [all] Error 1") and len(seen) == 4
    assert (error.code, error.step, error.line) == ("build_failed", 2, 5)
    assert str(error) == "Dockerfile:5: RUN exited with status 1: make"
    assert fake.received[0].query == [("tag", "app:1"), ("build_arg", "A=1")]


def test_client_build_raises_what_reading_the_context_raised(fake: Fake) -> None:
    async def context() -> AsyncIterator[bytes]:
        yield b"\0" * 1024
        raise ValueError("the disk went away")

    async def go() -> None:
        async with Client() as c:
            with pytest.raises(ValueError, match="the disk went away"):
                [e async for e in c.build(context())]
            fake.refusal = (400, {"code": "invalid_field", "field": "platform",
                                  "message": "no such platform"})
            with pytest.raises(ApiError) as e:
                [e async for e in c.build(b"")]
            assert (e.value.status, e.value.field) == (400, "platform")

    asyncio.run(go())
    assert fake.received == []


def test_sync_client_builds_and_prunes(fake: Fake) -> None:
    with SyncClient(fake.url) as c:
        assert list(c.build(_tar(Dockerfile=b"FROM busybox\n")))[-1].config_digest == CONFIG
        assert c.prune_build_cache() == {"removed": 3, "freed_bytes": 5 << 20}
