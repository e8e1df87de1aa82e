"""Sessions: create, list, exec (JSON and NDJSON), files in and out (symlink- and
FIFO-safe), delete."""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.service.conftest import LIMITED_TOKEN, Service


async def _exec(s: aiohttp.ClientSession, sid: str, script: str,
                **kw: Any) -> dict[str, Any]:
    async with s.post(f"/v1/containers/{sid}/exec",
                      json={"cmd": ["sh", "-c", script], "env": {"PATH": "/bin"}, **kw}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def test_a_session_lives_through_execs_and_files(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/containers", json={"image": images.oci, "policy": "default"}) \
                as r:
            assert r.status == 201, await r.text()
            created = await r.json()
        sid = created["id"]
        assert created["alive"] is True and created["policy"] == "default"
        assert created["image"].startswith("sha256:") and images.oci in created["names"]
        async with s.get("/v1/containers") as r:
            assert sid in [c["id"] for c in (await r.json())["containers"]]
        async with s.get(f"/v1/containers/{sid}") as r:
            assert (await r.json())["id"] == sid

        # files in, through PUT and through exec's files
        async with s.put(f"/v1/containers/{sid}/files", params={"path": "/tmp/in/data.bin",
                                                                 "mode": "0600"},
                         data=b"\0\1binary") as r:
            assert r.status == 204, await r.text()
        out = await _exec(s, sid, "cat /tmp/in/data.bin | od -An -c | tr -s ' '; "
                                  "stat -c %a /tmp/in/data.bin; echo kept > /tmp/kept",
                          files=[{"path": "/tmp/in/second.txt", "content": "2\n"}])
        assert out["stdout"].split("\n")[1:] == ["600", ""], out
        assert "b i n a r y" in out["stdout"]
        assert (await _exec(s, sid, "cat /tmp/kept /tmp/in/second.txt"))["stdout"] == \
            "kept\n2\n"

        # files out: a file as bytes, a directory as a tar
        async with s.get(f"/v1/containers/{sid}/files", params={"path": "/tmp/in/data.bin"}) \
                as r:
            assert r.status == 200 and r.content_type == "application/octet-stream"
            assert await r.read() == b"\0\1binary"
        async with s.get(f"/v1/containers/{sid}/files", params={"path": "/tmp/in"}) as r:
            assert r.status == 200 and r.content_type == "application/x-tar"
            with tarfile.open(fileobj=io.BytesIO(await r.read())) as tar:
                names = {m.name.strip("./").split("/")[-1] for m in tar.getmembers()}
        assert {"data.bin", "second.txt"} <= names

        # streamed exec in the session
        async with s.post(f"/v1/containers/{sid}/exec", json={"cmd": ["cat", "/tmp/kept"]},
                          headers={"Accept": "application/x-ndjson"}) as r:
            lines = [orjson.loads(line) for line in (await r.read()).splitlines()]
        assert lines[0] == {"event": "stdout", "data": "kept\n"}
        assert lines[-1]["event"] == "exit" and lines[-1]["status"] == "ok"

        async with s.delete(f"/v1/containers/{sid}") as r:
            assert r.status == 204
        for method, path in (("GET", f"/v1/containers/{sid}"),
                             ("POST", f"/v1/containers/{sid}/exec"),
                             ("DELETE", f"/v1/containers/{sid}")):
            async with s.request(method, path, json={"cmd": ["true"]}) as r:
                assert r.status == 404, (method, path)
                assert (await r.json())["error"]["code"] == "not_found"
    service.call(go)


def test_copy_out_never_leaves_the_container_and_refuses_fifos(service: Service,
                                                                images: Any) -> None:
    """Copying out a symlink (to /etc/passwd), through one, or a FIFO is refused; a
    directory's links travel as links."""
    host_passwd = Path("/etc/passwd").read_bytes()
    planted = f"/etc/sandboxd-test-{uuid.uuid4().hex}"

    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/containers", json={"image": images.oci}) as r:
            sid = (await r.json())["id"]
        try:
            own = await _exec(s, sid, "cat /etc/passwd; ln -s /etc/passwd /tmp/link; "
                                      "ln -s ../../../../etc /tmp/up; mkfifo /tmp/fifo; "
                                      "mkdir /tmp/d; ln -s /etc/passwd /tmp/d/l")
            assert own["stdout"].encode() != host_passwd
            async with s.get(f"/v1/containers/{sid}/files",
                             params={"path": "/tmp/link"}) as r:
                assert r.status == 400
                error = (await r.json())["error"]
                assert "symbolic link" in error["message"] and error["field"] == "path"
            async with s.get(f"/v1/containers/{sid}/files",
                             params={"path": "/tmp/up/passwd"}) as r:
                assert r.status == 400
                assert "passes through the symbolic link /tmp/up" in (await r.text())
            async with s.get(f"/v1/containers/{sid}/files", params={"path": "/tmp/fifo"}) as r:
                assert r.status == 400
                assert "FIFO" in (await r.json())["error"]["message"]
            # A directory's symlinks travel as links, never as their targets' contents.
            async with s.get(f"/v1/containers/{sid}/files", params={"path": "/tmp/d"}) as r:
                with tarfile.open(fileobj=io.BytesIO(await r.read())) as tar:
                    (link,) = [m for m in tar.getmembers() if m.name.endswith("l")]
            assert link.issym() and link.linkname == "/etc/passwd"
            # Writing through a planted symlink stays inside the container too.
            async with s.put(f"/v1/containers/{sid}/files",
                             params={"path": "/tmp/up/" + planted.split("/")[-1]},
                             data=b"x") as r:
                assert r.status < 500, await r.text()
            assert not os.path.exists(planted)
            for bad in ("/tmp/../etc/x", "tmp/x", "/tmp/a\0b"):
                async with s.put(f"/v1/containers/{sid}/files", params={"path": bad},
                                 data=b"x") as r:
                    assert r.status == 400 and (await r.json())["error"]["field"] == "path"
            async with s.put(f"/v1/containers/{sid}/files",
                             params={"path": "/tmp/x", "mode": "99"}, data=b"x") as r:
                assert r.status == 400 and (await r.json())["error"]["field"] == "mode"
        finally:
            async with s.delete(f"/v1/containers/{sid}") as r:
                assert r.status == 204
    service.call(go)


def test_an_image_a_session_uses_cannot_be_removed(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/containers", json={"image": images.shared_b}) as r:
            session = await r.json()
        try:
            async with s.delete(f"/v1/images/{session['image']}") as r:
                assert r.status == 409, await r.text()
                err = (await r.json())["error"]
            assert err["code"] == "conflict" and "force" in err["message"]
        finally:
            async with s.delete(f"/v1/containers/{session['id']}") as r:
                assert r.status == 204
    service.call(go)


def test_a_session_is_invisible_to_other_tokens(service: Service, images: Any) -> None:
    """Another token gets 404 exactly as for a session that does not exist (not 403, which
    would tell that it does); the list shows each token only its own."""
    limited = service.headers(LIMITED_TOKEN)

    async def answer(s: aiohttp.ClientSession, method: str, path: str,
                     **kw: Any) -> tuple[int, Any]:
        async with s.request(method, path, headers=limited, **kw) as r:
            return r.status, None if r.status == 204 else await r.json()

    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/containers", json={"image": images.oci}) as r:
            mine = (await r.json())["id"]
        async with s.post("/v1/containers", json={"image": images.oci},
                          headers=limited) as r:
            assert r.status == 201, await r.text()
            theirs = (await r.json())["id"]
        try:
            missing = await answer(s, "GET", "/v1/containers/0123456789abcdef")
            assert missing[0] == 404
            files = f"/v1/containers/{mine}/files"
            for method, path, kw in (
                    ("GET", f"/v1/containers/{mine}", {}),
                    ("POST", f"/v1/containers/{mine}/exec", {"json": {"cmd": ["true"]}}),
                    ("PUT", files, {"params": {"path": "/tmp/x"}, "data": b"x"}),
                    ("GET", files, {"params": {"path": "/etc/passwd"}}),
                    ("DELETE", f"/v1/containers/{mine}", {})):
                status, body = await answer(s, method, path, **kw)
                assert status == 404, (method, path, body)
                assert body["error"]["message"] == missing[1]["error"]["message"].replace(
                    "0123456789abcdef", mine), body
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with s.ws_connect(f"/v1/containers/{mine}/exec/ws", headers=limited):
                    pass
            assert refused.value.status == 404
            _, listed = await answer(s, "GET", "/v1/containers")
            assert [c["id"] for c in listed["containers"]] == [theirs]
            assert (await answer(s, "GET", "/v1/info"))[1]["sessions"] == 1
            async with s.get("/v1/containers") as r:
                ids = [c["id"] for c in (await r.json())["containers"]]
            assert mine in ids and theirs not in ids
            async with s.get(f"/v1/containers/{theirs}") as r:
                assert r.status == 404
            # the owner still has it, untouched
            assert (await _exec(s, mine, "echo alive"))["stdout"] == "alive\n"
            assert (await answer(s, "GET", f"/v1/containers/{theirs}"))[0] == 200
        finally:
            async with s.delete(f"/v1/containers/{mine}") as r:
                assert r.status == 204
            assert (await answer(s, "DELETE", f"/v1/containers/{theirs}"))[0] == 204
    service.call(go)
