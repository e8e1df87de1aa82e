"""The file cache through the API (issue #13): /v1/files (upload, list, download, delete),
files given to runs by id, copy_out and copy_out_cached (compile once, run every case from
the cache), each tenant's files its own, and the quotas (a service of this module's own)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.service.conftest import LIMITED_TOKEN, Service
from tests.service.own_service import OwnService, own_service

LIMITED = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
OCTETS = {"Content-Type": "application/octet-stream"}
PATH = {"PATH": "/bin"}
UNKNOWN = "sha256:" + "0" * 64


def _id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _put(s: aiohttp.ClientSession, data: bytes,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.post("/v1/files", data=data, headers={**OCTETS, **(headers or {})}) as r:
        return r.status, await r.json()


async def _get(s: aiohttp.ClientSession, file_id: str,
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with s.get(f"/v1/files/{file_id}", headers=headers) as r:
        return r.status, await r.read()


async def _delete(s: aiohttp.ClientSession, file_id: str,
                  headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.delete(f"/v1/files/{file_id}", headers=headers) as r:
        return r.status, (await r.json() if r.status != 204 else None)


async def _ids(s: aiohttp.ClientSession, headers: dict[str, str] | None = None) -> list[str]:
    async with s.get("/v1/files", headers=headers) as r:
        assert r.status == 200, await r.text()
        return [f["id"] for f in (await r.json())["files"]]


async def _run(s: aiohttp.ClientSession, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.post("/v1/runs", json=body, headers=headers) as r:
        return r.status, await r.json()


def _sh(image: str, script: str, **kw: Any) -> dict[str, Any]:
    return {"image": image, "cmd": ["sh", "-c", script], "env": PATH, **kw}


def test_a_file_is_stored_listed_downloaded_and_deleted(service: Service) -> None:
    data = b"\0\xff binary " + os.urandom(100_000)

    async def go(s: aiohttp.ClientSession) -> None:
        status, entry = await _put(s, data)
        assert status == 201, entry
        assert entry["id"] == _id(data) and entry["size"] == len(data)
        assert entry["created"] <= entry["last_used"] < entry["expires"]
        async with s.get("/v1/files") as r:
            listed = {f["id"]: f for f in (await r.json())["files"]}
        assert set(listed[entry["id"]]) == {"id", "size", "created", "last_used", "expires"}
        async with s.get(f"/v1/files/{entry['id']}") as r:
            assert r.status == 200
            assert r.content_type == "application/octet-stream"
            assert r.content_length == len(data)
            assert await r.read() == data
        assert await _delete(s, entry["id"]) == (204, None)
        status, _ = await _get(s, entry["id"])
        assert status == 404
        status, body = await _delete(s, entry["id"])
        assert status == 404 and body["error"]["field"] == "id", body
        assert entry["id"] not in await _ids(s)

    service.call(go)


def test_the_same_bytes_are_one_file(service: Service) -> None:
    data = os.urandom(5000)

    async def go(s: aiohttp.ClientSession) -> None:
        _, first = await _put(s, data)
        _, again = await _put(s, data)
        assert again["id"] == first["id"] and again["created"] == first["created"]
        assert again["expires"] >= first["expires"]  # storing it again is a use
        assert (await _ids(s)).count(first["id"]) == 1
        _, other = await _put(s, data + b"!")
        assert other["id"] != first["id"]

    service.call(go)


def test_bad_requests_say_what_to_send(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        status, body = await _put(s, b"")
        assert status == 400, body
        assert "the body is empty" in body["error"]["message"]
        assert "application/octet-stream" in body["error"]["message"]
        for bad in ("not-an-id", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "md5:00"):
            async with s.get(f"/v1/files/{bad}") as r:
                err = (await r.json())["error"]
                assert r.status == 400 and err["field"] == "id", err
                assert err["message"].startswith("id: ") and "sha256:" in err["message"]
            status, body = await _delete(s, bad)
            assert status == 400 and body["error"]["field"] == "id", body
        status, body = await _run(s, _sh(images.oci, "true", files=[
            {"path": "/tmp/a", "file_id": "nope"}]))
        assert status == 400 and body["error"]["field"] == "files[0].file_id", body
        status, body = await _run(s, _sh(images.oci, "true", files=[
            {"path": "/tmp/a", "file_id": UNKNOWN, "content": "x"}]))
        assert status == 400 and "exactly one of content, content_base64 and file_id" in \
            body["error"]["message"], body
        status, body = await _run(s, _sh(images.oci, "true", copy_out=["tmp/a"]))
        assert status == 400 and body["error"]["field"] == "copy_out[0]", body
        status, body = await _run(s, _sh(images.oci, "true",
                                         copy_out_cached=["/tmp/../etc/passwd"]))
        assert status == 400 and body["error"]["field"] == "copy_out_cached[0]", body
        status, body = await _run(s, _sh(images.oci, "true",
                                         copy_out=[f"/tmp/{i}" for i in range(65)]))
        assert status == 400 and body["error"]["field"] == "copy_out", body

    service.call(go)


def test_a_tenant_sees_only_its_own_files(service: Service, images: Any) -> None:
    """Another tenant's id answers exactly as one never stored: no GET, DELETE, listing or
    use in a run; storing the same bytes gives it a file of its own."""
    data = b"secret of the main tenant " + os.urandom(64)
    file_id = _id(data)

    async def go(s: aiohttp.ClientSession) -> None:
        assert (await _put(s, data))[0] == 201
        async with s.get(f"/v1/files/{file_id}", headers=LIMITED) as r:
            theirs = (r.status, await r.json())
        async with s.get(f"/v1/files/{UNKNOWN}", headers=LIMITED) as r:
            unknown = (r.status, await r.json())
        assert theirs[0] == unknown[0] == 404
        assert theirs[1]["error"]["message"].replace(file_id, UNKNOWN) == \
            unknown[1]["error"]["message"]
        assert (await _delete(s, file_id, LIMITED))[0] == 404
        assert file_id not in await _ids(s, LIMITED)
        status, body = await _run(s, _sh(images.oci, "cat /tmp/stolen", files=[
            {"path": "/tmp/stolen", "file_id": file_id}]), LIMITED)
        assert status == 404 and body["error"]["field"] == "files[0].file_id", body
        assert await _get(s, file_id) == (200, data)  # its owner's is untouched

        # The same bytes stored by the other tenant: its own entry, and its own to delete.
        status, entry = await _put(s, data, LIMITED)
        assert (status, entry["id"]) == (201, file_id)
        assert await _get(s, file_id, LIMITED) == (200, data)
        assert (await _delete(s, file_id, LIMITED))[0] == 204
        assert await _get(s, file_id) == (200, data)

    service.call(go)


def test_a_run_takes_a_cached_file_by_id(service: Service, images: Any) -> None:
    script = b'echo "hello from $0 with $1"\n'

    async def go(s: aiohttp.ClientSession) -> None:
        _, entry = await _put(s, script)
        status, body = await _run(s, {
            "image": images.oci, "cmd": ["sh", "/work/hello.sh", "arg"], "env": PATH,
            "files": [{"path": "/work/hello.sh", "file_id": entry["id"], "mode": 0o600}]})
        assert status == 200 and body["status"] == "ok", body
        assert body["stdout"] == "hello from /work/hello.sh with arg\n"
        assert not {"files", "file_ids", "file_errors"} & set(body)  # none was asked for

    service.call(go)


def test_copy_out_returns_files_and_reports_what_it_could_not(service: Service,
                                                              images: Any) -> None:
    script = r"printf 'text\n' > /tmp/a.txt; printf '\000\377' > /tmp/b.bin; mkdir /tmp/d"
    wanted = ["/tmp/a.txt", "/tmp/b.bin", "/tmp/missing", "/tmp/d"]

    async def go(s: aiohttp.ClientSession) -> None:
        status, body = await _run(s, _sh(images.oci, script, copy_out=wanted,
                                         output_encoding="base64"))
        assert status == 200 and body["status"] == "ok", body
        files = {p: base64.b64decode(v) for p, v in body["files"].items()}
        assert files == {"/tmp/a.txt": b"text\n", "/tmp/b.bin": b"\0\xff"}
        assert set(body["file_errors"]) == {"/tmp/missing", "/tmp/d"}
        assert all(body["file_errors"].values())
        assert "file_ids" not in body
        status, body = await _run(s, _sh(images.oci, script, copy_out=["/tmp/a.txt"]))
        assert body["files"] == {"/tmp/a.txt": "text\n"} and body["file_errors"] == {}
        # A run that failed still gives back what it wrote.
        status, body = await _run(s, _sh(images.oci, f"{script}; exit 3",
                                         copy_out=["/tmp/a.txt"]))
        assert body["status"] == "nonzero_exit" and body["files"] == {"/tmp/a.txt": "text\n"}

    service.call(go)


def test_compile_once_then_run_every_case_from_the_cache(service: Service,
                                                         images: Any) -> None:
    """The judge's workflow: a first run "compiles" (writes a program) and stores it with
    copy_out_cached; its id downloads the same bytes and feeds each case's run."""
    source = b'#!/bin/sh\nread n\necho "GREETING case $n"\n'
    program = source.replace(b"GREETING", b"hello")

    async def go(s: aiohttp.ClientSession) -> None:
        status, built = await _run(s, _sh(
            images.oci, "sed s/GREETING/hello/ /src/prog.sh > /tmp/prog",
            files=[{"path": "/src/prog.sh", "content": source.decode()}],
            copy_out_cached=["/tmp/prog"]))
        assert status == 200 and built["status"] == "ok", built
        assert built["file_errors"] == {} and "files" not in built
        ref = built["file_ids"]["/tmp/prog"]
        assert ref == {"id": _id(program), "size": len(program)}
        assert await _get(s, ref["id"]) == (200, program)
        assert ref["id"] in await _ids(s)
        for n in range(3):
            status, case = await _run(s, {
                "image": images.oci, "policy": "judge", "cmd": ["/tmp/prog"], "env": PATH,
                "stdin": f"{n}\n",
                "files": [{"path": "/tmp/prog", "file_id": ref["id"], "mode": 0o755}]})
            assert status == 200 and case["status"] == "ok", case
            assert case["stdout"] == f"hello case {n}\n"

    service.call(go)


