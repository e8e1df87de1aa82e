"""A run's `network` through the API (issue #15 pt2): 403 `network_disabled` where the
operator allows nothing, a proxy run reaching its tenant's hosts only, its figures in the
result and the metrics. The "outside" server is on 127.7.0.1, with 127.0.0.0/16 blocked in
place of 127.0.0.0/8 (see tests/integration/test_network.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.integration.test_network import FULL_PROBLEM, OUTSIDE, TEST_BLOCKED, http_server
from tests.service.own_service import OwnService, own_service

TOKEN_A = "network-tenant-a-0123456789"
TOKEN_B = "network-tenant-b-0123456789"


@pytest.fixture(scope="module")
def outside() -> Iterator[int]:
    with http_server(OUTSIDE) as port:
        yield port


@pytest.fixture(scope="module")
def svc(registry: Any, images: Any, outside: int,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnService]:
    blocked = ", ".join(f'"{n}"' for n in TEST_BLOCKED)
    config = f"""
[[tokens]]
token = "{TOKEN_A}"
name = "a"
proxy_hosts = ["{OUTSIDE}:{outside}"]

[[tokens]]
token = "{TOKEN_B}"
name = "b"

[registries."{registry.host}"]

[network]
blocked = [{blocked}]
"""
    with own_service(tmp_path_factory.mktemp("sandboxd-network"), config) as s:
        yield s


async def _run(svc: OwnService, token: str, image: str, script: str,
               **body: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(svc.url, headers=headers) as s, s.post("/v1/runs", json={
                "image": image, "cmd": ["/bin/busybox", "sh", "-c", script],
                "env": {"PATH": "/bin"}, **body}) as r:
        return r.status, await r.json()


def test_network_modes_the_operator_did_not_allow_are_403(svc: OwnService,
                                                          images: Any) -> None:
    status, full = asyncio.run(_run(svc, TOKEN_A, images.oci, "true", network="full"))
    assert status == 403 and full["error"]["code"] == "network_disabled", full
    assert "[network] full = true" in full["error"]["message"], full
    # B has no host to reach: no proxy for it.
    status, proxy = asyncio.run(_run(svc, TOKEN_B, images.oci, "true", network="proxy"))
    assert status == 403 and proxy["error"]["code"] == "network_disabled", proxy
    assert "proxy_hosts" in proxy["error"]["message"], proxy


def test_a_proxy_run_reaches_its_tenants_hosts_with_figures(svc: OwnService, images: Any,
                                                           outside: int) -> None:
    script = (f"wget -q -O- http://{OUTSIDE}:{outside}/ 2>&1; "
              f"wget -q -O- http://{OUTSIDE}:1/ 2>&1; echo $HTTP_PROXY")
    before = svc.metric("sandboxd_network_bytes_total", TOKEN_A)
    status, res = asyncio.run(_run(svc, TOKEN_A, images.oci, script, network="proxy"))
    assert status == 200, res
    assert f"hello {OUTSIDE}" in res["stdout"] and "403 Forbidden" in res["stdout"], res
    assert "http://127.0.0.1:3128" in res["stdout"], res
    net = res["network"]
    assert (net["mode"], net["connections"], net["denied"]) == ("proxy", 1, 1), net
    assert net["bytes_sent"] > 0 and net["bytes_received"] > 0, net
    assert svc.metric("sandboxd_network_bytes_total", TOKEN_A) == \
        before + net["bytes_sent"] + net["bytes_received"]
    assert svc.metric("sandboxd_proxy_denied_total", TOKEN_A) >= 1
    # A run without a network has no figures, and reaches nothing.
    status, res = asyncio.run(_run(svc, TOKEN_A, images.oci,
                                   f"wget -q -O- http://{OUTSIDE}:{outside}/ 2>&1; echo $?"))
    assert status == 200 and "network" not in res and "hello" not in res["stdout"], res


def test_a_proxy_session_keeps_its_network_and_each_exec_has_its_figures(
        svc: OwnService, images: Any, outside: int) -> None:
    async def main() -> tuple[list[dict[str, Any]], int]:
        async with aiohttp.ClientSession(svc.url, headers={
                "Authorization": f"Bearer {TOKEN_A}"}) as s:
            async with s.post("/v1/containers", json={"image": images.oci,
                                                       "network": "proxy"}) as r:
                assert r.status == 201, await r.text()
                sid = (await r.json())["id"]
            results = []
            for script in (f"wget -q -O- http://{OUTSIDE}:{outside}/", "true"):
                async with s.post(f"/v1/containers/{sid}/exec", json={
                        "cmd": ["/bin/busybox", "sh", "-c", script]}) as r:
                    results.append(await r.json())
            async with s.delete(f"/v1/containers/{sid}") as r:
                return results, r.status

    (fetched, idle), deleted = asyncio.run(main())
    assert f"hello {OUTSIDE}" in fetched["stdout"], fetched
    assert fetched["network"]["connections"] == 1, fetched
    assert idle["network"] == {"mode": "proxy", "bytes_sent": 0, "bytes_received": 0,
                               "connections": 0, "denied": 0}, idle
    assert deleted == 204


def test_a_proxy_pipeline_gives_each_container_its_figures(svc: OwnService, images: Any,
                                                           outside: int) -> None:
    fetch = ["/bin/busybox", "sh", "-c", f"wget -q -O- http://{OUTSIDE}:{outside}/"]
    body = {"image": images.oci, "network": "proxy", "container": "own",
            "processes": [{"cmd": fetch}, {"cmd": ["/bin/busybox", "cat"]}],
            "pipes": [{"from": [0, 1], "to": [1, 0]}]}

    async def main() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession(svc.url, headers={
                "Authorization": f"Bearer {TOKEN_A}"}) as s, \
                s.post("/v1/runs", json=body) as r:
            return r.status, await r.json()

    status, out = asyncio.run(main())
    assert status == 200, out
    fetcher, reader = out["processes"]
    assert reader["stdout"] == f"hello {OUTSIDE}\n", out
    assert fetcher["network"]["connections"] == 1 and reader["network"]["connections"] == 0


def test_full_through_the_api_when_the_operator_enables_it(
        registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where `full` can work (root here), a full run has its figures; where it cannot (an
    ordinary user without /dev/net/tun), the operator is told at start and the run's error
    says what to do."""
    config = f"""
[registries."{registry.host}"]

[network]
full = true
"""
    with own_service(tmp_path_factory.mktemp("sandboxd-full"), config) as svc:
        status, res = asyncio.run(_run(svc, "", images.oci, "ip -o link | wc -l",
                                       network="full"))
        log = svc.log.read_text()
    if FULL_PROBLEM is None:
        assert status == 200 and res["stdout"] == "2\n", res  # lo and tap0
        assert res["network"]["mode"] == "full", res
        assert "[network] full is on" not in log
    else:
        assert status == 500 and "chmod 0666 /dev/net/tun" in res["error"]["message"], res
        assert f"[network] full is on, but its runs will fail: {FULL_PROBLEM}" in log
