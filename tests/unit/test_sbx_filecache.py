"""The client's and `sbx`'s side of the file cache (/v1/files, files by id, copy_out and
copy_out_cached) against a small fake of the API, served by aiohttp on a private loop in a
thread, as tests/unit/test_client.py does for the rest."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from sbx.cli import main
from sbx.client import ApiError, Client, FromCache, SyncClient

DIGEST = "sha256:" + "ab" * 32
CUT = "sha256:" + "cc" * 32   # an id whose download the fake cuts short
UNKNOWN = "sha256:" + "00" * 32


def _error(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    err = {"code": code, "message": message} | ({"field": field} if field else {})
    return web.Response(status=status, body=orjson.dumps({"error": err}),
                        content_type="application/json")


def _id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


OUT_ID = _id(b"\0out")  # what every fake run leaves at /tmp/out


class Fake:
    """Keeps files in memory by id; a run "writes" /tmp/out (b"\\0out") and nothing else."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.runs: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/files", self.put)
        app.router.add_get("/v1/files", self.list_)
        app.router.add_get("/v1/files/{id}", self.get)
        app.router.add_delete("/v1/files/{id}", self.delete)
        app.router.add_post("/v1/runs", self.run)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    @staticmethod
    def entry(file_id: str, data: bytes) -> dict[str, Any]:
        return {"id": file_id, "size": len(data), "created": 0, "last_used": 0,
                "expires": 86400}

    async def put(self, request: web.Request) -> web.Response:
        data = await request.read()
        if request.content_type != "application/octet-stream":
            return _error(415, "unsupported_media_type", "send application/octet-stream")
        if not data:
            return _error(400, "invalid_request", "the body is empty")
        self.files[_id(data)] = data
        return web.json_response(self.entry(_id(data), data), status=201)

    async def list_(self, request: web.Request) -> web.Response:
        return web.json_response({"files": [self.entry(i, d) for i, d in self.files.items()]})

    async def get(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["id"]
        if file_id == CUT:  # as sandboxd does when a download fails once begun
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(b"x" * 10)
            assert request.transport is not None
            request.transport.close()
            return resp
        if file_id not in self.files:
            return _error(404, "not_found", f"id: no file {file_id}", "id")
        return web.Response(body=self.files[file_id], content_type="application/octet-stream")

    async def delete(self, request: web.Request) -> web.Response:
        if self.files.pop(request.match_info["id"], None) is None:
            return _error(404, "not_found", f"id: no file {request.match_info['id']}", "id")
        return web.Response(status=204)

    async def run(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.runs.append(body)
        written = {"/tmp/out": b"\0out"}
        result: dict[str, Any] = {"id": "r1", "status": "ok", "exit_code": 0, "signal": None,
                                  "stdout": "", "stderr": "", "warnings": []}
        wanted = [*body.get("copy_out", []), *body.get("copy_out_cached", [])]
        if "copy_out" in body:
            encode = (base64.b64encode if body.get("output_encoding") == "base64"
                      else lambda data: data)
            result["files"] = {p: encode(written[p]).decode() for p in body["copy_out"]
                               if p in written}
        if "copy_out_cached" in body:
            result["file_ids"] = {}
            for p in body["copy_out_cached"]:
                if p in written:
                    self.files[_id(written[p])] = written[p]
                    result["file_ids"][p] = {"id": _id(written[p]), "size": len(written[p])}
        if wanted:
            result["file_errors"] = {p: f"{p} does not exist" for p in wanted
                                     if p not in written}
        if "x-ndjson" not in request.headers.get("Accept", ""):
            return web.json_response(result)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        exit_ = {k: v for k, v in result.items() if k not in ("stdout", "stderr")}
        await resp.write(orjson.dumps({"event": "exit", **exit_}) + b"\n")
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def service() -> Iterator[Fake]:
    fake = Fake()
    yield fake
    fake.close()


@pytest.fixture
def fake(service: Fake, monkeypatch: pytest.MonkeyPatch) -> Fake:
    service.files.clear()
    service.runs.clear()
    monkeypatch.setenv("SANDBOXD_URL", service.url)
    monkeypatch.delenv("SANDBOXD_TOKEN", raising=False)
    return service


def sbx(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# The client


def test_the_client_stores_lists_downloads_and_deletes(fake: Fake, tmp_path: Path) -> None:
    data = b"\0binary\xff" * 1000
    local = tmp_path / "a.out"
    local.write_bytes(data + b"!")

    async def go() -> None:
        async with Client() as c:
            entry = await c.put_cached_file(data)
            assert entry["id"] == _id(data) and entry["size"] == len(data)
            assert (await c.put_cached_file(local))["id"] == _id(data + b"!")
            assert (await c.put_cached_file(io.BytesIO(b"stream")))["id"] == _id(b"stream")
            assert {f["id"] for f in await c.list_cached_files()} == {
                _id(data), _id(data + b"!"), _id(b"stream")}
            assert await c.get_cached_file(entry["id"]) == data
            chunks: list[bytes] = []
            assert await c.download_cached_file(entry["id"], chunks.append) == len(data)
            assert b"".join(chunks) == data
            await c.delete_cached_file(entry["id"])
            with pytest.raises(ApiError) as e:
                await c.get_cached_file(entry["id"])
            assert (e.value.status, e.value.field) == (404, "id")
            with pytest.raises(ApiError) as e:
                await c.delete_cached_file(entry["id"])
            assert e.value.status == 404
            with pytest.raises(ApiError) as e:
                await c.get_cached_file(CUT)
            assert e.value.code == "incomplete"

    asyncio.run(go())


def test_runs_send_files_by_id_and_copy_out_and_read_what_came_back(fake: Fake) -> None:
    with SyncClient() as c:
        result = c.run("busybox", ["true"], files=[FromCache("/w/prog", DIGEST, 0o755)],
                       copy_out=["/tmp/out", "/tmp/gone"], copy_out_cached=["/tmp/out"],
                       binary=True)
        body = fake.runs[-1]
        assert body["files"] == [{"path": "/w/prog", "mode": 0o755, "file_id": DIGEST}]
        assert (body["copy_out"], body["copy_out_cached"]) == (["/tmp/out", "/tmp/gone"],
                                                               ["/tmp/out"])
        assert result.files == {"/tmp/out": b"\0out"}
        assert result.file_ids == {"/tmp/out": {"id": OUT_ID, "size": 4}}
        assert result.file_errors == {"/tmp/gone": "/tmp/gone does not exist"}
        text = c.run("busybox", ["true"], copy_out=["/tmp/out"])
        assert text.files == {"/tmp/out": "\0out"} and text.file_ids == {}
        plain = c.run("busybox", ["true"])
        assert (plain.files, plain.file_ids, plain.file_errors) == ({}, {}, {})
        assert "copy_out" not in fake.runs[-1]
        assert c.get_cached_file(OUT_ID) == b"\0out"  # what copy_out_cached stored


# sbx


def test_sbx_file_commands(fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "prog"
    src.write_bytes(b"\x7fELF fake")
    code, out, _ = sbx(capsys, "file", "put", str(src))
    assert (code, out) == (0, _id(b"\x7fELF fake") + "\n")
    read, write = os.pipe()
    os.write(write, b"from stdin")
    os.close(write)
    with open(read, "rb") as stdin:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(stdin))
        assert sbx(capsys, "file", "put", "-") == (0, _id(b"from stdin") + "\n", "")
    code, _, err = sbx(capsys, "file", "put", str(tmp_path / "none"))
    assert code == 125 and "is not a file" in err

    code, out, _ = sbx(capsys, "file", "ls")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "SIZE", "CREATED", "EXPIRES"]
    assert {line.split()[0] for line in lines[1:]} == {_id(b"\x7fELF fake"), _id(b"from stdin")}
    code, out, _ = sbx(capsys, "file", "ls", "--json")
    assert code == 0 and len(orjson.loads(out)) == 2

    dest = tmp_path / "copy"
    assert sbx(capsys, "file", "get", _id(b"\x7fELF fake"), "-o", str(dest))[0] == 0
    assert dest.read_bytes() == b"\x7fELF fake"
    code, _, err = sbx(capsys, "file", "get", CUT, "-o", str(dest))
    assert code == 125 and "stopped partway" in err
    assert dest.read_bytes() == b"\x7fELF fake"  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "prog"]  # no spool left

    assert sbx(capsys, "file", "rm", _id(b"from stdin"), UNKNOWN) == (
        125, _id(b"from stdin") + "\n", f"sbx: {UNKNOWN}: id: no file {UNKNOWN} (field: id)\n")
    assert set(fake.files) == {_id(b"\x7fELF fake")}


def test_sbx_file_get_writes_the_exact_bytes_to_stdout(
        fake: Fake, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    fake.files[_id(b"\0\xff")] = b"\0\xff"
    assert main(["file", "get", _id(b"\0\xff")]) == 0
    assert capsysbinary.readouterr().out == b"\0\xff"


def test_sbx_run_copies_out_and_takes_cached_files(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = sbx(capsys, "run", "--cached-file", f"{DIGEST}:/w/prog",
                       "--copy-out", "/tmp/out", "--copy-out", "/tmp/gone",
                       "--copy-out-cached", "/tmp/out", "--copy-out-cached", "/tmp/gone2",
                       "busybox", "--", "/w/prog")
    assert code == 0
    body = fake.runs[-1]
    assert body["files"] == [{"path": "/w/prog", "mode": 0o755, "file_id": DIGEST}]
    assert body["copy_out"] == ["/tmp/out", "/tmp/gone"]
    assert body["copy_out_cached"] == ["/tmp/out", "/tmp/gone2"]
    assert (tmp_path / "out").read_bytes() == b"\0out"
    assert err.splitlines() == [
        "sbx: warning: --copy-out /tmp/gone: /tmp/gone does not exist",
        f"sbx: /tmp/out cached as {OUT_ID} (4 B)",
        "sbx: warning: --copy-out-cached /tmp/gone2: /tmp/gone2 does not exist",
    ]
    code, _, err = sbx(capsys, "run", "--copy-out", "/tmp/out:missing-dir/x", "busybox")
    assert code == 125 and "cannot write missing-dir/x" in err


def test_sbx_run_copy_out_to_a_directory_that_is_there(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "saved").mkdir()
    dest = tmp_path / "saved" / "here"
    assert sbx(capsys, "run", "--copy-out", f"/tmp/out:{dest}", "busybox")[0] == 0
    assert dest.read_bytes() == b"\0out"


@pytest.mark.parametrize("argv", [["file"], ["file", "put"], ["file", "ls"], ["file", "get"],
                                  ["file", "rm"], ["run"]])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert f"SYNOPSIS\n    sbx {' '.join(argv)} [-h]" in capsys.readouterr().out


def test_bad_option_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["run", "--cached-file", "no-path", "busybox"],
                 ["run", "--copy-out", "relative/path", "busybox"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "--copy-out takes /container/path[:LOCAL]" in capsys.readouterr().err