def test_copy_out_comes_in_the_exit_event_and_from_sessions(service: Service,
                                                            images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/runs", json=_sh(images.oci, "echo out; echo saved > /tmp/f",
                                               copy_out=["/tmp/f"],
                                               copy_out_cached=["/tmp/f", "/tmp/none"]),
                          headers={"Accept": "application/x-ndjson"}) as r:
            assert r.status == 200
            events = [orjson.loads(line) for line in (await r.read()).splitlines()]
        exit_ = events[-1]
        assert exit_["event"] == "exit" and exit_["status"] == "ok", exit_
        assert exit_["files"] == {"/tmp/f": "saved\n"}
        assert exit_["file_ids"] == {"/tmp/f": {"id": _id(b"saved\n"), "size": 6}}
        assert set(exit_["file_errors"]) == {"/tmp/none"}

        async with s.post("/v1/containers", json={"image": images.oci}) as r:
            assert r.status == 201, await r.text()
            sid = (await r.json())["id"]
        try:
            _, entry = await _put(s, b"from the cache\n")
            async with s.post(f"/v1/containers/{sid}/exec", json={
                    "cmd": ["sh", "-c", "cat /tmp/in > /tmp/out; echo more >> /tmp/out"],
                    "env": PATH, "files": [{"path": "/tmp/in", "file_id": entry["id"]}],
                    "copy_out": ["/tmp/out"], "copy_out_cached": ["/tmp/out"]}) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            assert body["files"] == {"/tmp/out": "from the cache\nmore\n"}
            assert body["file_ids"]["/tmp/out"]["id"] == _id(b"from the cache\nmore\n")
        finally:
            async with s.delete(f"/v1/containers/{sid}") as r:
                assert r.status == 204

    service.call(go)


