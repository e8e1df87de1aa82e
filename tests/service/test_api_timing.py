"""Trusted timing over the API: [timing] cpus reserves CPUs for judge runs; a result says
which CPU it ran on, whether it was its own, and whether its time lies near its limit;
`repeat` and `rerun_near_limit`; GET /v1/info shows a tenant its own slot use only.
Statuses and shapes only, no timing thresholds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from sandbox.runtime.profiles import format_cpuset, host_cpus
from service.config import ConfigError, from_dict
from tests.service.conftest import LIMITED_TOKEN, MAIN_TOKEN
from tests.service.own_service import OwnService, own_service, two_tenants

ALL = format_cpuset(host_cpus())
MAX_REPEAT = 5
BUSY = "while :; do :; done"


@pytest.fixture(scope="module")
def slots(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[OwnService]:
    config = two_tenants(registry.host) + f"""
[timing]
cpus = "{ALL}"
max_repeat = {MAX_REPEAT}
"""
    with own_service(tmp_path_factory.mktemp("sandboxd-timing"), config) as svc:
        yield svc


def call(svc: OwnService, method: str, path: str, token: str = MAIN_TOKEN,
         body: dict[str, Any] | None = None, **headers: str) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        auth = {"Authorization": f"Bearer {token}", **headers}
        async with aiohttp.ClientSession(svc.url, headers=auth) as s, \
                s.request(method, path, json=body) as r:
            return r.status, await r.json(content_type=None)
    return asyncio.run(go())


def judge(images: Any, script: str, **extra: Any) -> dict[str, Any]:
    return {"image": images.oci, "cmd": ["sh", "-c", script], "env": {"PATH": "/bin"},
            "policy": "judge", **extra}


def test_a_result_says_where_it_ran_and_how_far_to_trust_it(slots: OwnService,
                                                            images: Any) -> None:
    status, r = call(slots, "POST", "/v1/runs", body=judge(
        images, "grep Cpus_allowed_list /proc/self/status | cut -f2"))
    assert status == 200 and r["status"] == "ok", r
    assert r["stdout"].strip() == r["cpus"] and r["cpus"] in {str(c) for c in host_cpus()}
    assert r["dedicated_cpu"] is True and r["near_limit"] is False
    assert r["host_load"] is None or 0 <= r["host_load"] <= 1
    assert "repeats" not in r and "rerun" not in r
    status, r = call(slots, "POST", "/v1/runs", body={**judge(images, "true"),
                                                      "policy": "default"})
    assert status == 200 and r["cpus"] == ALL and r["dedicated_cpu"] is False, r


def test_repeat_gives_the_median_run_and_the_spread(slots: OwnService, images: Any) -> None:
    status, r = call(slots, "POST", "/v1/runs", body=judge(images, "echo hi", repeat=3))
    assert status == 200 and r["status"] == "ok" and r["stdout"] == "hi\n", r
    rep = r["repeats"]
    assert rep["n"] == 3 and rep["statuses"] == {"ok": 3} and 0 <= rep["main"] < 3
    for figure in ("cpu_ms", "wall_ms"):
        s = rep[figure]
        assert s["min"] <= s["median"] <= s["max"] and s["spread"] >= 0, rep


@pytest.mark.parametrize(("extra", "field"), [
    ({"repeat": MAX_REPEAT + 1}, "repeat"),
    ({"repeat": 0}, "repeat"),
    ({"repeat": 2, "rerun_near_limit": True}, "rerun_near_limit"),
])
def test_a_repeat_no_run_can_honour_is_refused(slots: OwnService, images: Any,
                                               extra: dict[str, Any], field: str) -> None:
    status, r = call(slots, "POST", "/v1/runs", body=judge(images, "true", **extra))
    assert status == 400 and r["error"]["field"] == field, r


def test_a_repeated_run_is_not_streamed(slots: OwnService, images: Any) -> None:
    status, r = call(slots, "POST", "/v1/runs", body=judge(images, "true", repeat=2),
                     Accept="application/x-ndjson")
    assert status == 400 and r["error"]["field"] == "repeat", r


def test_a_time_limit_near_its_limit_is_rerun(slots: OwnService, images: Any) -> None:
    status, r = call(slots, "POST", "/v1/runs", body=judge(
        images, BUSY, limits={"cpu_ms": 100}, rerun_near_limit=True))
    assert status == 200 and r["status"] == "time_limit" and r["near_limit"], r
    first = r["rerun"]["first"]
    assert first["status"] == "time_limit" and first["dedicated_cpu"] is True


def test_a_tenant_sees_its_own_slot_use_only(slots: OwnService, images: Any) -> None:
    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        a = {"Authorization": f"Bearer {MAIN_TOKEN}"}
        b = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
        async with aiohttp.ClientSession(slots.url, headers=a) as sa, \
                aiohttp.ClientSession(slots.url, headers=b) as sb:
            run = asyncio.ensure_future(sa.post("/v1/runs", json=judge(images, "sleep 1")))
            while True:
                async with sa.get("/v1/info") as r:
                    mine = (await r.json())["timing"]
                if mine["yours"]["running"]:
                    break
                await asyncio.sleep(0.02)
            async with sb.get("/v1/info") as r:
                theirs = (await r.json())["timing"]
            async with await run as r:
                assert (await r.json())["status"] == "ok"
            return mine, theirs

    mine, theirs = asyncio.run(go())
    assert mine["yours"] == {"running": 1, "waiting": 0}
    assert theirs["yours"] == {"running": 0, "waiting": 0}
    assert theirs["cpus"] == ALL and theirs["enforced_by"] == "cpuset"


@pytest.mark.parametrize(("timing", "words"), [
    ({"cpus": "4096"}, "timing.cpus"),
    ({"cpus": "zero"}, "timing.cpus"),
    ({"cpus": "0", "policies": ["nonesuch"]}, "timing.policies"),
    ({"cpus": "0", "max_repeat": 0}, "timing.max_repeat"),
    ({"cpu": "0"}, "timing.cpu"),
])
def test_a_bad_timing_config_is_refused_at_start(timing: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        from_dict({"timing": timing}, {"SANDBOXD_STATE_DIR": "/nonexistent"})
