"""Sessions and jobs on many nodes (issue #14 point 3): three `sandboxd serve` nodes on
loopback, each with its own state directory and port, all naming each other in
`[cluster] peers`. A session or a job made on one node is used through another (HTTP,
streamed answers, the exec WebSocket); tenancy holds through the forward; an id of a node
this cluster does not know is a 404; an owner stopped, or never reachable, is a prompt 410
`node_gone`."""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.app import create_app
from service.config import load
from tests.service.conftest import (
    LIMITED_TOKEN,
    MAIN_TOKEN,
    Service,
    start_service,
    stop_service,
    wait_ready,
)
from tests.service.own_service import two_tenants

A = {"Authorization": f"Bearer {MAIN_TOKEN}"}
B = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
NODE = "Sandboxd-Node"
# A documentation address (RFC 5737): never routed, so a connection to it never completes
# (or fails at once where there is no route at all).
UNREACHABLE = "http://192.0.2.1:8643"
WAIT_S = 60  # a bound for a hung service, not a figure
CMD = {"env": {"PATH": "/bin"}}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cluster:
    nodes: dict[str, Service]
    ports: dict[str, int]
    workdirs: dict[str, Path]
    config: dict[str, str]

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    def start(self, node: str) -> Service:
        proc, log = start_service(self.workdirs[node], self.config[node], "--port",
                                  str(self.ports[node]))
        url = wait_ready(proc, log)
        svc = Service(url, proc, log, self.workdirs[node] / "state", "")
        self.nodes[node] = svc
        return svc

    def stop(self, node: str) -> None:
        stop_service(self.nodes.pop(node), self.workdirs[node])


