"""Pipelines through POST /v1/runs: `processes` and `pipes` in place of `cmd`, an interactor
and a solution in busybox sh, per-process verdicts, tenants, bad bodies, nothing left."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

import aiohttp
import psutil
import pytest

from sandbox import convert
from service.replies import PipelineResult
from tests.service.conftest import LIMITED_TOKEN, MAIN_TOKEN, Service
from tests.support.interactive import INTERACTOR, SOLUTION

FLOOD = "while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"
BOTH_WAYS = [{"from": [0, 1], "to": [1, 0]}, {"from": [1, 1], "to": [0, 0]}]


def game(image: str, **kw: Any) -> dict[str, Any]:
    return {"image": image, "policy": "judge", "env": {"PATH": "/bin"},
            "processes": [{"cmd": ["sh", "-c", INTERACTOR]}, {"cmd": ["sh", "-c", SOLUTION]}],
            "pipes": BOTH_WAYS, **kw}


async def post(s: aiohttp.ClientSession, body: dict[str, Any], token: str = MAIN_TOKEN,
               timeout: aiohttp.ClientTimeout | None = None, **headers: str) -> tuple[int, Any]:
    async with s.post("/v1/runs", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {token}", **headers}) as r:
        return r.status, await r.json()


def containers(result: dict[str, Any]) -> set[str]:
    return {p["id"].rsplit("-", 1)[0] for p in result["processes"]}


def test_a_guessing_game_in_one_container_and_in_two(service: Service, images: Any) -> None:
    for where in ("shared", "own"):
        status, out = service.call(lambda s, w=where: post(s, game(images.oci, container=w)))
        assert status == 200, out
        convert(out, PipelineResult)
        assert out["status"] == "ok", out
        inter, sol = out["processes"]
        assert (inter["status"], inter["stderr"]) == ("ok", "found in 3\n")
        assert sol["status"] == "ok" and inter["stdout"] == sol["stdout"] == ""
        assert out["pipes"] == [{"captured": None, "truncated": False}] * 2
        assert len(containers(out)) == (1 if where == "shared" else 2)


def test_a_captured_pipe_comes_back_encoded(service: Service, images: Any) -> None:
    pipes = [{"from": [0, 1], "to": [1, 0], "capture_bytes": 1024},
             {"from": [1, 1], "to": [0, 0], "capture_bytes": 3}]
    status, out = service.call(lambda s: post(s, game(images.oci, pipes=pipes,
                                                      output_encoding="base64")))
    assert status == 200 and out["status"] == "ok", out
    got = [(base64.b64decode(p["captured"]), p["truncated"]) for p in out["pipes"]]
    assert got == [(b"lower\nhigher\ncorrect\n", False), (b"50\n", True)]


def test_each_process_has_its_own_verdict(service: Service, images: Any) -> None:
    """The solution spins past its CPU limit: it is time_limit, and so is the pipeline; the
    interactor, waiting on it, is ok and is not charged for its CPU time."""
    body = {"image": images.oci, "policy": "judge", "env": {"PATH": "/bin"},
            "limits": {"wall_ms": 30000},
            "processes": [{"cmd": ["sh", "-c", "read g; echo done >&2"]},
                          {"cmd": ["sh", "-c", "while :; do :; done"],
                           "limits": {"cpu_ms": 300}}],
            "pipes": [{"from": [1, 1], "to": [0, 0]}]}
    status, out = service.call(lambda s: post(s, body))
    assert status == 200, out
    inter, sol = out["processes"]
    assert (inter["status"], inter["stderr"]) == ("ok", "done\n"), inter
    assert sol["status"] == "time_limit" and out["status"] == "time_limit"
    assert inter["cpu_ms"] < sol["cpu_ms"] / 10


def test_the_body_shares_files_env_and_limits_and_each_process_adds_its_own(
        service: Service, images: Any) -> None:
    body = {"image": images.oci, "policy": "judge", "container": "own",
            "env": {"PATH": "/bin", "WHO": "shared"},
            "files": [{"path": "/tmp/common", "content": "common\n"},
                      {"path": "/tmp/mine", "content": "shared\n"}],
            "processes": [
                {"cmd": ["sh", "-c", "cat /tmp/common /tmp/mine; echo $WHO"]},
                {"cmd": ["sh", "-c", "cat > /tmp/got; cat /tmp/mine; echo $WHO"],
                 "env": {"WHO": "second"}, "copy_out": ["/tmp/got"],
                 "files": [{"path": "/tmp/mine", "content": "own\n"}]}],
            "pipes": [{"from": [0, 1], "to": [1, 0]}]}
    status, out = service.call(lambda s: post(s, body))
    assert status == 200 and out["status"] == "ok", out
    second = out["processes"][1]
    assert second["files"] == {"/tmp/got": "common\nshared\nshared\n"}
    assert second["stdout"] == "own\nsecond\n"


def test_bodies_a_pipeline_cannot_take_are_refused_naming_the_field(
        service: Service, images: Any) -> None:
    good = game(images.oci)
    one = {**good, "processes": good["processes"][:1]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "cmd": ["true"]}, "processes"),
        ({**good, "stdin": "x"}, "stdin"),
        (one, "processes"),
        ({"image": images.oci, "cmd": ["true"], "pipes": BOTH_WAYS}, "pipes"),
        ({**good, "pipes": [{"from": [0, 0], "to": [1, 0]}]}, "pipes[0].from"),
        ({**good, "pipes": [{"from": [0, 1], "to": [5, 0]}]}, "pipes[0].to"),
        ({**good, "pipes": [*BOTH_WAYS, {"from": [0, 2], "to": [1, 0]}]}, "pipes[2].to"),
        ({**good, "container": "mine"}, "container"),
        ({**good, "pipes": [{**p, "capture_bytes": 64 << 20} for p in BOTH_WAYS]}, "pipes"),
        ({**good, "processes": [good["processes"][0], {"cmd": ["true"], "files": [
            {"path": "/tmp/p", "file_id": "sha256:" + "0" * 64}]}]},
         "processes[1].files[0].file_id"),
    ]

    async def go(s: aiohttp.ClientSession) -> list[tuple[int, Any]]:
        return [await post(s, body) for body, _ in cases]

    for (status, err), (_, field) in zip(service.call(go), cases, strict=True):
        assert status in (400, 404), err
        assert err["error"]["field"] == field, err

    async def streamed(s: aiohttp.ClientSession) -> tuple[int, Any]:
        return await post(s, good, Accept="application/x-ndjson")

    status, err = service.call(streamed)
    assert status == 400 and err["error"]["field"] == "processes", err

    async def over_websocket(s: aiohttp.ClientSession) -> Any:
        async with s.ws_connect("/v1/runs/ws") as ws:
            await ws.send_json(good)
            return await ws.receive_json()

    event = service.call(over_websocket)
    assert event["event"] == "error" and event["error"]["field"] == "processes", event


def test_own_containers_never_serve_another_tenant(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[set[str], set[str]]:
        mine: set[str] = set()
        theirs: set[str] = set()
        for _ in range(3):
            for token, ids in ((MAIN_TOKEN, mine), (LIMITED_TOKEN, theirs)):
                status, out = await post(s, game(images.oci, container="own"), token)
                assert status == 200 and out["status"] == "ok", out
                ids |= containers(out)
                status, run = await post(s, {"image": images.oci, "cmd": ["true"],
                                             "policy": "judge"}, token)
                assert status == 200, run
                ids.add(run["id"].rsplit("-", 1)[0])
        return mine, theirs

    mine, theirs = service.call(go)
    assert mine and theirs and not mine & theirs, (mine, theirs)


def _pipes(pid: int) -> list[str]:
    """The pipes the service holds open."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("pipe:"):
            out.append(target)
    return sorted(out)


