"""A run's cached files through the API: bound read-only by default (no copy), executable
when `mode` has an exec bit, a writable copy with `"copy": true`; a path through a planted
symbolic link is a 400 naming it; another tenant's id is the same 404 as an unknown one."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.service.conftest import LIMITED_TOKEN, Service

LIMITED = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
PATH = {"PATH": "/bin"}
PROGRAM = b'#!/bin/sh\necho "ran $0"\n'


async def _put(s: aiohttp.ClientSession, data: bytes) -> str:
    async with s.post("/v1/files", data=data,
                      headers={"Content-Type": "application/octet-stream"}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["id"])


async def _run(s: aiohttp.ClientSession, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.post("/v1/runs", json=body, headers=headers) as r:
        return r.status, await r.json()


def test_bound_by_default_a_writable_copy_when_asked(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        fid = await _put(s, PROGRAM)
        for policy in ("judge", "default"):
            status, body = await _run(s, {
                "image": images.oci, "policy": policy, "env": PATH,
                "cmd": ["sh", "-c", "/tmp/bound; /tmp/copy; stat -c '%a' /tmp/bound; "
                        "echo more >> /tmp/copy && tail -1 /tmp/copy; "
                        "sh -c 'echo x >> /tmp/bound' 2>/dev/null || echo read-only"],
                "files": [{"path": "/tmp/bound", "file_id": fid, "mode": 0o755},
                          {"path": "/tmp/copy", "file_id": fid, "mode": 0o755,
                           "copy": True}]})
            assert status == 200 and body["status"] == "ok", body
            assert body["stdout"] == "ran /tmp/bound\nran /tmp/copy\n555\nmore\nread-only\n"

    service.call(go)


def test_a_planted_link_at_the_path_is_a_400_naming_it(service: Service,
                                                        images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        fid = await _put(s, PROGRAM)
        async with s.post("/v1/containers", json={"image": images.oci}) as r:
            sid = (await r.json())["id"]
        try:
            async with s.post(f"/v1/containers/{sid}/exec", json={
                    "cmd": ["ln", "-s", "/etc/passwd", "/tmp/x"], "env": PATH}) as r:
                assert (await r.json())["status"] == "ok"
            async with s.post(f"/v1/containers/{sid}/exec", json={
                    "cmd": ["cat", "/etc/passwd"], "env": PATH,
                    "files": [{"path": "/tmp/x", "file_id": fid}]}) as r:
                body = await r.json()
                assert r.status == 400, body
                assert body["error"]["message"].startswith(
                    "/tmp/x is a symbolic link (-> '/etc/passwd')"), body
        finally:
            async with s.delete(f"/v1/containers/{sid}") as r:
                assert r.status == 204

    service.call(go)


def test_another_tenants_id_binds_nothing(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        fid = await _put(s, PROGRAM + b"# tenant main's\n")
        status, body = await _run(s, {
            "image": images.oci, "policy": "judge", "cmd": ["cat", "/tmp/p"], "env": PATH,
            "files": [{"path": "/tmp/p", "file_id": fid}]}, LIMITED)
        assert status == 404 and body["error"]["field"] == "files[0].file_id", body

    service.call(go)