@pytest.fixture(scope="module")
def cluster(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    names = ("n1", "n2", "n3")
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    peers = ", ".join([f'{n} = "http://127.0.0.1:{p}"' for n, p in ports.items()]
                      + [f'n4 = "{UNREACHABLE}"'])
    config = {n: f"""
[server]
shutdown_deadline_s = 5

[cluster]
node = "{n}"
peers = {{ {peers} }}
connect_timeout_s = 1

[registries."{registry.host}"]

[pools]
min_idle = 0
{two_tenants(registry.host)}
""" for n in names}
    c = Cluster({}, ports, {n: tmp_path_factory.mktemp(n) for n in names}, config)
    try:
        for n in ("n1", "n2"):
            c.start(n)
        yield c
    finally:
        for n in list(c.nodes):
            c.stop(n)


def _go(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


async def _json(r: aiohttp.ClientResponse) -> Any:
    return orjson.loads(await r.read())


async def _create(s: aiohttp.ClientSession, url: str, image: str,
                  headers: dict[str, str] = A) -> str:
    async with s.post(url + "/v1/containers", json={"image": image}, headers=headers) as r:
        assert r.status == 201, await r.text()
        return str((await _json(r))["id"])


async def _exec(s: aiohttp.ClientSession, url: str, sid: str, script: str,
                headers: dict[str, str] = A) -> tuple[int, Any, str | None]:
    async with s.post(f"{url}/v1/containers/{sid}/exec", headers=headers,
                      json={"cmd": ["sh", "-c", script], **CMD}) as r:
        return r.status, await _json(r), r.headers.get(NODE)


def test_a_session_is_served_by_its_node_through_another(cluster: Cluster, images: Any
                                                          ) -> None:
    n1, n2 = cluster.url("n1"), cluster.url("n2")

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            sid = await _create(s, n1, images.oci)
            assert sid.startswith("n1.")
            async with s.get(f"{n2}/v1/containers/{sid}", headers=A) as r:
                assert r.status == 200 and r.headers[NODE] == "n1"
                assert (await _json(r))["id"] == sid
            # Each node lists its own sessions only.
            async with s.get(f"{n2}/v1/containers", headers=A) as r:
                assert r.headers[NODE] == "n2"
                assert sid not in [c["id"] for c in (await _json(r))["containers"]]

            # A file in through n2, read by a run through n2, out through n2.
            async with s.put(f"{n2}/v1/containers/{sid}/files", headers=A, data=b"\0data",
                             params={"path": "/tmp/in.bin", "mode": "0600"}) as r:
                assert r.status == 204, await r.text()
            status, out, node = await _exec(s, n2, sid, "stat -c %a /tmp/in.bin; "
                                            "echo kept > /tmp/kept")
            assert (status, out["stdout"], node) == (200, "600\n", "n1"), out
            async with s.get(f"{n2}/v1/containers/{sid}/files", headers=A,
                             params={"path": "/tmp/in.bin"}) as r:
                assert r.status == 200 and await r.read() == b"\0data"
            # Megabytes both ways, their length kept.
            big = os.urandom(4 << 20)
            async with s.put(f"{n2}/v1/containers/{sid}/files", headers=A, data=big,
                             params={"path": "/tmp/big"}) as r:
                assert r.status == 204, await r.text()
            async with s.get(f"{n2}/v1/containers/{sid}/files", headers=A,
                             params={"path": "/tmp/big"}) as r:
                assert r.content_length == len(big) and await r.read() == big
            # A streamed answer arrives as events, through the forward as from the owner.
            async with s.post(f"{n2}/v1/containers/{sid}/exec",
                              headers={**A, "Accept": "application/x-ndjson"},
                              json={"cmd": ["cat", "/tmp/kept"]}) as r:
                lines = [orjson.loads(line) for line in (await r.read()).splitlines()]
            assert lines[0] == {"event": "stdout", "data": "kept\n"}
            assert lines[-1]["event"] == "exit" and lines[-1]["status"] == "ok"

            # The exec WebSocket: stdin in, output out, the owner's close passed on.
            async with s.ws_connect(f"{n2}/v1/containers/{sid}/exec/ws", headers=A) as ws:
                await ws.send_json({"cmd": ["sh", "-c", "read l; echo got $l"], **CMD})
                await ws.send_json({"type": "stdin", "data": "one\n"})
                events = []
                async for msg in ws:
                    events.append(orjson.loads(msg.data))
            assert {"event": "stdout", "data": "got one\n"} in events
            assert events[-1]["event"] == "exit" and events[-1]["status"] == "ok"

            async with s.delete(f"{n2}/v1/containers/{sid}", headers=A) as r:
                assert r.status == 204
            async with s.get(f"{n1}/v1/containers/{sid}", headers=A) as r:
                assert r.status == 404
    _go(go())


def test_tenancy_holds_through_the_forward(cluster: Cluster, images: Any) -> None:
    """Tenant b, through n2, finds a's session on n1 exactly as a session that does not
    exist: the owner checks b's own token."""
    n1, n2 = cluster.url("n1"), cluster.url("n2")

    async def answers(s: aiohttp.ClientSession, sid: str) -> list[tuple[int, Any]]:
        got = []
        for method, path, kw in (
                ("GET", "", {}), ("POST", "/exec", {"json": {"cmd": ["true"]}}),
                ("PUT", "/files", {"params": {"path": "/tmp/x"}, "data": b"x"}),
                ("GET", "/files", {"params": {"path": "/etc/hostname"}}),
                ("POST", "/commit", {"json": {"reference": "stolen:1"}}),
                ("DELETE", "", {})):
            async with s.request(method, f"{n2}/v1/containers/{sid}{path}", headers=B,
                                 **kw) as r:
                body = await _json(r)
                # The message names the id asked for: compare the rest.
                got.append((r.status, body["error"]["code"]))
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"{n2}/v1/containers/{sid}/exec/ws", headers=B)
        got.append((refused.value.status, None))
        return got

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            sid = await _create(s, n1, images.oci)
            try:
                theirs = await answers(s, sid)
                missing = await answers(s, "n1.00000000deadbeef")
                assert theirs == missing
                assert {status for status, _ in theirs} == {404}
                status, out, _ = await _exec(s, n2, sid, "echo still mine")
                assert (status, out["stdout"]) == (200, "still mine\n")
            finally:
                async with s.delete(f"{n1}/v1/containers/{sid}", headers=A):
                    pass
    _go(go())


def test_a_job_is_served_by_its_node_through_another(cluster: Cluster, images: Any) -> None:
    n1, n2 = cluster.url("n1"), cluster.url("n2")

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{n2}/v1/jobs", headers=A, json={"run": {
                    "image": images.oci, "cmd": ["echo", "from a job"]}}) as r:
                assert r.status == 202, await r.text()
                job_id = (await _json(r))["id"]
            assert job_id.startswith("n2.job_")
            # Its events through n1, to its end: SSE relayed as the owner sends it.
            async with s.get(f"{n1}/v1/jobs/{job_id}/events", headers=A) as r:
                assert r.status == 200 and r.headers[NODE] == "n2"
                text = (await r.read()).decode()
            assert "from a job" in text and '"status":"done"' in text
            async with s.get(f"{n1}/v1/jobs/{job_id}", headers=A) as r:
                job = await _json(r)
            assert job["status"] == "done" and job["result"]["stdout"] == "from a job\n"
            async with s.get(f"{n1}/v1/jobs/{job_id}", headers=B) as r:
                assert r.status == 404  # another tenant's
            async with s.delete(f"{n1}/v1/jobs/{job_id}", headers=A) as r:
                assert r.status == 204
            async with s.get(f"{n2}/v1/jobs/{job_id}", headers=A) as r:
                assert r.status == 404
    _go(go())


