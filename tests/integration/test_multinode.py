"""Three `sandboxd serve` nodes on three "hosts", HAProxy in front with health checks on
/readyz, and one `docker-registry` as the pull-through cache of the upstream registry
(issue #14 point 4): blobs cross from the upstream for one node only, runs spread over the
nodes, a node SIGKILLed under load costs only its runs in flight, and a session is served
by its owner (`[cluster]` peers) whichever node the balancer picks.

As root the hosts are network namespaces on a bridge joined by veth pairs
(tests/support/netns.py); as an ordinary user, processes on loopback (a network namespace
cannot be joined without a user namespace of its own, where sandboxd would take root's
cgroup path and fail). The nodes reach the upstream registry only through the cache: as
root the upstream's 127.0.0.1 is not even reachable from their namespaces.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import psutil
import pytest

from testbed.haproxy import SERVED_BY, Backend, HAProxy, HealthCheck, start_haproxy
from testbed.nodes import Node
from testbed.registry import LocalRegistry
from tests.support.images import PushedImages
from tests.support.netns import Lab, loopback_lab, netns_lab
from tests.support.pullcache import PullCache, pull_cache

TOKEN = "multinode-token-0123456789abcdef"
NODES = 3
CHECK = HealthCheck(interval_ms=200, fall=2, rise=2)
CLIENTS = 6
REQUEST_TIMEOUT_S = 120
OWNER = "Sandboxd-Node"  # the node that served a request (the owner, through a forward)


def node_config(node: str, lab: Lab, registry: LocalRegistry, cache: PullCache) -> str:
    peers = ", ".join(f'{h.name} = "http://{h.address}:{h.port}"' for h in lab.nodes)
    return f"""
[cluster]
node = "{node}"
peers = {{ {peers} }}

[server]
shutdown_deadline_s = 5

[[tokens]]
token = "{TOKEN}"
name = "a"
registries = ["{registry.host}"]

# The upstream is pulled from through the cache only.
[registries."{registry.host}"]
mirrors = ["{cache.url}"]

[registries."{cache.host}"]
insecure = true