def _runs_left(pid: int) -> list[psutil.Process]:
    """Processes of runs (busybox's sh and sleep) among the service's descendants."""
    return [p for p in psutil.Process(pid).children(recursive=True)
            if p.name() in ("sh", "sleep")]


def test_nothing_is_left_after_pipelines_however_they_end(service: Service,
                                                          images: Any) -> None:
    pid = service.proc.pid
    service.call(lambda s: post(s, game(images.oci)))   # warm
    before = _pipes(pid)
    relayed = [{**p, "capture_bytes": 8} for p in BOTH_WAYS]
    flood = {"image": images.oci, "policy": "judge", "env": {"PATH": "/bin"},
             "limits": {"wall_ms": 30000}, "pipes": relayed,
             "processes": [{"cmd": ["sh", "-c", "read x"]}, {"cmd": ["sh", "-c", FLOOD]}]}
    sleeper = {**flood, "processes": [{"cmd": ["sleep", "1000"], "limits": {"wall_ms": 2000}},
                                      {"cmd": ["sh", "-c", FLOOD]}]}

    async def go(s: aiohttp.ClientSession) -> None:
        status, out = await post(s, game(images.oci, pipes=relayed, container="own"))
        assert status == 200 and out["status"] == "ok", out
        status, out = await post(s, flood)
        assert status == 200, out
        assert [p["status"] for p in out["processes"]] == ["ok", "signaled"], out
        # A client that goes away: the pipeline ends at its limits, as a run does.
        with pytest.raises(TimeoutError):
            await post(s, sleeper, timeout=aiohttp.ClientTimeout(total=1))

    service.call(go)
    deadline = time.monotonic() + 30
    while (_runs_left(pid) or _pipes(pid) != before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _runs_left(pid) == []
    assert _pipes(pid) == before


def test_a_pipeline_as_a_job(service: Service, images: Any) -> None:
    """A job's run body may be a pipeline: the job's result is the pipeline's; a pipeline
    that cannot be wired is refused at submit."""
    async def go(s: aiohttp.ClientSession) -> tuple[Any, int, Any]:
        async with s.post("/v1/jobs", json={"run": {**game(images.oci), "pipes": [
                {"from": [0, 0], "to": [1, 0]}]}}) as r:
            refused = r.status, await r.json()
        async with s.post("/v1/jobs", json={"run": game(images.oci)}) as r:
            assert r.status == 202, await r.text()
            job_id = (await r.json())["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with s.get(f"/v1/jobs/{job_id}") as r:
                job = await r.json()
            if job["status"] not in ("queued", "running"):
                return refused, r.status, job
            await asyncio.sleep(0.05)
        raise AssertionError(f"the job never ended: {job}")

    (refused_status, refused), status, job = service.call(go)
    assert refused_status == 400 and refused["error"]["field"] == "run.pipes[0].from", refused
    assert status == 200 and job["status"] == "done", job
    convert(job["result"], PipelineResult)
    assert job["result"]["processes"][0]["stderr"] == "found in 3\n"