def test_one_request_id_follows_a_forwarded_request(cluster: Cluster, images: Any) -> None:
    """The client's X-Request-Id, or the one the first node made, is the owner's too."""
    n1, n2 = cluster.url("n1"), cluster.url("n2")

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            sid = await _create(s, n1, images.oci)
            try:
                for sent in ({"X-Request-Id": "client-chosen.1"}, {}):
                    async with s.post(f"{n2}/v1/containers/{sid}/exec", headers={**A, **sent},
                                      json={"cmd": ["true"], **CMD}) as r:
                        result, header = await _json(r), r.headers["X-Request-Id"]
                    assert r.headers[NODE] == "n1"
                    assert result["request_id"] == header == sent.get("X-Request-Id", header)
            finally:
                async with s.delete(f"{n1}/v1/containers/{sid}", headers=A) as r:
                    assert r.status == 204
    _go(go())


def test_an_id_of_no_node_of_the_cluster_is_unknown(cluster: Cluster) -> None:
    n1 = cluster.url("n1")

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            for path in ("/v1/containers/zz.00000000deadbeef",
                         "/v1/jobs/zz.job_" + "0" * 32,
                         "/v1/containers/n1.00000000deadbeef"):
                async with s.get(n1 + path, headers=A) as r:
                    assert r.status == 404, path
                    assert (await _json(r))["error"]["code"] == "not_found"
            # A request a peer forwarded is served where it arrives, never sent on.
            async with s.get(f"{n1}/v1/containers/n2.00000000deadbeef",
                             headers={**A, "Sandboxd-Forwarded-By": "n2"}) as r:
                assert r.status == 404 and r.headers[NODE] == "n1"
    _go(go())