[pools]
min_idle = 1
max_idle = 3
"""


@dataclass
class Cluster:
    nodes: list[Node]
    haproxy: HAProxy
    image: str
    blobs: tuple[str, ...]
    # blob digest -> GETs the upstream served while the first node pulled, and then while
    # the two others pulled at once
    first: dict[str, int]
    others: dict[str, int]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def pull(url: str, image: str) -> str:
    async with aiohttp.ClientSession(url, headers=headers()) as s, \
            s.post("/v1/images/pull", json={"reference": image}) as r:
        body = await r.json()
        assert r.status == 200, body
        return str(body["digest"])


@pytest.fixture(scope="module")
def cluster(registry: LocalRegistry, images: PushedImages,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("multinode")
    lab_of = netns_lab if os.geteuid() == 0 else loopback_lab
    with ExitStack() as stack:
        lab = stack.enter_context(lab_of(NODES))
        cache = stack.enter_context(pull_cache(work / "cache", registry, lab.front.address))
        nodes = [Node(host.name, host.address, host.port, work / host.name,
                      node_config(host.name, lab, registry, cache), host.launcher)
                 for host in lab.nodes]
        for node in nodes:
            stack.callback(node.stop)
            node.start()
        haproxy = stack.enter_context(start_haproxy(
            work / "haproxy", [Backend(n.name, n.address, n.port) for n in nodes], CHECK))
        haproxy.wait_for({n.name: "UP" for n in nodes})
        image = images.shared_a
        blobs = images.layers["shared_a"]
        before = {b: registry.blob_gets(b) for b in blobs}
        assert asyncio.run(pull(nodes[0].url, image)) == images.digests["shared_a"]
        cache.wait_stored(blobs)
        first = {b: registry.blob_gets(b) - before[b] for b in blobs}

        async def pull_on_the_others() -> set[str]:
            return set(await asyncio.gather(*(pull(n.url, image) for n in nodes[1:])))
        assert asyncio.run(pull_on_the_others()) == {images.digests["shared_a"]}
        others = {b: registry.blob_gets(b) - before[b] - first[b] for b in blobs}
        yield Cluster(nodes, haproxy, image, blobs, first, others)


def test_each_blob_crosses_from_the_upstream_for_one_node_only(cluster: Cluster) -> None:
    # Debian's distribution (2.8) fetches a blob it misses twice: once streamed to the
    # puller, once stored; a newer one shares the fetch. Either way the other nodes cost
    # the upstream nothing.
    assert all(1 <= n <= 2 for n in cluster.first.values()), cluster.first
    assert cluster.others == {b: 0 for b in cluster.blobs}


@dataclass
class Outcome:
    """One request as its client saw it."""

    key: str
    started: float
    ended: float
    status: int | None  # None: the connection failed
    served_by: str | None
    body: Any


async def one_run(s: aiohttp.ClientSession, image: str, key: str, script: str) -> Outcome:
    started = time.monotonic()
    try:
        async with s.post("/v1/runs", json={
                "image": image, "cmd": ["sh", "-c", f"echo {key}; {script}"],
                "env": {"PATH": "/bin"}}) as r:
            body = await r.json(content_type=None) if r.status == 200 else await r.text()
            return Outcome(key, started, time.monotonic(), r.status,
                           r.headers.get(SERVED_BY), body)
    except aiohttp.ClientError as e:
        return Outcome(key, started, time.monotonic(), None, None, repr(e))


def well_formed(o: Outcome) -> bool:
    return (o.status == 200 and isinstance(o.body, dict) and o.body.get("status") == "ok"
            and o.body.get("exit_code") == 0 and o.body.get("stdout") == f"{o.key}\n")


def test_runs_spread_over_the_nodes(cluster: Cluster) -> None:
    async def go() -> list[Outcome]:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(cluster.haproxy.url, headers=headers(),
                                         timeout=timeout) as s:
            return list(await asyncio.gather(*(one_run(s, cluster.image, f"spread{i}",
                                                       "sleep 0.2") for i in range(24))))
    outcomes = asyncio.run(go())
    assert all(well_formed(o) for o in outcomes), [o for o in outcomes if not well_formed(o)]
    served = Counter(o.served_by for o in outcomes)
    assert set(served) == {n.name for n in cluster.nodes}, served


async def runs_finished(url: str) -> float:
    """The node's sandboxd_runs_total, all statuses."""
    async with aiohttp.ClientSession(url, headers=headers()) as s, s.get("/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sandboxd_runs_total"))


async def create_session(url: str, image: str) -> str:
    async with aiohttp.ClientSession(url, headers=headers()) as s, \
            s.post("/v1/containers", json={"image": image}) as r:
        body = await r.json()
        assert r.status == 201, body
        return str(body["id"])


async def session_exec(s: aiohttp.ClientSession, sid: str, script: str
                       ) -> tuple[int, Any, str | None, str | None]:
    """(status, body, the node HAProxy sent it to, the node that ran it)."""
    async with s.post(f"/v1/containers/{sid}/exec", json={
            "cmd": ["sh", "-c", script], "env": {"PATH": "/bin"}}) as r:
        return (r.status, await r.json(content_type=None), r.headers.get(SERVED_BY),
                r.headers.get(OWNER))