def test_the_document_shows_the_file_cache(service: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> dict[str, Any]:
        async with s.get("/openapi.json") as r:
            return dict(await r.json())
    doc = service.call(go)
    assert {"post", "get"} <= set(doc["paths"]["/v1/files"])
    assert {"get", "delete"} <= set(doc["paths"]["/v1/files/{id}"])
    file_schema = doc["components"]["schemas"]["File"]
    assert file_schema["allOf"] == [{"oneOf": [{"required": ["content"]},
                                               {"required": ["content_base64"]},
                                               {"required": ["file_id"]}]}]
    run = doc["components"]["schemas"]["RunRequest"]["properties"]
    assert run["copy_out"]["maxItems"] == run["copy_out_cached"]["maxItems"] == 64


# Quotas: a service of this module's own, with small ones (its tenant: the local one).

MAX_FILE = 600
BYTES_QUOTA = 1000


@pytest.fixture(scope="module")
def small(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[OwnService]:
    config = f"""
[limits]
file_bytes_per_tenant = {BYTES_QUOTA}
files_per_tenant = 2

[files]
max_file_bytes = {MAX_FILE}
"""
    with own_service(tmp_path_factory.mktemp("sandboxd-filecache"), config) as svc:
        yield svc


def _call(svc: OwnService, fn: Any) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession(svc.url) as s:
            return await fn(s)
    return asyncio.run(go())


def test_quotas_are_413_and_429_with_what_to_do(small: OwnService) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        status, body = await _put(s, b"x" * (MAX_FILE + 1))
        assert (status, body["error"]["code"]) == (413, "quota_exceeded"), body
        assert "max_file_bytes" in body["error"]["message"]
        first, second = b"a" * 500, b"b" * 400
        assert (await _put(s, first))[0] == 201
        assert (await _put(s, second))[0] == 201
        assert (await _put(s, first))[0] == 201  # held already: no more quota
        async with s.post("/v1/files", data=b"c", headers=OCTETS) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (429, "quota_exceeded"), body
            assert "Retry-After" not in r.headers  # waiting frees nothing: deleting does
        assert "max_files" in body["error"]["message"]
        assert "DELETE /v1/files/{id}" in body["error"]["message"]
        assert (await _delete(s, _id(second)))[0] == 204
        status, body = await _put(s, b"d" * (BYTES_QUOTA - len(first) + 1))
        assert (status, body["error"]["code"]) == (413, "quota_exceeded"), body
        assert f"quota of {BYTES_QUOTA} bytes" in body["error"]["message"]
        assert "DELETE /v1/files/{id}" in body["error"]["message"]
        assert await _ids(s) == [_id(first)]
        assert (await _delete(s, _id(first)))[0] == 204

    _call(small, go)


def test_a_copy_out_cached_over_a_quota_is_an_error_entry(small: OwnService,
                                                          images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        status, body = await _run(s, _sh(
            images.oci, f"head -c {MAX_FILE + 1} /dev/zero > /tmp/big; echo small > /tmp/ok",
            copy_out_cached=["/tmp/big", "/tmp/ok"]))
        assert status == 200 and body["status"] == "ok", body
        assert set(body["file_ids"]) == {"/tmp/ok"}
        assert f"over the {MAX_FILE} byte limit" in body["file_errors"]["/tmp/big"]
        assert (await _delete(s, body["file_ids"]["/tmp/ok"]["id"]))[0] == 204

    _call(small, go)