def test_a_lost_node_is_gone_not_a_hang(cluster: Cluster, images: Any) -> None:
    """n3 SIGKILLed while n1 relays two of its runs (NDJSON and WebSocket): each ends with a
    node_gone error event; its session and job are then 410 node_gone through n1, and so
    is an id of n4, a peer whose address never answers (the connect timeout ends the wait).
    n3 started again on its state directory: its session ended with it (404), its job is
    back."""
    n1, n3 = cluster.url("n1"), cluster.url("n3")
    old = cluster.start("n3")

    async def lose() -> tuple[str, str]:
        async with aiohttp.ClientSession() as s:
            sid = await _create(s, n3, images.oci)
            async with s.post(f"{n3}/v1/jobs", headers=A, json={"run": {
                    "image": images.oci, "cmd": ["true"]}}) as r:
                assert r.status == 202, await r.text()
                job_id = (await _json(r))["id"]
            script = {"cmd": ["sh", "-c", "echo up; sleep 60"], **CMD}
            stream = await s.post(f"{n1}/v1/containers/{sid}/exec", json=script,
                                  headers={**A, "Accept": "application/x-ndjson"})
            assert orjson.loads(await stream.content.readline())["data"] == "up\n"
            ws = await s.ws_connect(f"{n1}/v1/containers/{sid}/exec/ws", headers=A)
            await ws.send_json(script)
            assert (await ws.receive_json())["data"] == "up\n"
            old.proc.kill()
            lines = [orjson.loads(line) for line in (await stream.read()).splitlines()]
            assert [line["event"] for line in lines] == ["error"], lines
            assert lines[0]["error"]["code"] == "node_gone"
            events = [orjson.loads(msg.data) async for msg in ws]
            assert [e["error"]["code"] for e in events] == ["node_gone"], events
            assert ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR
            stream.close()
            return sid, job_id

    sid, job_id = _go(lose())
    old.proc.wait(WAIT_S)
    del cluster.nodes["n3"]

    async def gone() -> None:
        async with aiohttp.ClientSession() as s:
            for method, path in (("GET", f"/v1/containers/{sid}"),
                                 ("POST", f"/v1/containers/{sid}/exec"),
                                 ("GET", f"/v1/jobs/{job_id}"),
                                 ("GET", f"/v1/jobs/{job_id}/events"),
                                 ("GET", "/v1/containers/n4.00000000deadbeef")):
                async with s.request(method, n1 + path, headers=A,
                                     json={"cmd": ["true"]}) as r:
                    body = await _json(r)
                    assert (r.status, body["error"]["code"]) == (410, "node_gone"), body
                    assert r.headers[NODE] == "n1"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await s.ws_connect(f"{n1}/v1/containers/{sid}/exec/ws", headers=A)
            assert refused.value.status == 410
            async with s.get(f"{n1}/metrics", headers=A) as r:
                text = await r.text()
            counts = dict(re.findall(r'^sandboxd_forwarded_requests_total\{outcome="(\w+)"\} '
                                     r"([\d.]+)$", text, re.M))
            assert float(counts["node_gone"]) >= 6 and float(counts["forwarded"]) >= 2, counts
    _go(gone())

    # Back on the same state directory (which removes what the killed one left).
    cluster.start("n3")

    async def back() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{n1}/v1/containers/{sid}", headers=A) as r:
                assert (r.status, r.headers[NODE]) == (404, "n3")
            async with s.get(f"{n1}/v1/jobs/{job_id}", headers=A) as r:
                assert r.status == 200 and r.headers[NODE] == "n3"
                assert (await _json(r))["status"] in ("done", "interrupted")
    _go(back())
    cluster.stop("n3")


def test_a_peer_names_this_node_by_its_own_host_only(tmp_path: Path) -> None:
    """Peers forward under the host name they reach a node by: that name of its own is a
    Host this node answers to, another node's is not (the Host check against DNS
    rebinding stays). An owner whose name does not resolve (a pod gone) is 410 too."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cluster]\nnode = "n1"\nconnect_timeout_s = 1\npeers = { '
                   'n1 = "http://sbx-1.invalid:8643", n2 = "http://sbx-2.invalid:8643" }\n')
    config = load(cfg, env={"SANDBOXD_STATE_DIR": str(tmp_path)})

    async def go() -> list[tuple[int, str | None]]:
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        app = create_app(lambda: never, config)
        async with TestClient(TestServer(app)) as client:
            out = []
            for host in ("sbx-1.invalid:8643", "sbx-2.invalid:8643"):
                async with client.get("/healthz", headers={"Host": host}) as r:
                    out.append((r.status, r.headers.get(NODE)))
            async with client.get("/v1/containers/n2.00000000deadbeef") as r:
                out.append((r.status, (await _json(r))["error"]["code"]))
            return out
    assert asyncio.run(go()) == [(200, "n1"), (403, "n1"), (410, "node_gone")]