def test_a_killed_node_costs_only_its_runs_in_flight(cluster: Cluster) -> None:
    victim = cluster.node("n3")
    marks: dict[str, float] = {}
    orphans: list[psutil.Process] = []
    lost_session = asyncio.run(create_session(victim.url, cluster.image))
    survivors = [n for n in cluster.nodes if n is not victim]

    async def finished_on_survivors() -> list[float]:
        return list(await asyncio.gather(*(runs_finished(n.url) for n in survivors)))
    finished_before = asyncio.run(finished_on_survivors())

    async def client(s: aiohttp.ClientSession, c: int, out: list[Outcome],
                     stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            out.append(await one_run(s, cluster.image, f"c{c}r{i}", "sleep 0.3"))
            i += 1

    async def go() -> list[Outcome]:
        out: list[Outcome] = []
        stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(cluster.haproxy.url, headers=headers(),
                                         timeout=timeout) as s:
            tasks = [asyncio.create_task(client(s, c, out, stop)) for c in range(CLIENTS)]
            while sum(o.served_by == victim.name for o in out) < 3:
                await asyncio.sleep(0.01)
            marks["kill"] = time.monotonic()
            orphans.extend(victim.kill())
            marks["down"] = await asyncio.to_thread(cluster.haproxy.wait_for,
                                                    {victim.name: "DOWN"})
            # Enough runs after the balancer took the node out to see where they went.
            while sum(o.started > marks["down"] for o in out) < 2 * CLIENTS:
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*tasks)
        return out

    try:
        outcomes = asyncio.run(go())
        failed = [o for o in outcomes if not well_formed(o)]
        # Each failure is a run that was on its way when the node died, reported to its
        # client as an error (HAProxy's 502 or a cut connection), never as a result.
        assert all(o.started < marks["kill"] < o.ended for o in failed), failed
        assert all(o.status != 200 for o in failed), failed
        assert len(failed) <= CLIENTS, failed
        after = [o for o in outcomes if o.started > marks["down"]]
        assert after and all(well_formed(o) and o.served_by != victim.name
                             for o in after), after
        # And the others ran each run once, every one of them answered to its client.
        ran = [a - b for a, b in zip(asyncio.run(finished_on_survivors()), finished_before,
                                     strict=True)]
        assert ran == [sum(o.served_by == n.name and well_formed(o) for o in outcomes)
                       for n in survivors]

        # Its sessions are gone, and say so at once through any other node.
        async def use_lost_session() -> tuple[int, Any, str | None, str | None]:
            async with aiohttp.ClientSession(cluster.haproxy.url, headers=headers()) as s:
                return await session_exec(s, lost_session, "true")
        status, body, entry, _ = asyncio.run(use_lost_session())
        assert (status, body["error"]["code"]) == (410, "node_gone"), body
        assert entry != victim.name
        print(f"kill -> DOWN {1000 * (marks['down'] - marks['kill']):.0f} ms, "
              f"{len(failed)} of {len(outcomes)} runs failed")
    finally:
        # Back on its own state: it serves again and is taken back into the rotation.
        victim.start()
    cluster.haproxy.wait_for({victim.name: "UP"})
    assert asyncio.run(pull(victim.url, cluster.image))
    # What the killed process had started is gone, by the kernel or by its successor.
    _, alive = psutil.wait_procs(orphans, timeout=10)
    assert not alive, f"processes of the killed node left: {alive}"


def test_a_session_is_served_by_its_owner_whichever_node_the_balancer_picks(
        cluster: Cluster) -> None:
    sid = asyncio.run(create_session(cluster.haproxy.url, cluster.image))
    owner = sid.split(".", 1)[0]

    async def go() -> list[tuple[int, Any, str | None, str | None]]:
        # A connection per exec, as independent clients: the balancer spreads them.
        out = []
        for i in range(2 * NODES):
            async with aiohttp.ClientSession(cluster.haproxy.url, headers=headers()) as s:
                out.append(await session_exec(s, sid, f"echo {i} >> /tmp/log; cat /tmp/log"))
        async with aiohttp.ClientSession(cluster.haproxy.url, headers=headers()) as s:
            # The interactive exec too: a WebSocket through the balancer and the forward.
            async with s.ws_connect(f"/v1/containers/{sid}/exec/ws") as ws:
                await ws.send_json({"cmd": ["sh", "-c", "read l; echo $l; cat /tmp/log"],
                                    "env": {"PATH": "/bin"}})
                await ws.send_json({"type": "stdin", "data": "typed\n"})
                events = [orjson.loads(msg.data) async for msg in ws]
            stdout = "".join(e["data"] for e in events if e["event"] == "stdout")
            assert stdout == "typed\n" + "".join(f"{j}\n" for j in range(2 * NODES)), events
            assert events[-1]["event"] == "exit" and events[-1]["status"] == "ok", events
            async with s.delete(f"/v1/containers/{sid}") as r:
                assert r.status in (200, 204), await r.text()
        return out
    execs = asyncio.run(go())
    # Every exec ran in the one container, in order, on its owner.
    for i, (status, body, _, ran_on) in enumerate(execs):
        assert status == 200, body
        assert body["stdout"] == "".join(f"{j}\n" for j in range(i + 1)), body
        assert ran_on == owner
    assert {entry for _, _, entry, _ in execs} - {owner}, "no exec came in through another node"
