"""POST /v1/containers/{id}/commit (`docker commit`): a session's changes become an image of
the caller's that runs at once, can be pushed, and reads back with skopeo; bad input is a
4xx naming the field; another tenant reaches nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from typing import Any

import aiohttp
import orjson
import pytest

from tests.service.conftest import LIMITED_TOKEN, Service

PATH = {"PATH": "/bin"}
LIMITED = {"Authorization": f"Bearer {LIMITED_TOKEN}"}


async def _session(s: aiohttp.ClientSession, image: str, policy: str = "default") -> str:
    async with s.post("/v1/containers", json={"image": image, "policy": policy}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["id"])


async def _sh(s: aiohttp.ClientSession, sid: str, script: str, **kw: Any) -> dict[str, Any]:
    async with s.post(f"/v1/containers/{sid}/exec",
                      json={"cmd": ["sh", "-c", script], "env": PATH, **kw}) as r:
        assert r.status == 200, await r.text()
        out: dict[str, Any] = await r.json()
    assert out["status"] == "ok", out
    return out


async def _delete(s: aiohttp.ClientSession, sid: str) -> None:
    async with s.delete(f"/v1/containers/{sid}") as r:
        assert r.status == 204


async def _commit(s: aiohttp.ClientSession, sid: str, **body: Any) -> tuple[int, Any]:
    async with s.post(f"/v1/containers/{sid}/commit", json=body) as r:
        return r.status, await r.json()


async def _run(s: aiohttp.ClientSession, image: str, cmd: list[str] | None = None,
               **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"image": image, **kw}
    if cmd is not None:
        body["cmd"] = cmd
    async with s.post("/v1/runs", json=body) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


def test_commit_makes_an_image_of_the_changes(service: Service, images: Any) -> None:
    name = f"{service.registry_host}/commit/changed:1"

    async def go(s: aiohttp.ClientSession) -> None:
        sid = await _session(s, images.oci)
        # Container root owns the image's files (runs hold no capabilities: no chown).
        # /etc/hostname is the runtime's: the image keeps its own.
        await _sh(s, sid, "echo new > /new.txt && echo changed >> /etc/passwd"
                          " && echo changed > /etc/hostname"
                          " && rm /etc/group && mkdir -p /data && chmod 777 /data"
                          " && ln -s / /data/up && echo t > /tmp/gone", user="0")
        # A file only its owner may read, in a directory only it may enter.
        await _sh(s, sid, "mkdir -m 700 /data/own && echo secret > /data/own/s"
                          " && chmod 600 /data/own/s", user="1000")
        status, image = await _commit(
            s, sid, reference=name, message="judge toolchain", author="Jane <j@example.com>",
            changes=["CMD [\"cat\", \"/new.txt\"]", "ENV GREETING=hello WHO=\"the world\"",
                     "WORKDIR /data", "LABEL team=judge", "EXPOSE 8080", "USER 0:0"])
        assert status == 201, image
        assert name in image["names"] and image["digest"].startswith("sha256:")

        out = await _run(s, name)  # the new CMD, as the new USER, in the new WORKDIR
        assert (out["status"], out["stdout"]) == ("ok", "new\n"), out
        out = await _run(s, name, ["id", "-u"])
        assert out["stdout"] == "0\n", out
        out = await _run(s, name, ["sh", "-c", "echo $GREETING $WHO; pwd; tail -1 /etc/passwd;"
                                   " cat /etc/hostname;"
                                   " test -e /etc/group || echo no-group; readlink /data/up;"
                                   " stat -c '%u %a' /data/own;"
                                   " test -e /tmp/gone || echo tmp-left-out"], env=PATH)
        # The layer keeps uid 1000; a store unpacked by an unprivileged service cannot chown,
        # so its images show every file as container root's (Ownership "squash").
        owner = "1000" if os.geteuid() == 0 else "0"
        assert out["stdout"].splitlines() == [
            "hello the world", "/data", "changed", "sandbox", "no-group", "/", f"{owner} 700",
            "tmp-left-out"], out
        out = await _run(s, name, ["sh", "-c", "stat -c '%u %a' /data/own/s; cat /data/own/s"],
                         env=PATH, user=owner)
        assert out["stdout"] == f"{owner} 600\nsecret\n", out

        async with s.get(f"/v1/images/{name}") as r:
            assert r.status == 200
            inspected = await r.json()
        async with s.get(f"/v1/images/{images.oci}") as r:
            base = await r.json()
        config = inspected["config"]
        assert len(inspected["layers"]) == len(base["layers"]) + 1
        assert config["rootfs"]["diff_ids"][:-1] == base["config"]["rootfs"]["diff_ids"]
        assert config["history"][-1]["comment"] == "judge toolchain"
        assert config["history"][-1]["author"] == config["author"] == "Jane <j@example.com>"
        run = config["config"]
        assert run["Cmd"] == ["cat", "/new.txt"] and run["WorkingDir"] == "/data"
        assert run["Labels"] == {"team": "judge"} and "8080/tcp" in run["ExposedPorts"]
        assert "GREETING=hello" in run["Env"] and "WHO=the world" in run["Env"]

        # The session itself goes on as it was.
        assert (await _sh(s, sid, "cat /new.txt"))["stdout"] == "new\n"
        await _delete(s, sid)
        out = await _run(s, name, ["cat", "/new.txt"])  # the image outlives its session
        assert out["stdout"] == "new\n"

        # Pushed, it reads back with an independent tool.
        async with s.post("/v1/images/push", json={"source": name}) as r:
            assert r.status == 200, await r.text()
        if shutil.which("skopeo") is None:
            pytest.skip("skopeo is not installed")
        raw = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--config",
                              f"docker://{name}"], capture_output=True, check=True).stdout
        pushed = orjson.loads(raw)
        assert pushed["rootfs"]["diff_ids"] == config["rootfs"]["diff_ids"]
        assert pushed["config"]["Labels"] == {"team": "judge"}

    service.call(go)


def test_a_read_only_root_commits_an_empty_layer(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        sid = await _session(s, images.oci, policy="judge")
        status, image = await _commit(s, sid, reference="commit/judge:1",
                                      changes=["ENV MODE=judge"])
        assert status == 201, image
        out = await _run(s, "commit/judge:1", ["sh", "-c", "echo $MODE; cat /etc/hostname"],
                         env=PATH, policy="judge")
        assert out["stdout"] == "judge\nsandbox\n", out
        async with s.get("/v1/images/commit/judge:1") as r:
            assert len((await r.json())["layers"]) == len(
                (await (await s.get(f"/v1/images/{images.oci}")).json())["layers"]) + 1
        await _delete(s, sid)

    service.call(go)


def test_commit_is_the_callers_alone(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        sid = await _session(s, images.oci)
        await _sh(s, sid, "echo a-private > /mine", user="0")
        # Another tenant cannot commit it, nor learn that it exists.
        async with s.post(f"/v1/containers/{sid}/commit", headers=LIMITED,
                          json={"reference": "commit/stolen:1"}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"
        async with s.get("/v1/images/commit/stolen:1", headers=LIMITED) as r:
            assert r.status == 404
        status, _ = await _commit(s, sid, reference="commit/private:1")
        assert status == 201
        # Its name is the committer's: to another tenant it names nothing.
        async with s.get("/v1/images/commit/private:1", headers=LIMITED) as r:
            assert r.status == 404
        async with s.get("/v1/images", headers=LIMITED) as r:
            names = [n for i in (await r.json())["images"] for n in i["names"]]
        assert not any("commit/private" in n for n in names)
        await _delete(s, sid)

    service.call(go)


def test_bad_commits_are_4xx_naming_the_field(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        sid = await _session(s, images.oci)
        for body, status, field in (
                ({}, 400, "reference"),
                ({"reference": "Not A Name!"}, 400, "reference"),
                ({"reference": "commit/x:1", "changes": "CMD x"}, 400, "changes"),
                ({"reference": "commit/x:1", "changes": ["CMD [\"ok\"]", "RUN rm -rf /"]},
                 400, "changes[1]"),
                ({"reference": "commit/x:1", "changes": ["ENV"]}, 400, "changes[0]"),
                ({"reference": "commit/x:1", "author": 7}, 400, "author")):
            got, answer = await _commit(s, sid, **body)
            assert got == status, (body, answer)
            assert answer["error"]["field"] == field, (body, answer)
        got, answer = await _commit(s, "0123456789abcdef", reference="commit/x:1")
        assert got == 404 and answer["error"]["code"] == "not_found"

        # A run in progress: the commit is refused (409), and the run is unharmed.
        async with s.post(f"/v1/containers/{sid}/exec",
                          json={"cmd": ["sh", "-c", "echo started; sleep 2; echo done"],
                                "env": PATH},
                          headers={"Accept": "application/x-ndjson"}) as r:
            first = orjson.loads(await r.content.readline())
            assert first == {"event": "stdout", "data": "started\n"}
            got, answer = await _commit(s, sid, reference="commit/x:1")
            assert got == 409 and answer["error"]["code"] == "conflict", answer
            rest = [orjson.loads(line) for line in (await r.read()).splitlines()]
        assert rest[-1]["event"] == "exit" and rest[-1]["status"] == "ok"
        async with s.get("/v1/images/commit/x:1") as r:
            assert r.status == 404  # nothing was named by the refused commits
        await _delete(s, sid)

    service.call(go)


def test_commit_while_execs_arrive(service: Service, images: Any) -> None:
    """Execs sent while a commit reads the root wait for it: each one either went into the
    image whole or not at all, and none fails."""
    async def go(s: aiohttp.ClientSession) -> None:
        sid = await _session(s, images.oci)
        await _sh(s, sid, "mkdir -m 777 /n && i=0; while [ $i -lt 300 ]; do echo $i > /n/$i;"
                          " i=$((i+1)); done", user="0")
        commit = asyncio.ensure_future(_commit(s, sid, reference="commit/racing:1"))
        execs = [asyncio.ensure_future(_sh(s, sid, f"echo {i} > /n/late-{i}"))
                 for i in range(4)]
        status, image = await commit
        assert status == 201, image
        await asyncio.gather(*execs)
        out = await _run(s, "commit/racing:1", ["sh", "-c", "ls /n | wc -l; for f in /n/late-*;"
                                               " do [ -e $f ] && echo ${f#/n/late-}=$(cat $f);"
                                               " done"], env=PATH)
        count, *late = out["stdout"].split()
        assert 300 <= int(count) <= 304 and int(count) == 300 + len(late), out
        assert all(a == b for a, b in (x.split("=") for x in late)), late
        await _delete(s, sid)

    service.call(go)

